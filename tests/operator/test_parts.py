"""The operator's parts that need no API: the store, lease timing, error mapping."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import kopf
import kubernetes.client
from hypothesis import given, settings, strategies as st

from kube_audit.controller.clock import SystemClock
from kube_audit.controller.config import OperatorConfig
from kube_audit.controller.handlers import to_kopf_error
from kube_audit.controller.health import node_agent
from kube_audit.controller.intake import Intake
from kube_audit.controller.lease import LeaseLock
from kube_audit.controller.metrics import Metrics
from kube_audit.controller.reconciler import NodeRuntime
from kube_audit.controller.rollout import NodeReport, Rollout
from kube_audit.controller.status import StatusWriter
from kube_audit.controller.store import ObjectStore
from kube_audit.core.settings import Settings
from kube_audit.errors import ClusterError, InvalidInput, Problem
from kube_audit.kube import KubeApi
from tests.agent.conftest import make_host
from tests.clock import ManualClock
from tests.operator.conftest import Harness

USER = {
    "apiVersion": "kube-audit.io/v1alpha1",
    "kind": "AuditUser",
    "metadata": {"name": "alice", "uid": "u1", "generation": 1, "managedFields": [{"big": "x" * 100}],
                 "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"}},
    "spec": {"groups": ["developer"]},
}  # fmt: skip


def test_store_plans_again_only_for_relevant_changes() -> None:
    store = ObjectStore()
    assert store.upsert("auditusers", USER)
    assert not store.upsert("auditusers", {**USER, "status": {"nodes": {"a": {}}}}), "status only"
    assert store.upsert("auditusers", {**USER, "spec": {"groups": ["ops"]}})
    rotated = {
        **USER,
        "metadata": {**USER["metadata"], "annotations": {"kube-audit.io/rotate-token": "1"}},
    }
    assert store.upsert("auditusers", rotated)
    kept = store.get("auditusers", "alice")
    assert kept is not None and "managedFields" not in kept["metadata"]
    assert kept["metadata"]["annotations"] == {"kube-audit.io/rotate-token": "1"}
    version = store.user_version
    assert store.remove("auditusers", USER) and store.user_version == version + 1
    assert not store.remove("auditusers", USER)


def test_store_merges_status_per_node() -> None:
    store = ObjectStore()
    store.upsert("auditusers", USER)
    store.merge_status("auditusers", "alice", {"nodes": {"a": {"outcome": "Applied"}}})
    store.merge_status(
        "auditusers", "alice", {"nodes": {"b": {"outcome": "Invalid"}}, "observedGeneration": 1}
    )
    status = (store.get("auditusers", "alice") or {})["status"]
    assert status == {
        "nodes": {"a": {"outcome": "Applied"}, "b": {"outcome": "Invalid"}},
        "observedGeneration": 1,
    }
    assert [d[0] for d in store.documents()] == ["AuditUser/alice"]


def _lock(harness: Harness, holder: str, clock: ManualClock, duration: int = 60) -> LeaseLock:
    return LeaseLock(
        harness.api, clock, namespace="kube-audit", name="rollout", holder=holder, duration=duration
    )


def test_lease_expiry_is_timed_from_observation_not_the_holders_clock(harness: Harness) -> None:
    """cp-1's clock is an hour behind, so its renewTime looks long expired to cp-2's wall
    clock: cp-2 must still wait a whole duration of seeing no renewal (as client-go does)."""
    behind, ours = ManualClock(), ManualClock()
    behind.wall -= timedelta(hours=1)
    holder, waiter = _lock(harness, "cp-1", behind), _lock(harness, "cp-2", ours)
    assert holder.try_acquire()
    assert not waiter.try_acquire(), "first sight of the record starts the count"
    ours.advance(59)
    behind.advance(59)
    assert not waiter.try_acquire()
    assert holder.renew(), "a renewal during a long apply"
    ours.advance(30)
    assert not waiter.try_acquire(), "the renewal restarted the count"
    ours.advance(59)
    assert not waiter.try_acquire()
    ours.advance(2)
    assert waiter.try_acquire(), "no renewal seen for longer than the duration"
    assert not holder.renew(), "the old holder no longer renews what it lost"


def test_lease_annotations_only_while_held(harness: Harness) -> None:
    clock = ManualClock()
    one, two = _lock(harness, "cp-1", clock), _lock(harness, "cp-2", clock)
    assert one.try_acquire()
    assert not two.annotate({"k": "v"}), "not ours: nothing written"
    assert one.annotate({"k": "v"}, release=True)
    assert one.annotation("k") == "v" and two.try_acquire(), "released at once, mark kept"


def test_errors_map_to_kopf() -> None:
    assert isinstance(to_kopf_error(ClusterError("down")), kopf.TemporaryError)
    assert isinstance(
        to_kopf_error(InvalidInput([Problem("AuditUser/a", "spec", "bad")])), kopf.PermanentError
    )


def test_a_relist_forgets_what_it_no_longer_shows() -> None:
    """A watch that re-lists never reports the deletes it missed; the complete list does."""
    store = ObjectStore()
    bob = {**USER, "metadata": {**USER["metadata"], "name": "bob", "uid": "u2"}}
    store.upsert("auditusers", USER)
    store.upsert("auditusers", bob)
    since = store.sequence
    carol = {**USER, "metadata": {**USER["metadata"], "name": "carol", "uid": "u3"}}
    store.upsert("auditusers", carol)  # arrived by the watch after the list began
    assert store.forget_unlisted("auditusers", {"alice"}, since) == ["bob"]
    assert store.has("auditusers", "alice") and store.has("auditusers", "carol")
    assert not store.has("auditusers", "bob")
    assert store.uid("auditusers", "alice") == "u1" and store.uid("auditusers", "bob") is None


async def test_a_delete_the_watch_missed_is_forgotten_before_the_next_plan(
    harness: Harness,
) -> None:
    """bob was deleted while the watch was down (an apiserver restart): the re-list's
    resumed events say nothing of him. Before planning, the list does."""
    harness.apply_user("alice")
    alice = harness.get("auditusers", "alice")
    runtime = NodeRuntime(OperatorConfig(node_name="cp-1"), harness.api)
    runtime.store.upsert("auditusers", alice)
    runtime.store.upsert("auditusers", {**alice, "metadata": {"name": "bob", "uid": "gone"}})
    await asyncio.wait_for(runtime.wait_synced(asyncio.Event()), 10)
    assert runtime.store.has("auditusers", "alice")
    assert not runtime.store.has("auditusers", "bob")


class _FlakyApi:
    """The calls StatusWriter makes; ``refuse`` names objects whose status patch fails."""

    def __init__(self, refuse: set[str], events_fail: bool = False) -> None:
        self.refuse = refuse
        self.events_fail = events_fail
        self.patched: dict[str, dict[str, Any]] = {}
        self.events: list[str] = []

    def patch_status(self, plural: str, name: str, patch: dict[str, Any]) -> None:
        if name in self.refuse:
            raise ClusterError(f"patch {name}: HTTP 422", 422)
        self.patched[name] = patch

    def create_event(self, obj: Any, kind: str, type_: str, reason: str, message: str) -> None:
        if self.events_fail:
            raise ClusterError("create Event: HTTP 403", 403)
        self.events.append(obj["metadata"]["name"])

    def write_node_record(self, *args: Any) -> None:
        pass


def _writer(api: Any, store: ObjectStore) -> StatusWriter:
    return StatusWriter(
        OperatorConfig(node_name="cp-1"),
        api,
        ManualClock(),
        store=store,
        metrics=Metrics(),
        on_gone=lambda: None,
    )


def _users(store: ObjectStore, *names: str, generation: int = 1) -> None:
    for name in names:
        meta = {**USER["metadata"], "name": name, "uid": name, "generation": generation}
        store.upsert("auditusers", {**USER, "metadata": meta})


def _report(generations: dict[str, int]) -> NodeReport:
    return NodeReport("h" * 64, (), generations, "Applied", "applied")


async def test_status_reports_the_generation_that_went_into_the_plan() -> None:
    """alice changed (generation 2) during the health wait: the node runs generation 1, and
    status must say so, or alice would show Ready for a change that is not live."""
    store = ObjectStore()
    _users(store, "alice", generation=2)
    api = _FlakyApi(set())
    errors = await _writer(api, store).write_node(_report({"AuditUser/alice": 1}), asyncio.Event())
    assert not errors
    assert api.patched["alice"]["nodes"]["cp-1"]["observedGeneration"] == 1


async def test_one_refused_status_write_does_not_stop_the_others() -> None:
    store = ObjectStore()
    _users(store, "alice", "bob", "carol")
    api = _FlakyApi({"bob"}, events_fail=True)
    generations = {f"AuditUser/{n}": 1 for n in ("alice", "bob", "carol")}
    errors = await _writer(api, store).write_node(_report(generations), asyncio.Event())
    assert set(api.patched) == {"alice", "carol"}, "the others were written"
    assert len(errors) == 1 and "bob" in str(errors[0]), "the failure is returned for a retry"
    assert api.events == [], "Events the API refuses are best effort: no error for them"


class _LeaseFaults(KubeApi):
    """Lease writes fail ``fail`` times (an apiserver restarting next door)."""

    def __init__(self, api: KubeApi, fail: int) -> None:
        super().__init__(api.client)
        self.fail = fail

    def replace_lease(self, namespace: str, name: str, body: Any) -> bool:
        if self.fail > 0:
            self.fail -= 1
            raise ClusterError("replace Lease: HTTP 503", 503)
        return super().replace_lease(namespace, name, body)


async def test_the_failed_config_is_recorded_first_with_retries(harness: Harness) -> None:
    """The mark tells the other nodes not to try a config that failed here; if it were lost,
    the next node would restart its apiserver into the same failure."""
    config = OperatorConfig(node_name="cp-1", host_root=harness.tmp)
    flaky = _LeaseFaults(harness.api, fail=2)
    rollout = Rollout(config, flaky, ManualClock(), Metrics(), plan=lambda: None)  # type: ignore[arg-type, return-value]
    assert await asyncio.to_thread(rollout.lease.try_acquire)
    assert await rollout._mark_failed("a" * 64)
    assert rollout.lease.annotation("kube-audit.io/failed-configs") == "a" * 64
    assert await rollout._mark_failed("b" * 64)
    assert rollout.lease.annotation("kube-audit.io/failed-configs") == f"{'a' * 64},{'b' * 64}"
    flaky.fail = 100
    assert not await rollout._mark_failed("c" * 64), "the API never took it"
    assert rollout.lease.holds(), "so the Lease is kept: no other node goes on meanwhile"
    assert rollout._unmarked == "c" * 64, "still owed, written before the Lease is released"
    flaky.fail = 0
    await rollout._settle_lease()
    assert "c" * 64 in (rollout.lease.annotation("kube-audit.io/failed-configs") or "")
    assert not rollout.lease.holds()


async def test_a_retry_held_until_later_plans_again_before_the_resync() -> None:
    config = OperatorConfig(node_name="cp-1", resync=3600, debounce=0.0)
    intake = Intake(config, None, SystemClock())  # type: ignore[arg-type]
    intake.plan_again_in(0.05)
    assert await asyncio.wait_for(intake.next_work(asyncio.Event()), 10) is True
    assert intake._retry_due is None, "one wake per retry"


async def test_in_webhook_mode_people_alone_wait_the_short_debounce() -> None:
    """A burst of people and token Secrets restarts nothing in webhook mode: it is applied
    after ``identity_debounce``; a burst with a policy (or any burst in token-file mode) may
    restart kube-apiserver and waits the full ``debounce``."""
    policy = {"apiVersion": USER["apiVersion"], "kind": "AuditPolicy",
              "metadata": {"name": "dev", "uid": "p1", "generation": 1}, "spec": {}}  # fmt: skip

    async def quiet_time(mode: str, *changes: tuple[str, dict[str, Any]]) -> float:
        clock = ManualClock()
        settings = Settings(identity_mode=mode)  # type: ignore[arg-type]
        config = OperatorConfig(node_name="cp-1", settings=settings, debounce=5.0,
                                identity_debounce=0.5, resync=3600)  # fmt: skip
        intake = Intake(config, None, clock)  # type: ignore[arg-type]
        for kind, body in changes:
            intake.observe(kind, "ADDED", body)
        start = clock.monotonic()
        assert await asyncio.wait_for(intake.next_work(asyncio.Event()), 10) is True
        return clock.monotonic() - start

    assert await quiet_time("webhook", ("auditusers", USER)) == 0.5
    assert await quiet_time("webhook", ("auditusers", USER), ("auditpolicies", policy)) == 5.0
    assert await quiet_time("webhook", ("auditpolicies", policy), ("auditusers", USER)) == 5.0
    assert await quiet_time("token-file", ("auditusers", USER)) == 5.0


def test_the_health_probe_carries_the_operators_token(tmp_path: Path) -> None:
    """So a hardened apiserver (anonymous auth off) lets it read /readyz."""
    conf = kubernetes.client.Configuration(host="https://127.0.0.1:6443")
    conf.api_key = {"authorization": "bearer sa-token"}  # as the in-cluster loader keeps it
    api = KubeApi(kubernetes.client.ApiClient(conf))
    config = OperatorConfig(node_name="cp-1", host_root=make_host(tmp_path / "host"))
    agent = node_agent(config, api, time.time)
    assert agent.health is not None and agent.health.credentials is not None
    assert agent.health.credentials() == "sa-token"


USER_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["upsert", "delete", "forget"]),
        st.sampled_from(["ann", "bob", "cy", "dee"]),
        st.sampled_from(
            [None, ("team", "shared"), ("team", "own"), ("ops", "ci"), ("kube-audit", "x"), "bad"]
        ),
    ),
    max_size=40,
)


@given(steps=USER_STEPS)
@settings(max_examples=60, deadline=None)
def test_the_wanted_secrets_kept_per_event_equal_a_full_recount(steps: list[Any]) -> None:
    """The Secrets users refer to are kept per user event, not recounted from 10,000 users on
    each; whatever the order of events (and users forgotten outside ``observe``, as after a
    re-list), the set is the one a full recount gives. So are the namespaces whose Secret
    watches run (never the token namespace: its watch always runs)."""
    config = OperatorConfig(node_name="cp-1")
    intake = Intake(config, None, SystemClock())  # type: ignore[arg-type]
    announced: list[frozenset[str]] = [frozenset()]
    intake.on_namespaces = announced.append
    for action, name, ref in steps:
        spec: dict[str, Any] = {}
        if ref == "bad":
            spec["groups"] = "not a list"
        elif ref is not None:
            spec["tokenSecretRef"] = {"namespace": ref[0], "name": ref[1]}
        body = {"metadata": {"name": name}, "spec": spec}
        if action == "forget":
            intake.store.forget("auditusers", name)
        else:
            intake.observe("auditusers", "DELETED" if action == "delete" else "ADDED", body)
        kept = set(intake._wanted_secrets())
        fresh = Intake(config, None, SystemClock())  # type: ignore[arg-type]
        for _, stored in intake.store.items("auditusers"):
            fresh.store.upsert("auditusers", stored)
        assert kept == set(fresh._wanted_secrets())
        if action != "forget":
            named = {ns for ns, _ in fresh._wanted_secrets()} - {"kube-audit"}
            assert announced[-1] == named
            assert all(a != b for a, b in itertools.pairwise(announced)), "only changes"
