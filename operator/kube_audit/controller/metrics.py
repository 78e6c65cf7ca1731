"""Prometheus metrics of one operator pod (a registry per runtime, so tests can run several)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.applies = Counter(
            "kube_audit_applies", "Agent applies that changed the node", registry=r
        )
        self.failures = Counter("kube_audit_failures", "Reconciles that failed", registry=r)
        self.rollbacks = Counter("kube_audit_rollbacks", "Applies rolled back", registry=r)
        self.restarts = Counter(
            "kube_audit_apiserver_restarts", "kube-apiserver restarts caused", registry=r
        )
        self.last_success = Gauge(
            "kube_audit_last_success_timestamp_seconds", "Last successful reconcile", registry=r
        )
        self.invalid = Gauge("kube_audit_invalid_objects", "Objects refused as invalid", registry=r)
        self.expiry = Gauge(
            "kube_audit_user_expiry_seconds",
            "Seconds until an AuditUser's spec.expiresAt (0 once expired); only users with one",
            ["audituser"],
            registry=r,
        )
        self.stale_snapshots = Gauge(
            "kube_audit_stale_snapshot_nodes",
            "Webhook mode, on the pod that writes conditions: control-plane nodes whose "
            "identity snapshot their operator has not confirmed within --snapshot-stale-after",
            registry=r,
        )
        self.blocked = Gauge(
            "kube_audit_node_blocked",
            "1 while this node cannot be managed (a manifest we must not take over, an "
            "unusable kubelet config): see the objects' status and Events",
            registry=r,
        )
        self.held = Gauge(
            "kube_audit_node_held",
            "1 while this node does not apply the wanted config: it failed here (retried with "
            "back-off unless the apiserver crashed with it) or an admin rolled it back",
            registry=r,
        )
        self.status_patches = Counter(
            "kube_audit_status_patches", "Status patches written by this pod", registry=r
        )
        self.events = Counter("kube_audit_events", "Events posted by this pod", registry=r)

    def serve(self, address: str, port: int) -> None:
        start_http_server(port, addr=address, registry=self.registry)
