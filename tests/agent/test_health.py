"""Waiting for the new apiserver, and rolling back when it never gets ready."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from kube_audit.agent.apply import apply_node, needs_change
from kube_audit.agent.health import (
    Expectation,
    HealthCheck,
    HealthOutcome,
    may_carry_token,
    mirror_pod_verdict,
)
from kube_audit.agent.holds import hold_of
from kube_audit.agent.layout import HostLayout
from kube_audit.agent.records import read_state
from kube_audit.agent.rollback import rollback_node
from kube_audit.core.manifest import config_hash_of, flag_value, parse_manifest
from kube_audit.errors import ManifestError, RewrittenDuringWait, RolledBack
from tests.agent.conftest import FakeNode, desired, health
from tests.conftest import kubeadm_manifest_text


def test_waits_for_the_new_instance(layout: HostLayout, fake_node: tuple[FakeNode, str]) -> None:
    node, url = fake_node
    result = apply_node(layout, desired("alice"), health(url))
    assert result.outcome == "applied"
    assert node.running == layout.manifest.read_text(), "the instance that answered is the new one"
    assert read_state(layout)["pending"] is None


def test_unhealthy_new_apiserver_is_rolled_back(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    node, url = fake_node
    good, bad = desired("alice"), desired("alice", "bob")
    apply_node(layout, good, health(url))
    node.healthy = lambda m: config_hash_of(m) != bad.config_hash
    with pytest.raises(RolledBack, match=r"never became ready.*HTTP 500.*ready again") as info:
        apply_node(layout, bad, health(url, timeout=1.0))
    assert info.value.failed_hash == bad.config_hash
    assert config_hash_of(parse_manifest(layout.manifest.read_text())) == good.config_hash
    token = flag_value(parse_manifest(layout.manifest.read_text()), "--token-auth-file") or ""
    assert layout.host(token).read_bytes() == good.files["tokens.csv"]
    state = read_state(layout)
    assert list(state["failures"]) == [bad.config_hash] and state["lastGood"] == good.config_hash
    skipped = apply_node(layout, bad, health(url), retry_failed=False)
    assert skipped.outcome == "held"
    assert config_hash_of(parse_manifest(layout.manifest.read_text())) == good.config_hash


def test_old_instance_that_never_goes_away_is_not_mistaken_for_the_new(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    node, url = fake_node
    node.kubelet_alive = False
    with pytest.raises(RolledBack, match="did not restart"):
        apply_node(layout, desired("alice"), health(url, timeout=0.5))


def test_flapping_apiserver_is_rolled_back(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    node, url = fake_node
    target = desired("alice")
    flip = iter(range(10**6))
    node.healthy = lambda m: config_hash_of(m) != target.config_hash or next(flip) % 2 == 0
    with pytest.raises(RolledBack, match="not ready within"):
        apply_node(layout, target, health(url, timeout=0.8))
    assert config_hash_of(parse_manifest(layout.manifest.read_text())) is None


def test_slow_endpoint_counts_as_not_ready(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    node, url = fake_node
    node.delay = 0.3
    check = HealthCheck(url=url, timeout=0.6, interval=0.01, probe_timeout=0.1)
    with pytest.raises(RolledBack, match=r"did not restart|timed out|unreachable"):
        apply_node(layout, desired("alice"), check)


def test_endpoint_down_for_good(layout: HostLayout) -> None:
    check = HealthCheck(
        url="http://127.0.0.1:9/readyz", timeout=0.3, interval=0.01, probe_timeout=0.1
    )
    with pytest.raises(RolledBack, match="unreachable"):
        apply_node(layout, desired("alice"), check)
    assert config_hash_of(parse_manifest(layout.manifest.read_text())) is None


def test_interrupted_wait_is_resumed_by_next_apply(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    _node, url = fake_node
    target = desired("alice")

    class Interrupted(BaseException):
        pass

    def boom(require_restart: bool = True, expect: Any = None) -> Any:
        raise Interrupted

    interrupted = health(url)
    object.__setattr__(interrupted, "wait_ready", boom)
    with pytest.raises(Interrupted):
        apply_node(layout, target, interrupted)
    assert read_state(layout)["pending"] == target.config_hash
    result = apply_node(layout, target, health(url))
    assert result.outcome == "applied" and not result.restarted
    assert read_state(layout)["pending"] is None


def test_a_500_from_the_old_instance_is_not_a_restart(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    """kubelet never restarts it; the old instance answers one 500, then 200 again."""
    node, url = fake_node
    node.kubelet_alive = False
    answers = iter([500])
    node.healthy = lambda m: next(answers, 200) == 200
    with pytest.raises(RolledBack, match="did not restart"):
        apply_node(layout, desired("alice"), health(url, timeout=0.5))


class Interrupted(BaseException):
    """Like SIGKILL of the agent: no except-clause runs."""


def test_killed_during_the_rollbacks_own_wait_leaves_the_failure_recorded(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    node, url = fake_node
    good, bad = desired("alice"), desired("alice", "bob")
    apply_node(layout, good, health(url))
    node.healthy = lambda m: config_hash_of(m) != bad.config_hash
    check = health(url, timeout=0.5)
    real = check.wait_ready
    calls = iter([real, None])

    def wait(require_restart: bool = True, expect: Any = None) -> Any:
        step = next(calls)
        if step is None:
            raise Interrupted  # killed while waiting for the restored apiserver
        return step(require_restart, expect)

    object.__setattr__(check, "wait_ready", wait)
    with pytest.raises(Interrupted):
        apply_node(layout, bad, check)
    state = read_state(layout)
    assert list(state["failures"]) == [bad.config_hash], "recorded before the rollback's wait"
    assert state["pending"] == good.config_hash
    assert needs_change(layout, good), "an unverified restore is not reported live"
    skipped = apply_node(layout, bad, health(url), retry_failed=False)
    assert skipped.outcome == "held"
    assert (
        read_state(layout)["pending"] is None and read_state(layout)["lastGood"] == good.config_hash
    )


def test_no_rollback_over_a_manifest_someone_else_wrote_during_the_wait(
    layout: HostLayout,
) -> None:
    """kubeadm upgrade rewrites the manifest while we wait: keep theirs, do not restore ours,
    and record no failure: theirs cut our instance short, ours is applied again at once (before:
    held for 2 minutes as if it had failed, and reported Blocked)."""
    apply_node(layout, desired("alice"), None)
    upgraded = kubeadm_manifest_text("v1.31").replace("v1.31.0", "v1.32.0")

    def wait(require_restart: bool = True, expect: Any = None) -> HealthOutcome:
        layout.manifest.write_text(upgraded)
        return HealthOutcome(False, "HTTP 500")

    check = HealthCheck(url="http://127.0.0.1:9/readyz")
    object.__setattr__(check, "wait_ready", wait)
    ours = desired("alice", "bob")
    with pytest.raises(RewrittenDuringWait, match="rewritten by someone else"):
        apply_node(layout, ours, check)
    assert layout.manifest.read_text() == upgraded
    state = read_state(layout)
    assert state["pending"] is None and not state.get("failures"), state
    assert hold_of(layout, ours, now=10.0) is None
    assert apply_node(layout, ours, None, retry_failed=False).outcome == "applied"


def test_manual_rollback_goes_back_not_to_and_fro(layout: HostLayout) -> None:
    first, second, third = desired("a"), desired("a", "b"), desired("a", "b", "c")
    for want in (first, second, third):
        apply_node(layout, want, None)
    assert rollback_node(layout, None).config_hash == second.config_hash
    assert rollback_node(layout, None).config_hash == first.config_hash


def test_manual_rollback_never_changes_the_image_silently(layout: HostLayout) -> None:
    apply_node(layout, desired("a"), None)
    text = layout.manifest.read_text()
    assert "image: " in text
    layout.manifest.write_text(text.replace("v1.31.0", "v1.32.0"))
    apply_node(layout, desired("a", "b"), None)
    assert "v1.32.0" in layout.manifest.read_text()
    assert rollback_node(layout, None).config_hash == desired("a").config_hash  # same image
    with pytest.raises(ManifestError, match="change the apiserver version"):
        rollback_node(layout, None)  # what is left is from before the upgrade
    assert "v1.32.0" in layout.manifest.read_text()
    assert rollback_node(layout, None, allow_image_change=True).outcome == "rolled-back"
    assert "v1.31.0" in layout.manifest.read_text()


def _pod(config_hash: str, started: str, ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"annotations": {"kube-audit.io/config-hash": config_hash}},
        "status": {
            "containerStatuses": [{"ready": ready, "state": {"running": {"startedAt": started}}}]
        },
    }


@pytest.mark.parametrize(
    ("pod", "verdict"),
    [
        (None, None),
        (_pod("old", "2026-11-28T12:00:10Z"), False),
        (_pod("new", "2026-11-28T11:59:00Z"), False),
        (_pod("new", "2026-11-28T12:00:10Z", ready=False), False),
        (_pod("new", "2026-11-28T12:00:10Z"), True),
    ],
)
def test_the_mirror_pod_proves_the_new_instance(pod: Any, verdict: bool | None) -> None:
    since = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC).timestamp()
    assert mirror_pod_verdict(pod, Expectation("new", since))[0] is verdict


def test_a_hardened_apiserver_is_not_rolled_back_for_refusing_anonymous_probes(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    """--anonymous-auth=false (CIS 1.2.1): /readyz without credentials is 401. Before, every
    apply counted that as not ready and rolled back."""
    node, url = fake_node
    node.anonymous = False
    result = apply_node(layout, desired("alice"), health(url))
    assert result.outcome == "applied", result.message
    assert "HTTP 401" in result.message and "not judged" in result.message


def test_the_probe_sends_the_operators_token_and_reads_readiness_with_it(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    node, url = fake_node
    node.anonymous = False
    bad = desired("alice", "bob")
    node.healthy = lambda m: config_hash_of(m) != bad.config_hash
    check = health(url, timeout=1.0)
    check.credentials = lambda: node.token
    with pytest.raises(RolledBack, match="HTTP 500"):
        apply_node(layout, bad, check)
    assert set(node.authorizations) == {f"Bearer {node.token}"}, "sent on every probe"
    result = apply_node(layout, desired("alice"), check)
    assert result.outcome == "applied" and "HTTP 401" not in result.message


def test_a_forbidden_probe_counts_as_up(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    node, url = fake_node
    node.forbidden = True
    check = health(url)
    check.credentials = lambda: node.token
    result = apply_node(layout, desired("alice"), check)
    assert result.outcome == "applied" and "HTTP 403" in result.message


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        ("https://192.0.2.1:6443/readyz", True),
        ("http://127.0.0.1:6443/readyz", True),
        ("http://[::1]:6443/readyz", True),
        ("http://localhost:6443/readyz", True),
        ("http://192.0.2.1:6443/readyz", False),
        ("http://lb.example:6443/readyz", False),
    ],
)
def test_a_token_never_leaves_the_host_in_clear_text(url: str, sent: bool) -> None:
    assert may_carry_token(url) is sent
