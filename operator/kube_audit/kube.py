"""The one gateway to the Kubernetes API (the official client; blocking, so call it in a thread).

Everything the operator and the CLI read from or write to the cluster, apart from kopf's own
watches, goes through ``KubeApi``; API failures become ``ClusterError`` and its subclasses.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import kubernetes.client
import kubernetes.config
import orjson
import urllib3.exceptions
import yaml
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import ws_client

from kube_audit import hostfs
from kube_audit.constants import (
    CONTROL_PLANE_LABEL,
    EVENT_NAMESPACE,
    GROUP,
    NODE_LEASE_PREFIX,
    OPERATOR_POD_SELECTOR,
    ROTATED_FOR,
    TOKEN_FOR_LABEL,
    TOKEN_LABEL,
    VERSION,
)
from kube_audit.core import yamlio
from kube_audit.core.models import SecretData, parse_secret
from kube_audit.errors import ClusterError, Conflict, InvalidInput, NotFound

LISTING, LISTED = "LISTING", "LISTED"
# The two Secret watches: every Secret of the token namespace, and Secrets elsewhere that
# carry the token-for label (never every Secret of the cluster).
TOKEN_NAMESPACE_SOURCE, LABELLED_SOURCE = "token-namespace", "labelled"

log = logging.getLogger("kube_audit.operator")
MERGE_PATCH = "application/merge-patch+json"
CONNECT_TIMEOUT = 10.0
WATCH_SETTLED = 10.0
MAX_WATCH_BACKOFF = 15.0


def load_api_client(
    kubeconfig: str | None = None, context: str | None = None
) -> kubernetes.client.ApiClient:
    """As kubectl: ``kubeconfig`` (or ``context``) given wins; else in-cluster credentials
    inside a pod; else $KUBECONFIG or ~/.kube/config."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig is None and context is None:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            pass
        else:
            return kubernetes.client.ApiClient(configuration)
    try:
        kubernetes.config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=configuration
        )
    except (kubernetes.config.ConfigException, OSError, ValueError) as error:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise ClusterError(f"no usable kubeconfig ({where}): {error}") from None
    except yaml.YAMLError as error:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise ClusterError(f"kubeconfig {yamlio.explain(where, error)}") from None
    return kubernetes.client.ApiClient(configuration)


def current_cluster(
    kubeconfig: str | None = None, context: str | None = None
) -> tuple[str, str, str | None, bool]:
    """(cluster name, server, base64 CA data or None, insecure) of ``context`` (default: the
    current one).

    Follows kubectl: ``--kubeconfig``, else every file in ``$KUBECONFIG``, else ~/.kube/config;
    the first file that sets a value wins.
    """
    paths = (
        [kubeconfig]
        if kubeconfig
        else [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
        or [os.path.expanduser("~/.kube/config")]
    )
    docs = []
    for path in paths:
        data = hostfs.read_optional(Path(path))
        if data is not None:
            try:
                docs.append(yamlio.load(data) or {})
            except yamlio.YAMLError as error:
                raise ClusterError(f"kubeconfig {yamlio.explain(path, error)}") from None
    current = context or next(
        (d.get("current-context") for d in docs if d.get("current-context")), None
    )
    contexts = {c["name"]: c.get("context", {}) for d in docs for c in d.get("contexts") or []}
    clusters = {
        c["name"]: c.get("cluster", {}) for d in reversed(docs) for c in d.get("clusters") or []
    }
    if not current or current not in contexts:
        what = f"no context {context!r}" if context else "no current context"
        raise ClusterError(f"{what} in kubeconfig {os.pathsep.join(paths)}")
    name = str(contexts[current].get("cluster") or "")
    entry = clusters.get(name) or {}
    ca_data = entry.get("certificate-authority-data")
    if not ca_data and entry.get("certificate-authority"):
        ca_data = base64.b64encode(hostfs.read_bytes(Path(entry["certificate-authority"]))).decode()
    return (
        name,
        str(entry.get("server") or ""),
        ca_data,
        bool(entry.get("insecure-skip-tls-verify")),
    )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _reason(error: BaseException) -> str:
    """The cause in a few words, without urllib3's pool and retry wrappers."""
    while isinstance(getattr(error, "reason", None), BaseException):
        error = error.reason  # type: ignore[attr-defined]
    text = str(error)
    for marker in ("Failed to establish a new connection: ", "Caused by ", "): "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text.strip(" ()'\"") or type(error).__name__


def _status_message(data: bytes) -> str:
    """The apiserver's own words from a ``Status`` error body, when it sent one."""
    with contextlib.suppress(ValueError, AttributeError):
        message = orjson.loads(data).get("message")
        if message:
            return f": {message}"
    return ""


def _channel(stream: Any, channel: int) -> bytes:
    """What arrived on one channel since the last read ("" when nothing did)."""
    data = stream.read_channel(channel, timeout=0)
    return data if isinstance(data, bytes) else str(data).encode()


def _exec_reason(error: BaseException) -> str:
    """The apiserver's own words for a refused exec (a 403 names the missing permission),
    without websocket-client's dump of the response headers."""
    status = getattr(error, "status_code", None)
    if status:
        return f"HTTP {status}{_status_message(getattr(error, 'resp_body', None) or b'')}"
    return _one_line(error).split(" -+-+- ", 1)[0] or type(error).__name__


def _exit_status(status: bytes) -> tuple[int | None, str | None]:
    """kubelet's last word on the error channel: a ``Status`` with the exit code."""
    if not status.strip():
        return None, "the connection closed before the command's exit status arrived"
    try:
        data = orjson.loads(status)
    except orjson.JSONDecodeError:
        return None, status.decode("utf-8", "replace").strip()
    if data.get("status") == "Success":
        return 0, None
    if data.get("reason") == "NonZeroExitCode":
        for cause in (data.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode" or cause.get("type") == "ExitCode":
                with contextlib.suppress(ValueError):
                    return int(cause.get("message")), None
    return None, str(data.get("message") or status.decode("utf-8", "replace")).strip()


def _drain(response: Any) -> bytes:
    """Read a raw response and give its connection back to the pool (unread, it would leak)."""
    try:
        return bytes(response.data)
    finally:
        response.release_conn()


@dataclass(frozen=True)
class ExecResult:
    """What a command run through pods/exec said: its exit code, or why it has none."""

    stdout: bytes
    stderr: str
    exit_code: int | None
    failure: str | None = None


class KubeApi:
    """Typed calls for what kube-audit needs; nothing else in the project imports the client.

    Requests are built by the official client's ``ApiClient`` (configuration, credentials and
    their refresh, TLS, proxies) and answered as raw JSON. Not the generated ``CoreV1Api``:
    importing that module alone costs about 20 MB of pydantic signatures, and model objects
    for 10,000 Secrets would cost more memory than the data.
    """

    def __init__(self, client: kubernetes.client.ApiClient, timeout: float = 30.0) -> None:
        self.client = client
        # Every call but a watch gives up after this long: an apiserver stopping mid-restart
        # can leave a connection open and silent, and a call without a timeout waits forever.
        self.timeout = timeout
        self._watches: set[Any] = set()
        self._watches_lock = threading.Lock()

    def bearer_token(self) -> str | None:
        """The bearer token the client would send now, without its scheme, for kopf.

        Read through the configuration's refresh hook, so a rotated ServiceAccount token is
        the one returned. Loaders store the scheme differently (the in-cluster one keeps
        ``"bearer " + token`` in lower case, kubeconfig ``"Bearer " + token`` or a separate
        prefix): it is stripped whatever its case, or kopf would send ``Bearer bearer ...``.
        """
        conf = self.client.configuration
        value = conf.get_api_key_with_prefix("BearerToken", alias="authorization")
        if not value:
            return None
        scheme, _, rest = str(value).strip().partition(" ")
        token = rest.strip() if scheme.lower() == "bearer" and rest.strip() else str(value).strip()
        return token or None

    def _send(
        self,
        what: str,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str | None = None,
        timeout: Any = None,
    ) -> Any:
        """One request; the open response (2xx) or NotFound/Conflict/ClusterError."""
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        params = [(k, v) for k, v in (query or {}).items() if v is not None]
        request = self.client.param_serialize(
            method,
            path,
            query_params=params or None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.client.call_api(
                *request, _request_timeout=timeout or (CONNECT_TIMEOUT, self.timeout)
            ).response
        except ApiException as error:
            raise ClusterError(f"{what}: {error.reason or error}", error.status or 0) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            host = self.client.configuration.host
            raise ClusterError(
                f"{what}: Kubernetes API unreachable at {host}: {_reason(error)}"
            ) from None
        if 200 <= response.status <= 299:
            return response
        data = _drain(response)
        message = f"{what}: HTTP {response.status} {response.reason}{_status_message(data)}"
        if response.status == 404:
            raise NotFound(message, 404)
        if response.status == 409:
            raise Conflict(message, 409)
        raise ClusterError(message, response.status)

    def _json(self, what: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """A request whose answer is one JSON object."""
        data = _drain(self._send(what, method, path, **kwargs))
        try:
            result = orjson.loads(data) if data else {}
        except orjson.JSONDecodeError as error:
            raise ClusterError(f"{what}: the API answered with invalid JSON ({error})") from None
        if not isinstance(result, dict):
            raise ClusterError(f"{what}: the API answered with a {type(result).__name__}")
        return result

    def _pages(
        self, what: str, path: str, query: Mapping[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """A list in pages of 500 (bounded memory with 10,000 objects); the last page's
        metadata carries the resourceVersion to watch from."""
        token: str | None = None
        while True:
            paged = {**(query or {}), "limit": 500, "continue": token}
            page = self._json(what, "GET", path, query=paged)
            yield page
            token = (page.get("metadata") or {}).get("continue") or None
            if token is None:
                return

    def _items(
        self, what: str, path: str, query: Mapping[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        for page in self._pages(what, path, query):
            yield from page.get("items") or []

    def list_objects(self, plural: str) -> list[dict[str, Any]]:
        return list(self._items(f"list {plural}.{GROUP}", _custom_path(plural)))

    def list_uids(self, plural: str) -> dict[str, str]:
        """Name -> uid of every object of a kind: a sync check, no bodies kept."""
        out = {}
        for item in self._items(f"list {plural}.{GROUP}", _custom_path(plural)):
            meta = item.get("metadata") or {}
            out[str(meta.get("name") or "")] = str(meta.get("uid") or "")
        return out

    def mirror_pod(self, node: str) -> dict[str, Any] | None:
        """kubelet's mirror pod of this node's kube-apiserver static pod, or None."""
        name = f"kube-apiserver-{node.lower()}"
        try:
            return self._json(
                f"get Pod kube-system/{name}", "GET", f"/api/v1/namespaces/kube-system/pods/{name}"
            )
        except NotFound:
            return None

    def get_object(self, plural: str, name: str) -> dict[str, Any]:
        return self._json(f"get {plural}.{GROUP}/{name}", "GET", _custom_path(plural, name))

    def patch_status(self, plural: str, name: str, patch: Mapping[str, Any]) -> None:
        """A JSON merge patch of ``status`` (each writer only touches its own keys)."""
        _drain(
            self._send(
                f"patch {plural}.{GROUP}/{name}/status",
                "PATCH",
                _custom_path(plural, name) + "/status",
                body={"status": dict(patch)},
                content_type=MERGE_PATCH,
            )
        )

    def read_secret(self, namespace: str, name: str) -> tuple[SecretData, dict[str, Any]] | None:
        try:
            raw = self._json(
                f"read Secret {namespace}/{name}", "GET", _secret_path(namespace, name)
            )
        except NotFound:
            return None
        raw.setdefault("metadata", {}).setdefault("namespace", namespace)
        try:
            return parse_secret(raw), raw
        except InvalidInput as error:
            raise ClusterError(str(error)) from None

    def read_consenting_secret(self, namespace: str, name: str, user: str) -> dict[str, Any] | None:
        """Secret ``namespace/name`` only if it carries the consent label for ``user``. The
        apiserver filters (label and field selectors), so the data of a Secret that did not
        consent never reaches this process."""
        if len(user) > 63:  # not a label value: no Secret can consent to such a name
            return None
        query = {
            "labelSelector": f"{TOKEN_FOR_LABEL}={user}",
            "fieldSelector": f"metadata.name={name}",
        }
        for item in self._items(
            f"read Secret {namespace}/{name} if it consents", _secret_path(namespace), query
        ):
            item.setdefault("metadata", {}).setdefault("namespace", namespace)
            return item
        return None

    def list_token_secrets(self, namespace: str) -> list[dict[str, Any]]:
        """The Secrets the operator made (found by their label)."""
        items = []
        for item in self._items(
            f"list Secrets in {namespace}",
            _secret_path(namespace),
            {"labelSelector": f"{TOKEN_LABEL}=true"},
        ):
            item.setdefault("metadata", {}).setdefault("namespace", namespace)
            items.append(item)
        return items

    def create_token_secret(
        self, namespace: str, name: str, token: str, owner: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Create the Secret; None when another writer was first (409), else the new object."""
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {TOKEN_LABEL: "true"},
                "ownerReferences": [dict(owner)],
            },
            "data": {"token": base64.b64encode(token.encode()).decode()},
        }
        try:
            raw = self._json(
                f"create Secret {namespace}/{name}", "POST", _secret_path(namespace), body=body
            )
        except Conflict:
            return None
        raw.setdefault("metadata", {}).setdefault("namespace", namespace)
        return raw

    def rotate_token_secret(
        self, namespace: str, name: str, token: str, nonce: str, resource_version: str
    ) -> bool:
        """Replace the token once per rotation request; False if someone else changed it first."""
        body = {
            "metadata": {"resourceVersion": resource_version, "annotations": {ROTATED_FOR: nonce}},
            "data": {"token": base64.b64encode(token.encode()).decode()},
        }
        try:
            _drain(
                self._send(
                    f"rotate Secret {namespace}/{name}",
                    "PATCH",
                    _secret_path(namespace, name),
                    body=body,
                    content_type=MERGE_PATCH,
                )
            )
        except Conflict:
            return False
        return True

    def watch_secrets(
        self,
        on_event: Callable[[str, dict[str, Any]], None],
        stop: threading.Event,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> None:
        """Blocking list+watch of Secrets (of one namespace, or those matching a label
        selector), raw JSON, until ``stop``; reconnects forever, backing off.

        A plain watch rather than kopf's: kopf keeps per-object state for each object it sees.
        ``on_event`` gets ("ADDED"|"MODIFIED"|"DELETED", object), and LISTING / LISTED
        around each complete list; it must be quick. With a label selector, a Secret that
        loses its label arrives as DELETED (the apiserver filters watches that way).
        """
        path = _secret_path(namespace) if namespace else "/api/v1/secrets"
        query = {"labelSelector": label_selector}
        what = f"Secrets in {namespace}" if namespace else f"Secrets labelled {label_selector}"
        self._list_and_watch(what, path, query, on_event, stop)

    def watch_control_plane_nodes(
        self, on_event: Callable[[str, dict[str, Any]], None], stop: threading.Event
    ) -> None:
        """Blocking list+watch of the control-plane Nodes only, as ``watch_secrets``. The
        apiserver filters by label: a cluster's thousands of workers never reach the pod
        (kopf's ``labels=`` filters on the client, after every Node was streamed)."""
        query = {"labelSelector": CONTROL_PLANE_LABEL}
        self._list_and_watch("control-plane Nodes", "/api/v1/nodes", query, on_event, stop)

    def _list_and_watch(
        self,
        what: str,
        path: str,
        query: Mapping[str, Any],
        on_event: Callable[[str, dict[str, Any]], None],
        stop: threading.Event,
    ) -> None:
        backoff = 1.0
        while not stop.is_set():
            started = time.monotonic()
            try:
                version: str | None = self._list(what, path, query, on_event)
                while not stop.is_set() and version:
                    version = self._watch(
                        what, path, query, version=version, on_event=on_event, stop=stop
                    )
            except ClusterError as error:
                if stop.is_set():
                    return
                log.warning("watch %s interrupted, retrying in %.0fs: %s", what, backoff, error)
            else:
                if stop.is_set():
                    return
                log.info("watch %s expired; listing again in %.0fs", what, backoff)
            # Back off while lists fail or watches keep ending at once (410 Gone in a loop,
            # an apiserver restarting), never into a hot loop of full lists; a watch that ran
            # for a while starts the count again.
            if time.monotonic() - started > WATCH_SETTLED:
                backoff = 1.0
            stop.wait(backoff)
            backoff = min(backoff * 2, MAX_WATCH_BACKOFF)

    def _list(
        self,
        what: str,
        path: str,
        query: Mapping[str, Any],
        on_event: Callable[[str, dict[str, Any]], None],
    ) -> str:
        """Every object as ADDED, framed by LISTING and LISTED (whose ``keys`` are all the
        (namespace, name) pairs listed): a re-list must also tell what is gone."""
        version = ""
        keys: list[tuple[str, str]] = []
        on_event(LISTING, {})
        for page in self._pages(f"list {what}", path, query):
            for item in page.get("items") or []:
                meta = item.get("metadata") or {}
                keys.append((str(meta.get("namespace") or ""), str(meta.get("name") or "")))
                on_event("ADDED", item)
            version = str((page.get("metadata") or {}).get("resourceVersion") or "")
        on_event(LISTED, {"keys": keys})
        return version

    def _watch(
        self,
        what: str,
        path: str,
        query: Mapping[str, Any],
        *,
        version: str,
        on_event: Callable[[str, dict[str, Any]], None],
        stop: threading.Event,
    ) -> str | None:
        """One watch request; the resourceVersion to go on from, or None to list again."""
        response = self._send(
            f"watch {what}",
            "GET",
            path,
            query={
                **query,
                "watch": "true",
                "resourceVersion": version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": 300,
            },
            timeout=(CONNECT_TIMEOUT, 330),
        )
        with self._watches_lock:
            self._watches.add(response)
        buffer = b""
        try:
            for chunk in response.stream(65536, decode_content=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = orjson.loads(line)
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        return None
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        on_event(kind, obj)
                if stop.is_set():
                    return version
        except (urllib3.exceptions.HTTPError, OSError, orjson.JSONDecodeError) as error:
            raise ClusterError(f"watch {what}: {error}") from None
        finally:
            with self._watches_lock:
                self._watches.discard(response)
            response.release_conn()
        return version

    def stop_watches(self) -> None:
        """Break the open watches at once (they would otherwise last until the server's
        timeout)."""
        with self._watches_lock:
            responses = list(self._watches)
        for response in responses:
            with contextlib.suppress(Exception):
                response.shutdown() if hasattr(response, "shutdown") else response.close()

    def control_plane_nodes(self) -> list[str]:
        return sorted(
            str((item.get("metadata") or {}).get("name") or "")
            for item in self._items(
                "list control-plane Nodes", "/api/v1/nodes", {"labelSelector": CONTROL_PLANE_LABEL}
            )
        )

    def operator_pods(self, namespace: str) -> list[dict[str, Any]]:
        """The DaemonSet's pods: one per control-plane node when all is well."""
        return list(
            self._items(
                f"list kube-audit Pods in {namespace}",
                f"/api/v1/namespaces/{quote(namespace)}/pods",
                {"labelSelector": OPERATOR_POD_SELECTOR},
            )
        )

    def exec_in_pod(
        self, namespace: str, pod: str, container: str, argv: Sequence[str], timeout: float
    ) -> ExecResult:
        """``kubectl exec`` without a terminal: the command's stdout, stderr and exit code.

        The stream is read as it comes, a frame at a time, so a long answer costs no more
        than its own bytes (the client's ``run_forever`` concatenates bytes per frame).
        """
        what = f"exec in Pod {namespace}/{pod}"
        query = [("container", container), ("stdout", "true"), ("stderr", "true")]
        query += [("command", arg) for arg in argv]
        _, url, headers, _, _ = self.client.param_serialize(
            "GET",
            f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(pod)}/exec",
            query_params=query,
            header_params={},
            auth_settings=["BearerToken"],
        )
        try:
            stream = ws_client.WSClient(
                self.client.configuration,
                ws_client.get_websocket_url(url),
                headers,
                capture_all=False,
                binary=True,
            )
        except Exception as error:  # websocket-client raises its own types and OSError
            return ExecResult(b"", "", None, f"{what}: {_exec_reason(error)}")
        out: list[bytes] = []
        err: list[bytes] = []
        deadline = time.monotonic() + timeout
        try:
            while stream.is_open():
                left = deadline - time.monotonic()
                if left <= 0:
                    return ExecResult(b"", "", None, f"{what}: no answer within {timeout:g}s")
                stream.update(timeout=min(left, 1.0))
                out.append(_channel(stream, ws_client.STDOUT_CHANNEL))
                err.append(_channel(stream, ws_client.STDERR_CHANNEL))
            status = _channel(stream, ws_client.ERROR_CHANNEL)
        except Exception as error:
            return ExecResult(b"", "", None, f"{what}: {_exec_reason(error)}")
        finally:
            stream.close()
        out.append(_channel(stream, ws_client.STDOUT_CHANNEL))
        err.append(_channel(stream, ws_client.STDERR_CHANNEL))
        stderr = b"".join(err).decode("utf-8", "replace")
        code, failure = _exit_status(status)
        return ExecResult(b"".join(out), stderr, code, failure and f"{what}: {failure}")

    def create_event(
        self, obj: Mapping[str, Any], kind: str, event_type: str, reason: str, message: str
    ) -> None:
        """A core/v1 Event on a cluster-scoped object (such Events live in ``default``)."""
        meta = obj.get("metadata", {})
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{meta.get('name', 'kube-audit')}.",
                "namespace": EVENT_NAMESPACE,
            },
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": kind,
                "name": meta.get("name"),
                "uid": meta.get("uid"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "kube-audit"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": "kube-audit",
        }
        _drain(
            self._send(
                "create Event", "POST", f"/api/v1/namespaces/{EVENT_NAMESPACE}/events", body=body
            )
        )

    def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._json(f"read Lease {namespace}/{name}", "GET", _lease_path(namespace, name))
        except NotFound:
            return None

    def create_lease(self, namespace: str, body: Mapping[str, Any]) -> bool:
        try:
            _drain(
                self._send(
                    f"create Lease {namespace}", "POST", _lease_path(namespace), body=dict(body)
                )
            )
        except Conflict:
            return False
        return True

    def replace_lease(self, namespace: str, name: str, body: Mapping[str, Any]) -> bool:
        """Replace with the body's resourceVersion as precondition; False on a lost race."""
        try:
            _drain(
                self._send(
                    f"replace Lease {namespace}/{name}",
                    "PUT",
                    _lease_path(namespace, name),
                    body=dict(body),
                )
            )
        except Conflict:
            return False
        return True

    def node_records(self, namespace: str) -> dict[str, dict[str, str]]:
        """Node name -> the annotations of its node Lease (what it runs, its last outcome)."""
        out = {}
        for item in self._items(f"list Leases in {namespace}", _lease_path(namespace)):
            meta = item.get("metadata") or {}
            name = str(meta.get("name") or "")
            if name.startswith(NODE_LEASE_PREFIX):
                notes = meta.get("annotations") or {}
                out[name.removeprefix(NODE_LEASE_PREFIX)] = {k: str(v) for k, v in notes.items()}
        return out

    def write_node_record(
        self, namespace: str, node: str, annotations: Mapping[str, str], renew_time: str
    ) -> None:
        """Create or update this node's Lease: its holder is the node, its annotations say
        what it runs; a merge patch, so each node writes only its own and never conflicts."""
        name = f"{NODE_LEASE_PREFIX}{node}"
        body = {
            "metadata": {"name": name, "annotations": dict(annotations)},
            "spec": {"holderIdentity": node, "renewTime": renew_time},
        }
        try:
            _drain(
                self._send(
                    f"patch Lease {namespace}/{name}",
                    "PATCH",
                    _lease_path(namespace, name),
                    body=body,
                    content_type=MERGE_PATCH,
                )
            )
        except NotFound:
            create = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "annotations": dict(annotations),
                },
                "spec": {"holderIdentity": node, "renewTime": renew_time},
            }
            self.create_lease(namespace, create)


def _custom_path(plural: str, name: str | None = None) -> str:
    path = f"/apis/{GROUP}/{VERSION}/{plural}"
    return f"{path}/{quote(name, safe='')}" if name else path


def _secret_path(namespace: str, name: str | None = None) -> str:
    path = f"/api/v1/namespaces/{quote(namespace, safe='')}/secrets"
    return f"{path}/{quote(name, safe='')}" if name else path


def _lease_path(namespace: str, name: str | None = None) -> str:
    path = f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace, safe='')}/leases"
    return f"{path}/{quote(name, safe='')}" if name else path
