"""The operator's parts that need no API: the store, lease timing, error mapping."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import kopf

from kube_audit.controller.handlers import to_kopf_error
from kube_audit.controller.lease import _free_for, _parse
from kube_audit.controller.runtime import NodeRuntime, OperatorConfig
from kube_audit.controller.store import ObjectStore
from kube_audit.errors import ClusterError, InvalidInput, Problem
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


def test_lease_times_in_both_formats() -> None:
    assert _parse("2026-11-27T10:00:00.123456Z") == datetime(
        2026, 11, 27, 10, 0, 0, 123456, tzinfo=UTC
    )
    assert _parse("2026-11-27T10:00:00.123456+00:00") == _parse("2026-11-27T10:00:00.123456Z")
    assert _parse("garbage") is None and _parse(None) is None


def test_lease_free_only_when_expired_or_ours() -> None:
    now = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
    held = {
        "spec": {
            "holderIdentity": "cp-1",
            "leaseDurationSeconds": 60,
            "renewTime": (now - timedelta(seconds=30)).isoformat(),
        }
    }
    assert not _free_for(held, "cp-2", now)
    assert _free_for(held, "cp-1", now)
    assert _free_for(held, "cp-2", now + timedelta(seconds=31))
    assert _free_for({"spec": {"holderIdentity": None}}, "cp-2", now)
    assert not _free_for({"spec": {"holderIdentity": "cp-1", "renewTime": "??"}}, "cp-2", now), (
        "unreadable time is not free"
    )


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
