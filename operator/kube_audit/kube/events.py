"""Events on kube-audit's objects, where ``kubectl describe`` and ``kubectl events`` show them."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kube_audit.constants import EVENT_NAMESPACE, GROUP, VERSION
from kube_audit.kube.transport import Transport, drain


class Events(Transport):
    def create_event(
        self,
        obj: Mapping[str, Any],
        kind: str,
        event_type: str,
        reason: str,
        message: str,
        *,
        api_version: str = f"{GROUP}/{VERSION}",
    ) -> None:
        """A core/v1 Event on a cluster-scoped object, one of ours by default or a Node (such
        Events live in ``default``)."""
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
                "apiVersion": api_version,
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
        drain(
            self._send(
                "create Event", "POST", f"/api/v1/namespaces/{EVENT_NAMESPACE}/events", body=body
            )
        )
