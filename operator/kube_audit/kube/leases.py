"""Leases: the rollout and status locks, and each node's record of what it runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kube_audit.constants import NODE_LEASE_PREFIX
from kube_audit.errors import NotFound
from kube_audit.kube.transport import MERGE_PATCH, Transport, drain, lease_path


class Leases(Transport):
    def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._json(f"read Lease {namespace}/{name}", "GET", lease_path(namespace, name))
        except NotFound:
            return None

    def create_lease(self, namespace: str, body: Mapping[str, Any]) -> bool:
        return self._write_unless_conflict(
            f"create Lease {namespace}", "POST", lease_path(namespace), body=dict(body)
        )

    def replace_lease(self, namespace: str, name: str, body: Mapping[str, Any]) -> bool:
        """Replace with the body's resourceVersion as precondition; False on a lost race."""
        return self._write_unless_conflict(
            f"replace Lease {namespace}/{name}", "PUT", lease_path(namespace, name), body=dict(body)
        )

    def node_records(self, namespace: str) -> dict[str, dict[str, str]]:
        """Node name -> the annotations of its node Lease (what it runs, its last outcome)."""
        out = {}
        for item in self._items(f"list Leases in {namespace}", lease_path(namespace)):
            meta = item.get("metadata") or {}
            name = str(meta.get("name") or "")
            if name.startswith(NODE_LEASE_PREFIX):
                notes = meta.get("annotations") or {}
                out[name.removeprefix(NODE_LEASE_PREFIX)] = {k: str(v) for k, v in notes.items()}
        return out

    def write_node_record(
        self, namespace: str, node: str, annotations: Mapping[str, str | None], renew_time: str
    ) -> None:
        """Create or update this node's Lease: its holder is the node, its annotations say
        what it runs; a merge patch, so each node writes only its own and never conflicts
        (an annotation given as None is removed)."""
        name = f"{NODE_LEASE_PREFIX}{node}"
        body = {
            "metadata": {"name": name, "annotations": dict(annotations)},
            "spec": {"holderIdentity": node, "renewTime": renew_time},
        }
        try:
            drain(
                self._send(
                    f"patch Lease {namespace}/{name}",
                    "PATCH",
                    lease_path(namespace, name),
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
                    "annotations": {k: v for k, v in annotations.items() if v is not None},
                },
                "spec": {"holderIdentity": node, "renewTime": renew_time},
            }
            self.create_lease(namespace, create)
