"""kopf's real watch loop against the in-process API: the operator as users drive it."""

from __future__ import annotations

import base64
import functools
import itertools
import threading
import time
from pathlib import Path

import pytest

from kube_audit import hostfs
from kube_audit.core.manifest import config_hash_of, flag_value, parse_manifest, render_manifest
from kube_audit.core.tokens import parse_token_file
from tests.agent.conftest import make_host
from tests.operator.conftest import Harness, SimNode, eventually

DEV_RULES = [{"level": "Metadata", "userGroups": ["developer"]}]


def _records(node: SimNode) -> dict[str, tuple[str, ...]]:
    manifest = parse_manifest(node.layout.manifest.read_text())
    path = flag_value(manifest, "--token-auth-file")
    if path is None:
        return {}
    data = node.layout.host(path).read_bytes()
    return {r.username: (r.token, *r.groups) for r in parse_token_file(data)}


def _policy(node: SimNode) -> str | None:
    path = flag_value(parse_manifest(node.layout.manifest.read_text()), "--audit-policy-file")
    return node.layout.host(path).read_text() if path else None


def _ready(harness: Harness, plural: str, name: str) -> bool:
    cond = harness.condition(plural, name)
    obj = harness.get(plural, name)
    return bool(
        cond
        and cond["status"] == "True"
        and obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    )


def _stalled(harness: Harness, plural: str, name: str) -> dict[str, str] | None:
    cond = harness.condition(plural, name, "Stalled")
    return cond if cond and cond["status"] == "True" else None


def _token(harness: Harness, name: str) -> str:
    secret = harness.cluster.objects("secrets")[f"audituser-{name}"]
    return base64.b64decode(secret["data"]["token"]).decode()


def test_create_update_disable_delete(harness: Harness) -> None:
    harness.add_control_plane("cp-1")
    node = harness.start("cp-1")
    harness.apply_user("alice", groups=["developer"])
    harness.apply_user("bob", groups=["developer", "ops"], uid="bob@example.com")
    harness.apply_policy("dev", priority=10, omitStages=["RequestReceived"], rules=DEV_RULES)
    eventually(lambda: set(_records(node)) == {"alice", "bob"}, what="both users live")
    assert _records(node)["alice"] == (_token(harness, "alice"), "developer")
    eventually(lambda: _ready(harness, "auditusers", "bob"), what="bob Ready")
    eventually(lambda: _ready(harness, "auditpolicies", "dev"), what="policy Ready")
    assert "RequestReceived" in (_policy(node) or "")

    harness.apply_user("bob", groups=["ops"], uid="bob@example.com")
    eventually(lambda: _records(node)["bob"][1:] == ("ops",), what="bob's groups updated")
    eventually(lambda: _ready(harness, "auditusers", "bob"), what="bob Ready at generation 2")
    assert harness.get("auditusers", "bob")["metadata"]["generation"] == 2

    harness.apply_policy(
        "dev", priority=10, rules=[{"level": "RequestResponse", "userGroups": ["ops"]}]
    )
    eventually(lambda: "RequestResponse" in (_policy(node) or ""), what="policy updated")

    harness.apply_user("alice", groups=["developer"], disabled=True)
    eventually(lambda: set(_records(node)) == {"bob"}, what="alice disabled")
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="a disabled user is Ready")

    harness.delete("auditusers", "bob")
    eventually(
        lambda: "audituser-bob" not in harness.cluster.objects("secrets"),
        what="Secret deleted with its owner",
    )
    harness.delete("auditpolicies", "dev")
    eventually(
        lambda: (
            flag_value(parse_manifest(node.layout.manifest.read_text()), "--token-auth-file")
            is None
        )
    )
    assert _policy(node) is None


def test_burst_of_a_thousand_creates_is_one_apply(harness: Harness) -> None:
    harness.add_control_plane("cp-1")
    node = harness.start("cp-1", debounce=2.0)
    harness.apply_policy("dev", rules=DEV_RULES)
    for i in range(1000):
        harness.apply_user(f"user-{i:04d}", groups=["developer"])
    eventually(lambda: len(_records(node)) == 1000, timeout=120, what="1,000 users live")
    eventually(
        lambda: _ready(harness, "auditusers", "user-0999"), timeout=120, what="last user Ready"
    )
    time.sleep(1.0)
    assert node.applied() == ["applied"], "exactly one agent apply (one apiserver restart)"
    assert len(harness.journal) == 1


def test_restart_with_nothing_changed_applies_nothing(harness: Harness) -> None:
    harness.add_control_plane("cp-1")
    node = harness.start("cp-1")
    harness.apply_user("alice", groups=["developer"])
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="alice Ready")
    before = node.layout.manifest.stat().st_mtime_ns
    node.halt()
    again = harness.start("cp-1", fresh=False)
    time.sleep(1.5)
    assert not again.runtime.applies
    assert again.layout.manifest.stat().st_mtime_ns == before
    assert _ready(harness, "auditusers", "alice")


def test_restart_plans_only_once_every_object_has_arrived(harness: Harness) -> None:
    """kopf lists each kind on its own. With the users' list slow (a big collection), the
    policy arrives first; a plan made then would drop every user from the token file and
    restart the apiserver twice."""
    harness.add_control_plane("cp-1")
    node = harness.start("cp-1")
    for i in range(20):
        harness.apply_user(f"user-{i:02d}", groups=["developer"])
    harness.apply_policy("dev", rules=[{"level": "Metadata"}])
    eventually(lambda: _ready(harness, "auditusers", "user-19"), what="users Ready")
    eventually(lambda: _ready(harness, "auditpolicies", "dev"), what="policy Ready")
    before = node.layout.manifest.stat().st_mtime_ns
    node.halt()
    harness.cluster.delay_lists("auditusers", 2.0)
    again = harness.start("cp-1", fresh=False)
    eventually(
        lambda: again.runtime.store.has("auditusers", "user-19"), timeout=15, what="users listed"
    )
    time.sleep(1.5)
    assert not again.runtime.applies
    assert again.layout.manifest.stat().st_mtime_ns == before


def _no_overlap(journal: list[tuple[str, float, float]]) -> None:
    spans = sorted(journal, key=lambda j: j[1])
    for (a, _, end), (b, start, _) in itertools.pairwise(spans):
        assert end <= start, f"{a} and {b} restarted their apiservers at the same time"


def test_three_nodes_roll_one_at_a_time(harness: Harness) -> None:
    names = ["cp-1", "cp-2", "cp-3"]
    for name in names:
        harness.add_control_plane(name)
    nodes = [harness.start(name) for name in names]
    harness.apply_user("alice", groups=["developer"])
    harness.apply_policy("dev", rules=DEV_RULES)
    eventually(lambda: all(set(_records(n)) == {"alice"} for n in nodes), what="live on all nodes")
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="Ready on all nodes")
    assert sorted(j[0] for j in harness.journal) == names
    _no_overlap(harness.journal)
    hashes = {config_hash_of(parse_manifest(n.layout.manifest.read_text())) for n in nodes}
    assert len(hashes) == 1
    tokens = {_records(n)["alice"][0] for n in nodes}
    assert tokens == {_token(harness, "alice")}, "the Secret was created once, all nodes agree"
    status = harness.get("auditusers", "alice")["status"]
    assert set(status["nodes"]) == set(names)


def test_two_nodes_roll_one_at_a_time(harness: Harness) -> None:
    for name in ("cp-a", "cp-b"):
        harness.add_control_plane(name)
    nodes = [harness.start(n) for n in ("cp-a", "cp-b")]
    harness.apply_user("alice", groups=["developer"])
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="Ready on both")
    harness.apply_user("alice", groups=["developer", "ops"])
    eventually(lambda: all(_records(n)["alice"][1:] == ("developer", "ops") for n in nodes))
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="Ready again")
    assert len(harness.journal) == 4
    _no_overlap(harness.journal)


def test_ready_only_when_every_control_plane_node_has_it(harness: Harness) -> None:
    harness.add_control_plane("cp-1")
    harness.add_control_plane("cp-2")
    harness.start("cp-1")
    harness.apply_user("alice")
    eventually(lambda: harness.condition("auditusers", "alice"), what="conditions")
    cond = eventually(lambda: harness.condition("auditusers", "alice", "Reconciling"))
    assert cond["status"] == "True" and "1 of 2" in cond["message"]
    assert harness.condition("auditusers", "alice")["status"] == "False"
    harness.start("cp-2")
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="Ready once cp-2 has it")


def test_api_outage_of_a_minute_mid_rollout(harness: Harness) -> None:
    for name in ("cp-1", "cp-2"):
        harness.add_control_plane(name)
    nodes = [harness.start(n) for n in ("cp-1", "cp-2")]
    harness.apply_user("alice", groups=["developer"])
    eventually(lambda: harness.journal, what="the first node restarting its apiserver")
    harness.cluster.set_down(True)
    time.sleep(60)
    assert all(n.thread.is_alive() for n in nodes), "the operator rides out the outage"
    harness.cluster.set_down(False)
    eventually(
        lambda: all(set(_records(n)) == {"alice"} for n in nodes),
        timeout=90,
        what="rollout finished",
    )
    eventually(lambda: _ready(harness, "auditusers", "alice"), timeout=90, what="status finished")
    _no_overlap(harness.journal)


def test_invalid_object_next_to_valid_ones(harness: Harness) -> None:
    harness.add_control_plane("cp-1")
    node = harness.start("cp-1")
    harness.apply_user("alice", groups=["developer"])
    harness.apply_user("mallory", groups=["system:masters"])
    harness.apply_policy("broken", rules=[{"level": "Metadata", "nonResourceURLs": ["healthz"]}])
    harness.apply_policy("dev", rules=DEV_RULES)
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="alice Ready")
    stalled = eventually(lambda: _stalled(harness, "auditusers", "mallory"))
    assert "spec.groups[0]" in stalled["message"]
    assert harness.condition("auditusers", "mallory")["status"] == "False"
    broken = eventually(lambda: _stalled(harness, "auditpolicies", "broken"))
    assert "nonResourceURLs[0]" in broken["message"]
    assert set(_records(node)) == {"alice"}
    assert "healthz" not in (_policy(node) or "")
    events = harness.core.list_namespaced_event("default").items
    reasons = {(e.involved_object.name, e.reason) for e in events}
    assert ("mallory", "Refused") in reasons and ("alice", "Applied") in reasons
    assert not any(
        "tok" in (e.message or "") and _token(harness, "alice") in e.message for e in events
    )


def test_secret_creation_races_between_pods(harness: Harness) -> None:
    names = [f"cp-{i}" for i in range(3)]
    for name in names:
        harness.add_control_plane(name)
    nodes = [harness.start(n, debounce=0.05) for n in names]
    for i in range(20):
        harness.apply_user(f"u{i}")
    eventually(lambda: all(len(_records(n)) == 20 for n in nodes), what="all users on all nodes")
    secrets = harness.cluster.objects("secrets")
    for i in range(20):
        token = _records(nodes[0])[f"u{i}"][0]
        assert all(_records(n)[f"u{i}"][0] == token for n in nodes)
        assert base64.b64decode(secrets[f"audituser-u{i}"]["data"]["token"]).decode() == token


def test_rotation_and_external_secret_changes_propagate(harness: Harness) -> None:
    harness.add_control_plane("cp-1")
    harness.cluster.grant_secrets("vault")
    node = harness.start("cp-1")
    harness.core.create_namespaced_secret(
        "vault",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "ci", "labels": {"kube-audit.io/token-for": "ci"}},
            "stringData": {"pw": "first-token-0123456789abcdef0123456789"},
        },
    )
    harness.apply_user("ci", tokenSecretRef={"namespace": "vault", "name": "ci", "key": "pw"})
    harness.apply_user("alice")
    eventually(
        lambda: _records(node).get("ci", ("",))[0] == "first-token-0123456789abcdef0123456789",
        what="external token live",
    )
    harness.core.patch_namespaced_secret(
        "ci", "vault", {"stringData": {"pw": "second-token-0123456789abcdef0123456789"}}
    )
    eventually(
        lambda: _records(node)["ci"][0] == "second-token-0123456789abcdef0123456789",
        what="external rotation propagated",
    )
    old = eventually(lambda: _records(node).get("alice"), what="alice live")[0]
    harness.annotate("auditusers", "alice", {"kube-audit.io/rotate-token": "2026-11-27"})
    eventually(lambda: _records(node)["alice"][0] != old, what="token rotated")
    assert _records(node)["alice"][0] == _token(harness, "alice")


def test_a_secret_elsewhere_is_not_read_before_it_consents(harness: Harness) -> None:
    """Before: the operator GET the Secret a tokenSecretRef names and kept its data, then
    found it carried no consent label. Now the apiserver filters by the label: nothing of a
    Secret that did not consent reaches the operator, until the label is added."""
    harness.cluster.grant_secrets("team")
    harness.add_control_plane("cp-1")
    node = harness.start("cp-1")
    harness.core.create_namespaced_secret(
        "team",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "db-password"},
            "stringData": {"token": "not-for-kube-audit-0123456789abcdef0123"},
        },
    )
    harness.apply_user("carol", tokenSecretRef={"namespace": "team", "name": "db-password"})
    stalled = eventually(lambda: _stalled(harness, "auditusers", "carol"), what="refused")
    assert "kube-audit.io/token-for=carol" in stalled["message"]
    assert not node.runtime.store.has("secrets", ("team", "db-password")), "never held"
    assert "carol" not in _records(node)
    harness.core.patch_namespaced_secret(
        "db-password", "team", {"metadata": {"labels": {"kube-audit.io/token-for": "carol"}}}
    )
    eventually(lambda: "carol" in _records(node), what="consented, then used")


def test_failed_rollout_stops_until_inputs_change(harness: Harness) -> None:
    names = ("cp-1", "cp-2")
    for name in names:
        harness.add_control_plane(name)
    nodes = {name: harness.start(name) for name in names}
    first_to_fail: list[str] = []

    def healthy(name: str) -> bool:
        """The first node that tries the configuration with 'bad' cannot start it."""
        if "bad" not in _records(nodes[name]) or first_to_fail[:1] not in ([], [name]):
            return True
        first_to_fail[:] = [name]
        return "fixed" in str(_records(nodes[name])["bad"])

    for name in names:
        harness.healthy[name] = functools.partial(healthy, name)
    harness.apply_user("good")
    eventually(lambda: _ready(harness, "auditusers", "good"), what="good Ready")
    harness.apply_user("bad")
    stalled = eventually(lambda: _stalled(harness, "auditusers", "bad"), what="rollback reported")
    assert stalled["reason"] == "RolledBack"
    time.sleep(1.0)
    assert all("bad" not in _records(n) for n in nodes.values()), (
        "rolled back, and not tried further"
    )
    assert _ready(harness, "auditusers", "good")
    harness.apply_user("bad", groups=["fixed"])
    eventually(lambda: all("bad" in _records(n) for n in nodes.values()), what="rollout resumed")
    eventually(lambda: _ready(harness, "auditusers", "bad"))


def test_metrics_count_applies(harness: Harness) -> None:
    harness.add_control_plane("cp-1")
    node = harness.start("cp-1")
    harness.apply_user("alice")
    eventually(lambda: _ready(harness, "auditusers", "alice"))
    assert node.runtime.metrics.applies._value.get() == 1
    assert node.runtime.metrics.restarts._value.get() == 1


def test_periodic_resync_repairs_drift(harness: Harness) -> None:
    """The manifest watch polls once an hour here, so only the resync can see the rewrite."""
    harness.add_control_plane("cp-1")
    node = harness.start("cp-1", resync=1.0, manifest_poll=3600)
    harness.apply_user("alice")
    eventually(lambda: "alice" in _records(node), what="alice live")
    kubeadm = (
        Path(__file__).resolve().parents[1] / "fixtures/kubeadm/v1.31/kube-apiserver.yaml"
    ).read_text()
    node.layout.manifest.write_text(kubeadm)
    eventually(lambda: "alice" in _records(node), what="a kubeadm rewrite repaired by the resync")


def test_a_change_reads_reconciling_while_a_rollout_is_under_way(harness: Harness) -> None:
    """A change seen while this node waits on its new apiserver for another change is shown at
    once (its observedGeneration, Reconciling), not minutes later after that rollout: until
    then `kubectl wait --for=condition=Ready` would pass on the generation before."""
    harness.add_control_plane("cp-1")
    harness.start("cp-1")
    harness.apply_user("alice", groups=["developer"])
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="alice Ready")
    gate = threading.Event()
    harness.healthy["cp-1"] = lambda: gate.wait(60)
    waits_before = len(harness.journal)
    harness.apply_policy("dev", rules=DEV_RULES)
    eventually(lambda: len(harness.journal) > waits_before, what="the rollout waits on health")
    harness.apply_user("alice", groups=["ops"])
    try:
        eventually(
            lambda: harness.get("auditusers", "alice")["status"]["observedGeneration"] == 2,
            timeout=10,
            what="generation 2 observed during the rollout",
        )
        ready = harness.condition("auditusers", "alice")
        reconciling = harness.condition("auditusers", "alice", "Reconciling")
        assert ready and ready["status"] == "False" and ready["observedGeneration"] == 2
        assert reconciling and reconciling["status"] == "True"
        assert not gate.is_set(), "still during the first rollout"
    finally:
        gate.set()
    eventually(lambda: _ready(harness, "auditusers", "alice"), timeout=30, what="Ready again")
    assert harness.get("auditusers", "alice")["status"]["observedGeneration"] == 2


def test_events_of_a_burst_are_counted_on_the_node(harness: Harness) -> None:
    """A burst gives a few per-object Events and one Event on the Node for the rest, not one
    per object per node (10,000 people on three nodes: 30,000 Events at once)."""
    harness.add_control_plane("cp-1")
    for i in range(60):
        harness.apply_user(f"user-{i:02d}", groups=["developer"])
    harness.start("cp-1")  # after the burst: one plan of every object, one reconcile
    eventually(lambda: _ready(harness, "auditusers", "user-59"), timeout=60, what="all Ready")
    events = harness.core.list_namespaced_event("default").items
    per_object = [e for e in events if e.involved_object.kind == "AuditUser"]
    on_node = [e for e in events if e.involved_object.kind == "Node"]
    assert 0 < len(per_object) <= 20, len(per_object)
    (counted,) = on_node
    assert counted.involved_object.name == "cp-1" and counted.reason == "Applied"
    assert counted.message.startswith(
        f"node cp-1: {60 - len(per_object)} more AuditUser/AuditPolicy object(s) Applied"
    )


def test_a_rootless_apiserver_is_shown_blocked_with_the_reason(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in the DaemonSet's container (no CAP_CHOWN): the objects say why, nothing is
    written; before, the files were written and the chown failed on every reconcile."""
    root = make_host(harness.tmp / "cp-1")
    manifest_path = root / "etc/kubernetes/manifests/kube-apiserver.yaml"
    manifest = parse_manifest(manifest_path.read_text())
    manifest["spec"]["securityContext"].update(runAsUser=2000, runAsGroup=2000)
    manifest_path.write_text(render_manifest(manifest))
    before = manifest_path.read_bytes()
    monkeypatch.setattr(hostfs, "can_give_files", lambda: False)
    harness.add_control_plane("cp-1")
    harness.start("cp-1")
    harness.apply_user("alice", groups=["developer"])
    stalled = eventually(lambda: _stalled(harness, "auditusers", "alice"), what="Stalled")
    assert stalled["reason"] == "Blocked", stalled
    assert "runs as uid 2000" in stalled["message"] and "CAP_CHOWN" in stalled["message"]
    assert manifest_path.read_bytes() == before
    assert not (root / "etc/kubernetes/kube-audit").exists()
