"""The rollout's side of a failure: a deletion is never stuck behind one, a failure that may be
transient is not marked for the other nodes, and a held node says so (report and metric)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from kube_audit.agent.layout import HostLayout
from kube_audit.constants import FAILED_ANNOTATION
from kube_audit.controller.rollout import KUBELET_POLL
from kube_audit.core.manifest import (
    config_hash_of,
    parse_manifest,
    render_manifest,
    unpatch_manifest,
)
from kube_audit.core.status import APPLIED, BLOCKED, PENDING, ROLLED_BACK
from tests.agent.conftest import desired
from tests.clock import ManualClock
from tests.operator.conftest import Harness, RolloutNode


async def test_a_deletion_goes_through_after_a_transient_failure(harness: Harness) -> None:
    clock = ManualClock()
    node = RolloutNode(harness, "cp-1", clock, desired("alice", "bob"))
    assert (await node.converge())[0] == APPLIED
    node.health.ready, node.health.transient = (lambda: False), True
    outcome, message, _ = await node.converge(desired("alice"))
    assert outcome == ROLLED_BACK and "not ready within" in message
    marks = node.rollout.lease.annotation(FAILED_ANNOTATION) or ""
    assert desired("alice").config_hash not in marks, "transient: the other nodes may try it"
    node.health.ready = lambda: True
    outcome, message, permanent = await node.converge()
    assert outcome == ROLLED_BACK and "only removes identities" in message and not permanent
    assert node.held() == 1 and b"bob" in node.tokens()
    clock.advance(301)
    outcome, message, _ = await node.converge()
    assert outcome == APPLIED, message
    assert node.held() == 0 and b"bob" not in node.tokens()


async def test_a_crash_is_marked_and_held_until_the_inputs_change(harness: Harness) -> None:
    clock = ManualClock()
    node = RolloutNode(harness, "cp-1", clock, desired("alice"))
    await node.converge()
    node.health.ready = lambda: False
    bad = desired("alice", "bob")
    outcome, message, _ = await node.converge(bad)
    assert outcome == ROLLED_BACK and "never answered" in message
    assert bad.config_hash in (node.rollout.lease.annotation(FAILED_ANNOTATION) or "")
    clock.advance(30 * 86400)
    outcome, message, permanent = await node.converge()
    assert outcome == ROLLED_BACK and permanent and "until the inputs change" in message
    node.health.ready = lambda: True
    assert (await node.converge(desired("alice", "carol")))[0] == APPLIED


async def test_a_crash_on_another_node_does_not_hold_a_deletion_here(harness: Harness) -> None:
    clock = ManualClock()
    here = RolloutNode(harness, "cp-2", clock, desired("alice", "bob"))
    assert (await here.converge())[0] == APPLIED
    other = RolloutNode(harness, "cp-1", clock, desired("alice"))
    assert await asyncio.to_thread(other.rollout.lease.try_acquire)
    for crashed in (desired("alice"), desired("alice", "bob", "carol")):
        assert await other.rollout._mark_failed(crashed.config_hash)
    await asyncio.to_thread(other.rollout.lease.release)
    outcome, message, _ = await here.converge(desired("alice", "bob", "carol"))
    assert outcome == BLOCKED and "crashed with this configuration on another node" in message
    outcome, message, _ = await here.converge(desired("alice"))
    assert outcome == APPLIED, message
    assert b"bob" not in here.tokens()


async def test_a_refused_policy_does_not_keep_a_deleted_persons_token(harness: Harness) -> None:
    """Before: while the refused policy stayed in the cluster, deleting bob gave a content that
    carried it; tried, refused, rolled back, held, and bob's token stayed for good."""
    clock = ManualClock()
    node = RolloutNode(harness, "cp-1", clock, desired("alice", "bob"))
    assert (await node.converge())[0] == APPLIED
    bad = [desired(*people, level="RequestResponse") for people in (("alice", "bob"), ("alice",))]
    node.health.refused = {d.config_hash for d in bad}
    outcome, message, _ = await node.converge(bad[0])
    assert outcome == ROLLED_BACK and "never answered" in message
    outcome, message, _ = await node.converge(bad[1])
    assert outcome == ROLLED_BACK and "never answered" in message, "the next content is tried"
    assert b"bob" in node.tokens()
    outcome, message, permanent = await node.converge()
    assert outcome == ROLLED_BACK and permanent, message
    assert "identities it removes were taken away on their own" in message
    assert b"bob" not in node.tokens() and b"alice" in node.tokens()
    layout = HostLayout.discover(node.config.host_root, node.config.settings)
    running = parse_manifest(layout.manifest.read_text())
    assert config_hash_of(running) == desired("alice").config_hash, "the policy that runs"
    assert node.held() == 1, "the policy change itself is still held"
    outcome, message, _ = await node.converge()
    assert outcome == ROLLED_BACK and "until the inputs change" in message
    assert "taken away" not in message, "nothing more to take away"
    node.health.refused = set()
    assert (await node.converge(desired("alice", level="Request")))[0] == APPLIED


async def test_a_failure_mark_still_owed_goes_before_the_revocation(harness: Harness) -> None:
    """The crash could not be marked on the Lease yet (API down): the node keeps the Lease and
    applies nothing, not even the revocation, until the mark is recorded; the other nodes must
    not restart into that config meanwhile."""
    clock = ManualClock()
    node = RolloutNode(harness, "cp-1", clock, desired("alice", "bob"))
    assert (await node.converge())[0] == APPLIED
    bad = desired("alice", level="RequestResponse")
    node.health.refused = {bad.config_hash}
    owed: list[str] = []

    async def api_down(config_hash: str) -> bool:
        owed.append(config_hash)
        node.rollout._unmarked = config_hash
        return False

    real_mark = node.rollout._mark_failed
    node.rollout._mark_failed = api_down  # type: ignore[method-assign]
    outcome, _, _ = await node.converge(bad)
    assert outcome == ROLLED_BACK and owed == [bad.config_hash]
    outcome, message, _ = await node.converge()
    assert outcome == ROLLED_BACK and "taken away" not in message and b"bob" in node.tokens()
    node.rollout._mark_failed = real_mark  # type: ignore[method-assign]
    outcome, message, _ = await node.converge()
    assert "taken away on their own" in message and b"bob" not in node.tokens()
    assert bad.config_hash in (node.rollout.lease.annotation(FAILED_ANNOTATION) or "")


async def test_a_crash_elsewhere_does_not_keep_a_deleted_persons_token_here(
    harness: Harness,
) -> None:
    clock = ManualClock()
    here = RolloutNode(harness, "cp-2", clock, desired("alice", "bob"))
    assert (await here.converge())[0] == APPLIED
    other = RolloutNode(harness, "cp-1", clock, desired("alice"))
    bad = desired("alice", level="RequestResponse")
    assert await asyncio.to_thread(other.rollout.lease.try_acquire)
    assert await other.rollout._mark_failed(bad.config_hash)
    await asyncio.to_thread(other.rollout.lease.release)
    outcome, message, _ = await here.converge(bad)
    assert outcome == BLOCKED and "crashed with this configuration on another node" in message
    assert "taken away on their own" in message and b"bob" not in here.tokens()
    assert here.health.journal, "one restart, for the revocation"


async def test_a_rewrite_during_the_wait_is_no_failure(harness: Harness) -> None:
    """kubeadm rewrote the manifest while our new apiserver was being waited for (seen on the
    real control plane): not rolled back over, no failure recorded, Pending (not Blocked), and
    our config goes on again at the next look."""
    clock = ManualClock()
    node = RolloutNode(harness, "cp-1", clock, desired("alice"))
    assert (await node.converge())[0] == APPLIED
    manifest = HostLayout.discover(node.config.host_root, node.config.settings).manifest

    def kubeadm_writes() -> bool:
        manifest.write_text(render_manifest(unpatch_manifest(parse_manifest(manifest.read_text()))))
        return False

    node.health.ready, node.health.transient = kubeadm_writes, True
    outcome, message, permanent = await node.converge(desired("alice", "bob"))
    assert outcome == PENDING and "rewritten by someone else" in message and not permanent
    assert node.held() == 0 and node.metrics.blocked._value.get() == 0
    node.health.ready = lambda: True
    outcome, message, _ = await node.converge()
    assert outcome == APPLIED, message
    assert b"bob" in node.tokens()


async def test_a_manifest_kubelet_does_not_run_yet_is_left_to_its_writer(harness: Harness) -> None:
    """kubeadm upgrade rewrote the manifest (our flags gone) and waits for kubelet to run it:
    the rollout does not write ours back until the mirror pod shows kubeadm's instance running,
    says why (Pending, looked at again in a few seconds), and keeps no Lease meanwhile."""
    clock = ManualClock()
    node = RolloutNode(harness, "cp-1", clock, desired("alice"))
    assert (await node.converge())[0] == APPLIED
    manifest = HostLayout.discover(node.config.host_root, node.config.settings).manifest
    kubeadms = render_manifest(unpatch_manifest(parse_manifest(manifest.read_text())))
    manifest.write_text(kubeadms)
    clock.wall = datetime.fromtimestamp(manifest.stat().st_mtime + 4, UTC)
    node.health.instance = lambda want: (False, "mirror pod runs config 0123456789abcdef")
    report = await node.rollout.converge(asyncio.Event())
    assert report.outcome == PENDING and not report.permanent
    assert "written 4s ago by another writer (kubeadm upgrade?)" in report.message, report.message
    assert report.retry_at == clock.now().timestamp() + KUBELET_POLL
    assert manifest.read_text() == kubeadms
    assert not await asyncio.to_thread(node.rollout.lease.holds)
    node.health.instance = lambda want: (True, "mirror pod shows the instance started after")
    assert (await node.converge())[0] == APPLIED
    assert b"alice" in node.tokens()
