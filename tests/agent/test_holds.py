"""What holds a config back on a node after it failed there, and what never does.

A failure mark holds that exact content only; a failure that may be transient is retried with
back-off; the new apiserver crashing holds the content until the inputs change; a change that
only removes identities is never held for long; an admin's rollback stands until the objects
change.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from kube_audit.agent.apply import apply_node
from kube_audit.agent.health import Expectation, HealthCheck, mirror_pod_verdict
from kube_audit.agent.holds import WRITER_WAIT, hold_of, kubelet_behind, revocation_of
from kube_audit.agent.layout import HostLayout
from kube_audit.agent.records import read_state
from kube_audit.agent.rollback import rollback_node
from kube_audit.core.manifest import (
    HASH_ANNOTATION,
    WEBHOOK_CONFIG_FLAG,
    config_hash_of,
    flag_value,
    parse_manifest,
    render_manifest,
    unpatch_manifest,
)
from kube_audit.core.plan import POLICY_FILE, DesiredState
from kube_audit.core.settings import Settings
from kube_audit.errors import RolledBack, WebhookNotAnswering
from tests.agent.conftest import FakeNode, desired, health


def _running(layout: HostLayout) -> str:
    return config_hash_of(parse_manifest(layout.manifest.read_text())) or ""


def _running_of(manifest: bytes) -> str:
    return config_hash_of(parse_manifest(manifest.decode())) or ""


def _tokens(layout: HostLayout) -> bytes:
    path = flag_value(parse_manifest(layout.manifest.read_text()), "--token-auth-file") or ""
    return layout.host(path).read_bytes()


def _later(seconds: float) -> float:
    return time.time() + seconds


def _fail_once(
    layout: HostLayout,
    node: FakeNode,
    url: str,
    target: DesiredState,
    *,
    crash: bool,
    after: float = 0.0,
) -> RolledBack:
    """The new apiserver for ``target`` answers 500 (or never answers) during one wait."""
    if crash:
        node.crashes = lambda m: config_hash_of(m) == target.config_hash
    else:
        node.healthy = lambda m: config_hash_of(m) != target.config_hash
    with pytest.raises(RolledBack) as info:
        check = health(url, timeout=0.6)
        apply_node(layout, target, check, retry_failed=False, wall=lambda: _later(after))
    node.crashes = lambda m: False
    node.healthy = lambda m: True
    return info.value


def test_a_deletion_is_applied_after_a_transient_failure_of_it(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    """Before: one timeout while removing bob held that content forever ("skipped-failed"),
    and bob's token stayed in the file."""
    node, url = fake_node
    both, alice_only = desired("alice", "bob"), desired("alice")
    apply_node(layout, both, health(url))
    error = _fail_once(layout, node, url, alice_only, crash=False)
    assert not error.crashed and "HTTP 500" in str(error)
    assert b"bob" in _tokens(layout), "rolled back: bob is still there"
    soon = apply_node(layout, alice_only, health(url), retry_failed=False, wall=lambda: _later(30))
    assert soon.outcome == "held" and "only removes identities" in soon.message
    result = apply_node(
        layout, alice_only, health(url), retry_failed=False, wall=lambda: _later(301)
    )
    assert result.outcome == "applied", result.message
    assert b"bob" not in _tokens(layout)
    assert read_state(layout)["failures"] == {}, "a success clears the content's failures"


def test_a_deletion_is_retried_even_after_the_apiserver_crashed_with_it(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    node, url = fake_node
    both, alice_only = desired("alice", "bob"), desired("alice")
    apply_node(layout, both, health(url))
    assert _fail_once(layout, node, url, alice_only, crash=True).crashed
    hold = hold_of(layout, alice_only, _later(60))
    assert hold is not None and hold.retry_at is not None, "a revocation is never held for good"
    result = apply_node(
        layout, alice_only, health(url), retry_failed=False, wall=lambda: _later(301)
    )
    assert result.outcome == "applied" and b"bob" not in _tokens(layout)


def _policy(layout: HostLayout) -> bytes:
    path = flag_value(parse_manifest(layout.manifest.read_text()), "--audit-policy-file") or ""
    return layout.host(path).read_bytes()


def test_a_refused_policy_does_not_hold_back_a_deletion(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    """The content that deletes bob carries a policy the apiserver refuses: it is rolled back
    and held, and the deletion goes on the running config by itself (its policy, one
    restart); nothing is left to take away after that."""
    node, url = fake_node
    before = desired("alice", "bob")
    apply_node(layout, before, health(url))
    refused = desired("alice", level="RequestResponse")
    assert _fail_once(layout, node, url, refused, crash=True).crashed
    assert revocation_of(layout, before, _later(1)) is None, "nothing to take away"
    step = revocation_of(layout, refused, _later(1))
    assert step is not None and step.config_hash == desired("alice").config_hash
    result = apply_node(layout, step, health(url), retry_failed=False)
    assert result.outcome == "applied" and result.restarted
    assert b"bob" not in _tokens(layout) and b"alice" in _tokens(layout)
    assert _policy(layout) == before.files[POLICY_FILE], "the policy that ran before"
    assert hold_of(layout, refused, _later(10**6)) is not None, "the policy change stays held"
    assert revocation_of(layout, refused, _later(1)) is None


def test_an_admins_rollback_never_brings_back_a_deleted_person(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    """Before (issue 36 finding 1): an admin's rollback to a backup that still had bob held
    the content it left, with no revocation step, so bob's token worked on that node alone.
    A rollback restores a state of the node, not a person deleted since: bob's line goes on
    the restored config (its policy), and the admin's hold on the newer content stands."""
    _node, url = fake_node
    both, alice_only = desired("alice", "bob"), desired("alice")
    apply_node(layout, both, health(url))
    other = desired("alice", level="Request")  # bob gone and a new policy
    apply_node(layout, other, health(url))
    rollback_node(layout, health(url))
    assert b"bob" in _tokens(layout), "the rollback restored the backup with bob"
    step = revocation_of(layout, other, _later(1))
    assert step is not None and step.config_hash == alice_only.config_hash
    result = apply_node(layout, step, health(url), retry_failed=False)
    assert result.outcome == "applied" and b"bob" not in _tokens(layout)
    assert _policy(layout) == both.files[POLICY_FILE], "the rolled-back policy stays"
    hold = hold_of(layout, other, _later(10**6))
    assert hold is not None and hold.by_admin, "the admin's rollback still stands"
    assert revocation_of(layout, other, _later(1)) is None, "nothing left to take away"


WEBHOOK = Settings(identity_mode="webhook")


def _in_webhook_mode(layout: HostLayout) -> HostLayout:
    return replace(layout, settings=WEBHOOK)


def test_a_failed_switch_to_webhook_mode_never_keeps_a_deleted_persons_token(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    """Issue 36 finding 1: the switch to webhook mode crashes and is rolled back to the token
    file with alice and bob. Webhook mode's content names no people, so bob's deletion leaves
    its hash (and the hold) as they were, and the revocation step used to be built in webhook
    mode, where the running token file has no place: none, bob live on this node for good.
    Now the step is built in the mode the node runs."""
    node, url = fake_node
    apply_node(layout, desired("alice", "bob"), health(url))
    webhook = _in_webhook_mode(layout)
    switch = desired("alice", "bob", settings=WEBHOOK)
    node.crashes = lambda m: flag_value(m, WEBHOOK_CONFIG_FLAG) is not None
    with pytest.raises(RolledBack):
        apply_node(webhook, switch, health(url, timeout=0.6), retry_failed=False,
                   webhook_probe=None)  # fmt: skip
    node.crashes = lambda m: False
    bob_gone = desired("alice", settings=WEBHOOK)
    assert bob_gone.config_hash == switch.config_hash, "people are not in webhook mode's hash"
    assert b"bob" in _tokens(layout)
    hold = hold_of(webhook, bob_gone, _later(10**6))
    assert hold is not None and "AuditPolicies or the operator's settings" in hold.message
    step = revocation_of(webhook, bob_gone, _later(1))
    assert step is not None and not step.webhook_mode
    result = apply_node(webhook, step, health(url), retry_failed=False, webhook_probe=None)
    assert result.outcome == "applied" and result.restarted
    assert b"bob" not in _tokens(layout) and b"alice" in _tokens(layout)
    manifest = parse_manifest(layout.manifest.read_text())
    assert flag_value(manifest, WEBHOOK_CONFIG_FLAG) is None, "still the token file it ran"
    assert hold_of(webhook, bob_gone, _later(10**6)) is not None, "the switch stays held"
    assert revocation_of(webhook, bob_gone, _later(1)) is None


def test_an_admins_rollback_out_of_webhook_mode_brings_back_no_token(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    """Issue 36 findings 1 and 2, by hand: `kube-audit node rollback` from a verified webhook
    mode used to restore the token file the node ran before, bob (deleted since) in it, held
    there for good. Its backup is gone once webhook mode is verified: the rollback goes to
    the manifest kube-audit found, which names no token file, and the admin's hold stands."""
    _node, url = fake_node
    apply_node(layout, desired("alice", "bob"), health(url))
    webhook = _in_webhook_mode(layout)
    switch = desired("alice", "bob", settings=WEBHOOK)
    assert apply_node(webhook, switch, health(url), webhook_probe=None).outcome == "applied"
    rollback_node(webhook, health(url))
    manifest = parse_manifest(layout.manifest.read_text())
    assert flag_value(manifest, "--token-auth-file") is None, "no token file to go back to"
    assert flag_value(manifest, WEBHOOK_CONFIG_FLAG) is None
    bob_gone = desired("alice", settings=WEBHOOK)
    assert revocation_of(webhook, bob_gone, _later(1)) is None, "nothing runs bob's token"
    hold = hold_of(webhook, bob_gone, _later(10**6))
    assert hold is not None and hold.by_admin, "the admin's rollback stands"


def test_a_switch_its_webhook_cannot_take_is_held_and_a_deletion_goes_meanwhile(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    """The DaemonSet says webhook mode, but the node's authn-webhook does not answer: the
    switch used to fail on every try (an error, retried), which no revocation followed, so
    bob, deleted meanwhile, stayed in the token file the node runs. Now the switch is a hold
    that waits (looked at again in seconds), and bob goes as for any other hold."""
    _node, url = fake_node
    apply_node(layout, desired("alice", "bob"), health(url))
    webhook = _in_webhook_mode(layout)
    bob_gone = desired("alice", settings=WEBHOOK)

    def silent(_layout: HostLayout) -> str:
        return "https://127.0.0.1:6441/healthz: connection refused"

    hold = hold_of(webhook, bob_gone, 1000.0, silent)
    assert hold is not None and hold.waiting and hold.retry_at == 1000.0 + 10
    assert "connection refused" in hold.message and not hold.by_admin
    assert hold_of(webhook, bob_gone, 1000.0, None) is None, "nothing else holds it"
    step = revocation_of(webhook, bob_gone, 1000.0)
    assert step is not None
    result = apply_node(webhook, step, health(url), retry_failed=False, webhook_probe=silent)
    assert result.outcome == "applied" and b"bob" not in _tokens(layout)
    with pytest.raises(WebhookNotAnswering):
        apply_node(webhook, bob_gone, health(url), retry_failed=False, webhook_probe=silent)
    assert b"alice" in _tokens(layout), "the token file stays while the webhook is silent"


def test_a_transient_failure_is_retried_with_back_off(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    node, url = fake_node
    good, more = desired("alice"), desired("alice", "bob")
    apply_node(layout, good, health(url))
    _fail_once(layout, node, url, more, crash=False)
    held = apply_node(layout, more, health(url), retry_failed=False, wall=lambda: _later(60))
    assert held.outcome == "held" and "retried after" in held.message
    assert _running(layout) == good.config_hash
    _fail_once(layout, node, url, more, crash=False, after=121)  # the second doubles the wait
    second = read_state(layout)["failures"][more.config_hash]
    assert second["count"] == 2
    assert hold_of(layout, more, second["at"] + 200) is not None, "4 minutes after the second"
    assert hold_of(layout, more, second["at"] + 241) is None
    result = apply_node(layout, more, health(url), retry_failed=False, wall=lambda: _later(400))
    assert result.outcome == "applied" and _running(layout) == more.config_hash


def test_a_crash_holds_that_content_only_until_the_inputs_change(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    node, url = fake_node
    good, bad = desired("alice"), desired("alice", "bob")
    apply_node(layout, good, health(url))
    error = _fail_once(layout, node, url, bad, crash=True)
    assert error.crashed and "never answered" in str(error)
    far = _later(30 * 86400)
    hold = hold_of(layout, bad, far)
    assert hold is not None and hold.retry_at is None and "until the inputs change" in hold.message
    other = desired("alice", "bob", "carol")
    result = apply_node(layout, other, health(url), retry_failed=False, wall=lambda: far)
    assert result.outcome == "applied", "the next different content is tried"
    by_hand = apply_node(layout, bad, health(url), retry_failed=True)
    assert by_hand.outcome == "applied", "an admin may still apply it by hand"


def test_a_failure_mark_of_an_earlier_version_still_holds(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    """0.1.0 wrote a plain list of failed hashes: read as crashes, as it meant them."""
    _node, url = fake_node
    good, bad = desired("alice"), desired("alice", "bob")
    apply_node(layout, good, health(url))
    state = read_state(layout)
    layout.state_file.write_text(json.dumps({**state, "failed": [bad.config_hash]}))
    result = apply_node(layout, bad, health(url), retry_failed=False, wall=lambda: _later(10**6))
    assert result.outcome == "held" and "recorded by an earlier version" in result.message


def test_an_admins_rollback_stands_until_the_objects_change(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    """Before: the operator re-applied within seconds what `kube-audit node rollback` left."""
    _node, url = fake_node
    first, second = desired("alice"), desired("alice", "bob")
    apply_node(layout, first, health(url))
    apply_node(layout, second, health(url))
    rollback_node(layout, health(url))
    assert _running(layout) == first.config_hash
    again = apply_node(layout, second, health(url), retry_failed=False)
    assert again.outcome == "held" and "an admin rolled this node back" in again.message
    assert _running(layout) == first.config_hash, "the rollback stands"
    hold = hold_of(layout, second, _later(10**6))
    assert hold is not None and hold.by_admin and hold.retry_at is None
    third = desired("alice", "carol")
    assert apply_node(layout, third, health(url), retry_failed=False).outcome == "applied"
    back = apply_node(layout, second, health(url), retry_failed=False)
    assert back.outcome == "applied", "the objects changed since: the content may come back"


def _mirror_pod(config_hash: str, started: float, ready: bool = True) -> dict[str, Any]:
    """kubelet's mirror pod of kube-apiserver as the API returns it."""
    stamp = datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "metadata": {"annotations": {HASH_ANNOTATION: config_hash} if config_hash else {}},
        "status": {
            "containerStatuses": [{"ready": ready, "state": {"running": {"startedAt": stamp}}}]
        },
    }


def test_a_manifest_another_writer_just_wrote_waits_until_kubelet_runs_it(
    layout: HostLayout,
) -> None:
    """kubeadm upgrade writes its manifest and waits for the mirror pod's hash to change: put
    ours back before kubelet ran kubeadm's and the hash never changes, so kubeadm fails. The
    agent says why it waits; once the mirror pod shows an apiserver started after that write
    (or the write is older than kubeadm's own 5 minutes), it may write."""
    apply_node(layout, desired("alice"), None)
    ours = layout.manifest.read_bytes()
    kubeadms = render_manifest(unpatch_manifest(parse_manifest(ours.decode())))
    layout.manifest.write_text(kubeadms)
    # in ns, as the agent reads it: the float st_mtime may differ from it in the last bit
    written = layout.manifest.stat().st_mtime_ns / 1e9
    pod = {"now": _mirror_pod(_running_of(ours), written - 60)}  # the instance before kubeadm's
    asked: list[Expectation] = []

    def instance(want: Expectation) -> tuple[bool | None, str]:
        asked.append(want)
        return mirror_pod_verdict(pod["now"], want)

    check = HealthCheck(url="", instance=instance)
    why = kubelet_behind(layout, check, now=written + 12)
    assert why is not None and "written 12s ago by another writer (kubeadm upgrade?)" in why
    assert "mirror pod runs config" in why, why
    assert asked == [Expectation("", written)], "kubeadm's manifest carries no hash of ours"
    assert kubelet_behind(layout, check, now=written + WRITER_WAIT + 1) is None, "not for ever"
    pod["now"] = _mirror_pod("", written + 3, ready=False)
    assert "not ready yet" in (kubelet_behind(layout, check, now=written + 20) or "")
    pod["now"] = _mirror_pod("", written + 3)
    assert kubelet_behind(layout, check, now=written + 25) is None
    assert layout.manifest.read_text() == kubeadms, "only reads"


def test_nothing_waits_where_the_api_cannot_tell_or_the_wait_is_ours(layout: HostLayout) -> None:
    apply_node(layout, desired("alice"), None)
    written = layout.manifest.stat().st_mtime_ns / 1e9
    assert kubelet_behind(layout, None, now=written + 1) is None
    no_api = HealthCheck(url="", instance=lambda want: (None, "cannot read the mirror pod"))
    assert kubelet_behind(layout, no_api, now=written + 1) is None
    behind = HealthCheck(url="", instance=lambda want: (False, "the new container is not ready"))
    assert kubelet_behind(layout, behind, now=written + 1) is not None
    state = read_state(layout)
    layout.state_file.write_text(json.dumps({**state, "pending": "abc", "pendingSince": 1.0}))
    assert kubelet_behind(layout, behind, now=written + 1) is None, "the apply resumes its own"
