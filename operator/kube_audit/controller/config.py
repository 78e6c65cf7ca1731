"""The settings of one operator pod (flags and environment of ``kube-audit operator``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kube_audit.agent.health import HealthCheck
from kube_audit.agent.holds import WebhookProbe
from kube_audit.agent.layout import DEFAULT_KUBELET_CONFIG, HostLayout
from kube_audit.agent.webhook_files import webhook_answers
from kube_audit.constants import SHIP_REPORT_SECONDS, SHIP_STALLED_AFTER
from kube_audit.core.settings import Settings


@dataclass(frozen=True)
class OperatorConfig:
    node_name: str
    host_root: Path = Path("/")
    kubelet_config: str = DEFAULT_KUBELET_CONFIG
    settings: Settings = field(default_factory=Settings)
    namespace: str = "kube-audit"
    # Quiet time after the last change before planning, and the most a stream of changes may
    # delay a plan.
    debounce: float = 3.0
    # Webhook mode: the quiet time of a burst of people and token Secrets alone (no restart).
    identity_debounce: float = 0.5
    max_debounce: float = 30.0
    resync: float = 300.0
    # Webhook mode: a node's snapshot not confirmed for this long is shown stale on the
    # AuditUsers' status and with an Event (it is confirmed on every reconcile: above resync).
    snapshot_stale_after: float = 900.0
    # With the audit store: how often the ship report is copied and judged, and the age past
    # which a node is shown not shipping (constants.py says why these).
    ship_report_every: float = SHIP_REPORT_SECONDS
    ship_stalled_after: float = SHIP_STALLED_AFTER
    health_url: str | None = None
    timeout: float = 180.0
    no_wait: bool = False
    # After a restart, how long the new apiserver must have been ready before the next node
    # may restart its own: at least the time your load balancer takes to mark a server healthy
    # again (HAProxy: rise x inter; cloud load balancers: healthy threshold x interval).
    min_ready: float = 10.0
    lease_poll: float = 2.0
    manifest_poll: float = 2.0
    retry_backoff: float = 5.0
    health_factory: Callable[[HostLayout], HealthCheck | None] | None = None
    # Whether this node's authn-webhook answers with the node's current people: asked before a
    # switch to webhook mode, and in webhook mode before a person is called live here.
    webhook_probe: WebhookProbe | None = webhook_answers
    # How often to ask again while it does not.
    webhook_poll: float = 5.0

    @property
    def rollout_lease_seconds(self) -> int:
        """Longer than an apply's health wait and a rollback's; renewed while applying."""
        return int(2 * self.timeout + 120)

    def layout(self) -> HostLayout:
        return HostLayout.discover(self.host_root, self.settings, self.kubelet_config)
