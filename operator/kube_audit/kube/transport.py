"""Requests and answers: how every call reaches the API and how its failures are named. The
other modules of this package are the calls themselves, one module per kind of thing they
talk to."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote

import kubernetes.client
import orjson
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from kube_audit.constants import GROUP, VERSION
from kube_audit.errors import ClusterError, Conflict, NotFound

MERGE_PATCH = "application/merge-patch+json"
JSON = "application/json"
# Lists of metadata only (names, uids, labels), with plain JSON as the fallback an API server
# without PartialObjectMetadata would pick: the bodies of 10,000 objects never cross the wire.
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1," + JSON
CONNECT_TIMEOUT = 10.0


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def reason(error: BaseException) -> str:
    """The cause in a few words, without urllib3's pool and retry wrappers."""
    while isinstance(getattr(error, "reason", None), BaseException):
        error = error.reason  # type: ignore[attr-defined]
    text = str(error)
    for marker in ("Failed to establish a new connection: ", "Caused by ", "): "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text.strip(" ()'\"") or type(error).__name__


def status_message(data: bytes) -> str:
    """The apiserver's own words from a ``Status`` error body, when it sent one."""
    with contextlib.suppress(ValueError, AttributeError):
        message = orjson.loads(data).get("message")
        if message:
            return f": {message}"
    return ""


def drain(response: Any) -> bytes:
    """Read a raw response and give its connection back to the pool (unread, it would leak)."""
    try:
        return bytes(response.data)
    finally:
        response.release_conn()


class Transport:
    """The client's ``ApiClient`` (configuration, credentials and their refresh, TLS, proxies)
    building each request, answers read as raw JSON."""

    def __init__(self, client: kubernetes.client.ApiClient, timeout: float = 30.0) -> None:
        self.client = client
        # Every call but a watch gives up after this long: an apiserver stopping mid-restart
        # can leave a connection open and silent, and a call without a timeout waits forever.
        self.timeout = timeout

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
        accept: str = JSON,
    ) -> Any:
        """One request; the open response (2xx) or NotFound/Conflict/ClusterError."""
        headers = {"Accept": accept}
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
                f"{what}: Kubernetes API unreachable at {host}: {reason(error)}"
            ) from None
        if 200 <= response.status <= 299:
            return response
        data = drain(response)
        message = f"{what}: HTTP {response.status} {response.reason}{status_message(data)}"
        if response.status == 404:
            raise NotFound(message, 404)
        if response.status == 409:
            raise Conflict(message, 409)
        raise ClusterError(message, response.status)

    def _write_unless_conflict(self, what: str, method: str, path: str, **kwargs: Any) -> bool:
        """A write guarded by the server (a create, a resourceVersion precondition): False when
        another writer was first (409), the caller then reads again and decides."""
        try:
            drain(self._send(what, method, path, **kwargs))
        except Conflict:
            return False
        return True

    def _json(self, what: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """A request whose answer is one JSON object."""
        data = drain(self._send(what, method, path, **kwargs))
        try:
            result = orjson.loads(data) if data else {}
        except orjson.JSONDecodeError as error:
            raise ClusterError(f"{what}: the API answered with invalid JSON ({error})") from None
        if not isinstance(result, dict):
            raise ClusterError(f"{what}: the API answered with a {type(result).__name__}")
        return result

    def _pages(
        self,
        what: str,
        path: str,
        query: Mapping[str, Any] | None = None,
        accept: str = JSON,
    ) -> Iterator[dict[str, Any]]:
        """A list in pages of 500 (bounded memory with 10,000 objects); the last page's
        metadata carries the resourceVersion to watch from."""
        token: str | None = None
        while True:
            paged = {**(query or {}), "limit": 500, "continue": token}
            page = self._json(what, "GET", path, query=paged, accept=accept)
            yield page
            token = (page.get("metadata") or {}).get("continue") or None
            if token is None:
                return

    def _items(
        self,
        what: str,
        path: str,
        query: Mapping[str, Any] | None = None,
        accept: str = JSON,
    ) -> Iterator[dict[str, Any]]:
        for page in self._pages(what, path, query, accept):
            yield from page.get("items") or []


def custom_path(plural: str, name: str | None = None) -> str:
    path = f"/apis/{GROUP}/{VERSION}/{plural}"
    return f"{path}/{quote(name, safe='')}" if name else path


def secret_path(namespace: str, name: str | None = None) -> str:
    path = f"/api/v1/namespaces/{quote(namespace, safe='')}/secrets"
    return f"{path}/{quote(name, safe='')}" if name else path


def lease_path(namespace: str, name: str | None = None) -> str:
    path = f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace, safe='')}/leases"
    return f"{path}/{quote(name, safe='')}" if name else path
