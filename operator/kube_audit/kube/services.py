"""The audit store's address (the VictoriaLogs component's ConfigMap) and questions to it
through the API server's service proxy, with the caller's own credentials and RBAC."""

from __future__ import annotations

from urllib.parse import quote

from kube_audit.constants import STORE_CONFIGMAP
from kube_audit.errors import NotFound
from kube_audit.kube.transport import Transport, drain


class Services(Transport):
    def audit_store_config(self, namespace: str) -> dict[str, str] | None:
        """The component's ConfigMap data; None when the install has none (no store)."""
        try:
            found = self._json(
                f"get ConfigMap {namespace}/{STORE_CONFIGMAP}",
                "GET",
                f"/api/v1/namespaces/{quote(namespace)}/configmaps/{STORE_CONFIGMAP}",
            )
        except NotFound:
            return None
        data = found.get("data") or {}
        return {str(k): str(v) for k, v in data.items()}

    def get_through_service(
        self, proxy_path: str, params: dict[str, str], what: str, timeout: float
    ) -> bytes:
        """GET a path of a Service through ``services/proxy``; its whole answer."""
        return drain(
            self._send(what, "GET", proxy_path, query=params, accept="*/*", timeout=(10.0, timeout))
        )
