"""Stopping mid-apply (kubelet's SIGTERM on a DaemonSet update): the operator's tasks are
cancelled, but the apply goes on in its thread for up to two health waits, and this node's
apiserver may be down all that time. The rollout Lease must stay renewed until the apply
returns, or it lapses and another node restarts its apiserver too."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from kube_audit.agent.layout import HostLayout
from kube_audit.agent.records import read_state
from tests.agent.conftest import desired
from tests.clock import ManualClock
from tests.operator.conftest import Harness, RolloutNode


async def test_the_lease_is_renewed_until_an_interrupted_apply_returns(harness: Harness) -> None:
    node = RolloutNode(harness, "cp-1", ManualClock(), desired("alice"))
    node.health.seconds = 1.5  # the health wait the apply is in when SIGTERM comes
    lease = node.rollout.lease
    lease.renew_interval = 0.1
    renewals: list[float] = []
    renew = lease.renew

    def counted() -> bool:
        renewals.append(time.monotonic())
        return renew()

    lease.renew = counted  # type: ignore[method-assign]
    task = asyncio.create_task(node.rollout.converge(asyncio.Event()))
    while not renewals:
        await asyncio.sleep(0.02)
    task.cancel()  # what the reconciler's shutdown does to it
    with contextlib.suppress(asyncio.CancelledError):
        await task
    stopped_at = time.monotonic()
    layout = HostLayout.discover(node.config.host_root, node.config.settings)
    while read_state(layout).get("lastGood") != desired("alice").config_hash:
        await asyncio.sleep(0.05)  # the apply goes on in its thread and finishes
    finished_at = time.monotonic()
    after = [t for t in renewals if t > stopped_at]
    assert len(after) >= 5, f"renewed {len(after)} times after the stop"
    assert after[-1] > finished_at - 0.5, "renewed until the apply returned"
    while any(t.name == "rollout lease renewal" for t in threading.enumerate()):
        await asyncio.sleep(0.02)  # and the renewal ends with it
    assert await asyncio.to_thread(lease.holds), "kept for this node's next pod to release"
