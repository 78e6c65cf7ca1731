"""The node agent as the operator sees it: one typed interface over apply, holds and health,
and the readiness check the options ask for."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kube_audit.agent.apply import apply_node, needs_change, publish_identities, resume_node
from kube_audit.agent.current import read_current
from kube_audit.agent.health import HealthCheck
from kube_audit.agent.holds import (
    WebhookProbe,
    hold_of,
    kubelet_behind,
    revocation_of,
    revokes_only,
)
from kube_audit.agent.layout import HostLayout
from kube_audit.agent.records import NodeResult, read_state
from kube_audit.agent.webhook_files import webhook_answers
from kube_audit.core.manifest import flag_value
from kube_audit.core.plan import DesiredState
from kube_audit.core.retry import Hold


def health_check(
    layout: HostLayout, *, url: str | None, timeout: float, no_wait: bool
) -> HealthCheck | None:
    """The readiness check the options ask for (None: do not wait); one place for CLI and pod."""
    if no_wait:
        return None
    if url:
        return HealthCheck(
            url=url, ca_file=layout.host("/etc/kubernetes/pki/ca.crt"), timeout=timeout
        )
    return default_health_check(layout, timeout)


def default_health_check(layout: HostLayout, timeout: float) -> HealthCheck:
    """The local apiserver's /readyz over HTTPS, trusting the cluster CA on the host."""
    manifest = read_current(layout).manifest
    address = flag_value(manifest, "--advertise-address") or "127.0.0.1"
    port = flag_value(manifest, "--secure-port") or "6443"
    host = f"[{address}]" if ":" in address else address
    return HealthCheck(
        url=f"https://{host}:{port}/readyz",
        ca_file=layout.host("/etc/kubernetes/pki/ca.crt"),
        timeout=timeout,
    )


@dataclass(frozen=True)
class NodeAgent:
    """What the operator asks of this node's agent, through one typed interface: the agent's
    state file stays the agent's business."""

    layout: HostLayout
    health: HealthCheck | None
    # Wall-clock seconds: when a failure happened and when its retry is due.
    wall: Callable[[], float] = time.time
    webhook_probe: WebhookProbe | None = webhook_answers

    def publish_identities(self, desired: DesiredState) -> list[str]:
        return publish_identities(self.layout, desired, self.wall)

    def needs_change(self, desired: DesiredState) -> bool:
        return needs_change(self.layout, desired)

    def hold(self, desired: DesiredState) -> Hold | None:
        """Why this node does not apply ``desired`` now (an earlier failure of that content,
        not yet due for a retry, an admin's rollback, or a switch to webhook mode its webhook
        cannot take yet); None if it may."""
        return hold_of(self.layout, desired, self.wall(), self.webhook_probe)

    def revocation(self, desired: DesiredState) -> DesiredState | None:
        """The identities ``desired`` takes away, on their own, while it is held here."""
        return revocation_of(self.layout, desired, self.wall())

    def kubelet_behind(self) -> str | None:
        """Why the manifest must wait for kubelet before it is rewritten (see the function)."""
        return kubelet_behind(self.layout, self.health, self.wall())

    def removes_identities_only(self, desired: DesiredState) -> bool:
        """Going to ``desired`` only takes identities away: no failure elsewhere holds it."""
        return revokes_only(read_current(self.layout), desired)

    def pending(self) -> str | None:
        """The config hash an interrupted apply left unverified, if any."""
        value = read_state(self.layout).get("pending")
        return str(value) if value else None

    def apply(self, desired: DesiredState) -> NodeResult:
        return apply_node(
            self.layout,
            desired,
            self.health,
            retry_failed=False,
            wall=self.wall,
            webhook_probe=self.webhook_probe,
        )

    def resume(self) -> NodeResult | None:
        return resume_node(self.layout, self.health)
