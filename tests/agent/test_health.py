"""Waiting for the new apiserver, and rolling back when it never gets ready."""

from __future__ import annotations

from typing import Any

import pytest

from kube_audit.agent.health import HealthCheck
from kube_audit.agent.layout import HostLayout
from kube_audit.agent.node import apply_node, read_state
from kube_audit.core.manifest import config_hash_of, flag_value, parse_manifest
from kube_audit.errors import RolledBack
from tests.agent.conftest import FakeNode, desired, health


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
    assert state["failed"] == [bad.config_hash] and state["lastGood"] == good.config_hash
    skipped = apply_node(layout, bad, health(url), retry_failed=False)
    assert skipped.outcome == "skipped-failed"
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
    with pytest.raises(RolledBack, match=r"timed out|unreachable"):
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

    def boom(require_restart: bool = True) -> Any:
        raise Interrupted

    interrupted = health(url)
    object.__setattr__(interrupted, "wait_ready", boom)
    with pytest.raises(Interrupted):
        apply_node(layout, target, interrupted)
    assert read_state(layout)["pending"] == target.config_hash
    result = apply_node(layout, target, health(url))
    assert result.outcome == "applied" and not result.restarted
    assert read_state(layout)["pending"] is None
