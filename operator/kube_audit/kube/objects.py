"""kube-audit's own objects, Nodes and Pods: lists, reads and status patches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote

from kube_audit.constants import CONTROL_PLANE_LABEL, GROUP, OPERATOR_POD_SELECTOR
from kube_audit.errors import NotFound
from kube_audit.kube.transport import MERGE_PATCH, METADATA_ONLY, Transport, custom_path, drain


class Objects(Transport):
    def list_objects(self, plural: str) -> list[dict[str, Any]]:
        return list(self._items(f"list {plural}.{GROUP}", custom_path(plural)))

    def list_metadata(self, plural: str) -> Iterator[dict[str, Any]]:
        """Every object of a kind as the API server's PartialObjectMetadata: no spec, no
        status (the sync check before each plan lists both kinds, 10,000 users included)."""
        yield from self._items(f"list {plural}.{GROUP}", custom_path(plural), accept=METADATA_ONLY)

    def list_uids(self, plural: str) -> dict[str, str]:
        """Name -> uid of every object of a kind: a sync check, no bodies read."""
        out = {}
        for item in self.list_metadata(plural):
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
        return self._json(f"get {plural}.{GROUP}/{name}", "GET", custom_path(plural, name))

    def annotate_object(self, plural: str, name: str, annotations: Mapping[str, str]) -> None:
        """A JSON merge patch of ``metadata.annotations`` (others are kept)."""
        drain(
            self._send(
                f"annotate {plural}.{GROUP}/{name}",
                "PATCH",
                custom_path(plural, name),
                body={"metadata": {"annotations": dict(annotations)}},
                content_type=MERGE_PATCH,
            )
        )

    def patch_status(self, plural: str, name: str, patch: Mapping[str, Any]) -> None:
        """A JSON merge patch of ``status`` (each writer only touches its own keys)."""
        drain(
            self._send(
                f"patch {plural}.{GROUP}/{name}/status",
                "PATCH",
                custom_path(plural, name) + "/status",
                body={"status": dict(patch)},
                content_type=MERGE_PATCH,
            )
        )

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
