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
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import kubernetes.client
import kubernetes.config
import orjson
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from kube_audit import hostfs
from kube_audit.core import yamlio
from kube_audit.core.models import GROUP, VERSION, SecretData, parse_secret
from kube_audit.errors import ClusterError, Conflict, InvalidInput, NotFound

T = TypeVar("T")
log = logging.getLogger("kube_audit.operator")
TOKEN_LABEL = "kube-audit.io/token"
ROTATED_FOR = "kube-audit.io/rotated-for"
CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"
MERGE_PATCH = "application/merge-patch+json"


def load_api_client(kubeconfig: str | None = None) -> kubernetes.client.ApiClient:
    """In-cluster credentials inside a pod, else the current kubeconfig context."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration
            )
        except (kubernetes.config.ConfigException, OSError) as error:
            raise ClusterError(
                f"no cluster credentials: not in a pod and no usable kubeconfig ({error})"
            ) from None
    return kubernetes.client.ApiClient(configuration)


def current_cluster(kubeconfig: str | None = None) -> tuple[str, str, str | None, bool]:
    """(cluster name, server, base64 CA data or None, insecure) of the current context.

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
            docs.append(yamlio.load(data) or {})
    current = next((d.get("current-context") for d in docs if d.get("current-context")), None)
    contexts = {c["name"]: c.get("context", {}) for d in docs for c in d.get("contexts") or []}
    clusters = {
        c["name"]: c.get("cluster", {}) for d in reversed(docs) for c in d.get("clusters") or []
    }
    if not current or current not in contexts:
        raise ClusterError(f"no current context in kubeconfig {os.pathsep.join(paths)}")
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


def _call(what: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return func(*args, **kwargs)
    except ApiException as error:
        message = f"{what}: HTTP {error.status} {error.reason}"
        if error.status == 404:
            raise NotFound(message) from None
        if error.status == 409:
            raise Conflict(message) from None
        raise ClusterError(message) from None
    except (urllib3.exceptions.HTTPError, OSError) as error:
        raise ClusterError(f"{what}: Kubernetes API unreachable ({error})") from None


def _drain(response: Any) -> bytes:
    """Read a raw response and give its connection back to the pool (unread, it would leak)."""
    try:
        return bytes(response.data)
    finally:
        response.release_conn()


def _plain(obj: Any, client: kubernetes.client.ApiClient) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else client.sanitize_for_serialization(obj)


class KubeApi:
    """Typed calls for what kube-audit needs; nothing else in the project imports the client."""

    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.coordination = kubernetes.client.CoordinationV1Api(client)
        self._watch: Any = None

    def list_objects(self, plural: str) -> list[dict[str, Any]]:
        result = _call(
            f"list {plural}.{GROUP}", self.custom.list_cluster_custom_object, GROUP, VERSION, plural
        )
        return list(result.get("items", []))

    def get_object(self, plural: str, name: str) -> dict[str, Any]:
        return dict(
            _call(
                f"get {plural}.{GROUP}/{name}",
                self.custom.get_cluster_custom_object,
                GROUP,
                VERSION,
                plural,
                name,
            )
        )

    def patch_status(self, plural: str, name: str, patch: Mapping[str, Any]) -> None:
        """A JSON merge patch of ``status`` (each writer only touches its own keys)."""
        _drain(
            _call(
                f"patch {plural}.{GROUP}/{name}/status",
                self.custom.patch_cluster_custom_object_status,
                GROUP,
                VERSION,
                plural,
                name,
                {"status": dict(patch)},
                _preload_content=False,
            )
        )

    def read_secret(self, namespace: str, name: str) -> tuple[SecretData, dict[str, Any]] | None:
        try:
            obj = _call(
                f"read Secret {namespace}/{name}",
                self.core.read_namespaced_secret,
                name,
                namespace,
            )
        except NotFound:
            return None
        raw = _plain(obj, self.client)
        raw.setdefault("metadata", {}).setdefault("namespace", namespace)
        try:
            return parse_secret(raw), raw
        except InvalidInput as error:
            raise ClusterError(str(error)) from None

    def list_token_secrets(self, namespace: str) -> list[dict[str, Any]]:
        """The Secrets the operator made (by label), in one call, as raw JSON (no models: with
        10,000 users the client's model objects would cost more memory than the data)."""
        response = _call(
            f"list Secrets in {namespace}",
            self.core.list_namespaced_secret,
            namespace,
            label_selector=f"{TOKEN_LABEL}=true",
            _preload_content=False,
        )
        items = []
        data = _drain(response)
        for item in orjson.loads(data).get("items") or []:
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
            created = _call(
                f"create Secret {namespace}/{name}",
                self.core.create_namespaced_secret,
                namespace,
                body,
            )
        except Conflict:
            return None
        raw = _plain(created, self.client)
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
            _call(
                f"rotate Secret {namespace}/{name}",
                self.core.patch_namespaced_secret,
                name,
                namespace,
                body,
            )
        except Conflict:
            return False
        return True

    def watch_secrets(
        self, on_event: Callable[[str, dict[str, Any]], None], stop: threading.Event
    ) -> None:
        """Blocking list+watch of every Secret, raw JSON, until ``stop``; reconnects forever.

        A plain watch rather than kopf's: kopf keeps per-object state for each object it sees,
        and a cluster can hold many thousands of Secrets of which kube-audit reads a few.
        ``on_event`` gets ("ADDED"|"MODIFIED"|"DELETED", object) and must be quick.
        """
        backoff = 1.0
        while not stop.is_set():
            try:
                version: str | None = self._list_secrets(on_event)
                backoff = 1.0
                while not stop.is_set() and version:
                    version = self._watch_secrets(version, on_event, stop)
            except ClusterError as error:
                log.warning("Secret watch interrupted, retrying in %.0fs: %s", backoff, error)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _list_secrets(self, on_event: Callable[[str, dict[str, Any]], None]) -> str:
        token: str | None = None
        while True:
            response = _call(
                "list Secrets",
                self.core.list_secret_for_all_namespaces,
                limit=500,
                _continue=token,
                _preload_content=False,
            )
            page = orjson.loads(_drain(response))
            for item in page.get("items") or []:
                on_event("ADDED", item)
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return str(meta.get("resourceVersion") or "")

    def _watch_secrets(
        self, version: str, on_event: Callable[[str, dict[str, Any]], None], stop: threading.Event
    ) -> str | None:
        """One watch request; the resourceVersion to go on from, or None to list again."""
        response = _call(
            "watch Secrets",
            self.core.list_secret_for_all_namespaces,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=300,
            _preload_content=False,
            _request_timeout=(10, 330),
        )
        self._watch = response
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
            raise ClusterError(f"watch Secrets: {error}") from None
        finally:
            self._watch = None
            response.release_conn()
        return version

    def stop_watches(self) -> None:
        """Break an open watch at once (it would otherwise last until the server's timeout)."""
        response = self._watch
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown() if hasattr(response, "shutdown") else response.close()

    def control_plane_nodes(self) -> list[str]:
        nodes = _call(
            "list control-plane Nodes", self.core.list_node, label_selector=CONTROL_PLANE_LABEL
        )
        return sorted(
            _plain(n, self.client)["metadata"]["name"] for n in _items(nodes, self.client)
        )

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
                "namespace": "default",
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
            _call(
                "create Event",
                self.core.create_namespaced_event,
                "default",
                body,
                _preload_content=False,
            )
        )

    def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            lease = _call(
                f"read Lease {namespace}/{name}",
                self.coordination.read_namespaced_lease,
                name,
                namespace,
            )
        except NotFound:
            return None
        return _plain(lease, self.client)

    def create_lease(self, namespace: str, body: Mapping[str, Any]) -> bool:
        try:
            _call(
                f"create Lease {namespace}",
                self.coordination.create_namespaced_lease,
                namespace,
                dict(body),
            )
        except Conflict:
            return False
        return True

    def replace_lease(self, namespace: str, name: str, body: Mapping[str, Any]) -> bool:
        """Replace with the body's resourceVersion as precondition; False on a lost race."""
        try:
            _call(
                f"replace Lease {namespace}/{name}",
                self.coordination.replace_namespaced_lease,
                name,
                namespace,
                dict(body),
            )
        except Conflict:
            return False
        return True


def _items(result: Any, client: kubernetes.client.ApiClient) -> list[Any]:
    raw = _plain(result, client)
    return list(raw.get("items") or [])
