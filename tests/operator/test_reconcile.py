"""The reconciler's promises to users, driven through kopf's real watch loop: few writes per
change, permanent failures shown (not retried in a loop), removed nodes pruned, only the
Secrets it needs read, a dead core task ends the process."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import pytest

from kube_audit.controller import handlers
from kube_audit.controller.config import OperatorConfig
from kube_audit.controller.main import CoreTaskDied, run_operator
from kube_audit.controller.reconciler import NodeRuntime
from kube_audit.core.tokens import fingerprint
from kube_audit.kube import KubeApi
from tests.agent.conftest import make_host
from tests.operator.conftest import Harness, SimNode, eventually
from tests.operator.test_operator import _ready, _records, _stalled, _token

KUBEADM = Path(__file__).resolve().parents[1] / "fixtures/kubeadm/v1.31/kube-apiserver.yaml"


def _writes(nodes: list[SimNode]) -> tuple[int, int]:
    patches = sum(n.runtime.metrics.status_patches._value.get() for n in nodes)
    events = sum(n.runtime.metrics.events._value.get() for n in nodes)
    return int(patches), int(events)


def _events(harness: Harness, name: str) -> list[dict[str, Any]]:
    return [
        e for e in harness.cluster.objects("events").values() if e["involvedObject"]["name"] == name
    ]


def test_one_new_user_writes_a_handful_of_statuses_not_one_per_object(harness: Harness) -> None:
    """Each node's config hash used to be in every object's entry: one new user among 40 on
    three nodes rewrote 120 statuses and posted 120 Events."""
    names = ["cp-1", "cp-2", "cp-3"]
    for name in names:
        harness.add_control_plane(name)
    nodes = [harness.start(name) for name in names]
    for i in range(40):
        harness.apply_user(f"user-{i:02d}")
    eventually(
        lambda: all(_ready(harness, "auditusers", f"user-{i:02d}") for i in range(40)),
        timeout=60,
        what="40 users Ready",
    )
    time.sleep(1.0)  # let the last conditions writes land
    before = _writes(nodes)
    harness.apply_user("newcomer")
    eventually(lambda: _ready(harness, "auditusers", "newcomer"), timeout=30, what="Ready")
    time.sleep(1.0)
    patches, events = (a - b for a, b in zip(_writes(nodes), before, strict=True))
    assert events == 3, "one Event per node, on the new user only"
    assert patches <= 8, f"{patches} status patches: three entries and a few condition updates"
    records = harness.api.node_records("kube-audit")
    hashes = {records[n]["kube-audit.io/config-hash"] for n in names}
    assert len(hashes) == 1, "each node's record holds the config hash it runs"


def test_a_manifest_we_must_not_take_over_is_shown_and_not_retried(harness: Harness) -> None:
    harness.add_control_plane("cp-1")
    kubeadm = KUBEADM.read_text()
    twice = kubeadm.replace(
        "    - kube-apiserver\n",
        "    - kube-apiserver\n    - --token-auth-file=/a.csv\n    - --token-auth-file=/b.csv\n",
    )
    assert twice != kubeadm
    manifest = make_host(harness.tmp / "cp-1") / "etc/kubernetes/manifests/kube-apiserver.yaml"
    manifest.write_text(twice)
    node = harness.start("cp-1", manifest_poll=0.1)
    harness.apply_user("alice")
    stalled = eventually(lambda: _stalled(harness, "auditusers", "alice"), what="Blocked shown")
    assert stalled["reason"] == "Blocked" and "--token-auth-file 2 times" in stalled["message"]
    entry = harness.get("auditusers", "alice")["status"]["nodes"]["cp-1"]
    assert entry["outcome"] == "Blocked"
    eventually(
        lambda: any(e["reason"] == "Blocked" for e in _events(harness, "alice")), what="Event"
    )
    assert node.runtime.metrics.blocked._value.get() == 1
    time.sleep(1.0)  # the token Secret's own watch event may still bring one more plan
    failures = node.runtime.metrics.failures._value.get()
    time.sleep(1.5)  # a retry loop (back-off 0.2 s) would have run several times by now
    assert node.runtime.metrics.failures._value.get() == failures, "waits for a change"
    assert harness.api.node_records("kube-audit")["cp-1"]["kube-audit.io/outcome"] == "Blocked"
    node.layout.manifest.write_text(kubeadm)
    eventually(lambda: "alice" in _records(node), what="applied once the manifest is fixed")
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="Ready")
    assert node.runtime.metrics.blocked._value.get() == 0


def test_entries_of_a_removed_control_plane_node_are_pruned(harness: Harness) -> None:
    for name in ("cp-1", "cp-2"):
        harness.add_control_plane(name)
    nodes = [harness.start(n) for n in ("cp-1", "cp-2")]
    harness.apply_user("alice")
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="Ready on both")
    nodes[1].halt()
    harness.core.delete_node("cp-2")
    eventually(
        lambda: set(harness.get("auditusers", "alice")["status"]["nodes"]) == {"cp-1"},
        what="cp-2's entry pruned",
    )
    cond = harness.condition("auditusers", "alice")
    assert cond is not None and cond["status"] == "True" and "all 1" in cond["message"]


def test_only_the_token_namespace_and_labelled_secrets_are_read(harness: Harness) -> None:
    """Not every Secret of the cluster (Helm releases and all): the token namespace, and
    Secrets elsewhere that opt in by label, in a namespace some user names and an admin
    granted. Withdrawing the label withdraws the token."""
    harness.add_control_plane("cp-1")
    harness.cluster.grant_secrets("vault")
    node = harness.start("cp-1")
    harness.core.create_namespaced_secret(
        "apps", {"metadata": {"name": "helm-release"}, "stringData": {"x": "y" * 40}}
    )
    harness.core.create_namespaced_secret(
        "vault",
        {
            "metadata": {"name": "ci", "labels": {"kube-audit.io/token-for": "ci"}},
            "stringData": {"pw": "ci-token-0123456789abcdef0123456789abcd"},
        },
    )
    harness.apply_user("ci", tokenSecretRef={"namespace": "vault", "name": "ci", "key": "pw"})
    eventually(lambda: "ci" in _records(node), what="the labelled Secret's token live")
    assert harness.cluster.cluster is not None
    reads = harness.cluster.cluster.secret_reads
    assert reads, "the operator reads Secrets"
    for read in reads:
        assert read.startswith("/api/v1/namespaces/kube-audit/secrets") or (
            read.startswith("/api/v1/namespaces/vault/secrets") and "labelSelector=kube-audit.io"
        ), read
    assert not node.runtime.store.has("secrets", ("apps", "helm-release"))
    harness.core.patch_namespaced_secret(
        "ci", "vault", {"metadata": {"labels": {"kube-audit.io/token-for": None}}}
    )
    eventually(lambda: "ci" not in _records(node), what="consent withdrawn, token gone")


def test_a_namespace_without_a_grant_is_named_on_the_user_until_granted(
    harness: Harness,
) -> None:
    """The operator holds no cluster-wide Secret access (item 8 of issue 20): a tokenSecretRef
    into a namespace an admin has not granted is refused by the apiserver (403), and the user
    says so with the command that grants it; once granted, the token goes live without a
    restart. When no user names the namespace any more, its watch stops."""
    harness.add_control_plane("cp-1")
    node = harness.start("cp-1")
    harness.core.create_namespaced_secret(
        "team",
        {
            "metadata": {"name": "ci", "labels": {"kube-audit.io/token-for": "ci"}},
            "stringData": {"token": "team-token-0123456789abcdef0123456789ab"},
        },
    )
    harness.apply_user("ci", tokenSecretRef={"namespace": "team", "name": "ci"})
    harness.apply_user("alice")
    stalled = eventually(lambda: _stalled(harness, "auditusers", "ci"), what="ci refused")
    assert "may not read Secrets in namespace team" in stalled["message"], stalled
    assert "kube-audit grant-secrets team | kubectl apply -f -" in stalled["message"]
    assert any("grant-secrets team" in e["message"] for e in _events(harness, "ci")), "an Event"
    eventually(lambda: "alice" in _records(node), what="the others go on")
    assert "ci" not in _records(node)
    assert harness.cluster.cluster is not None
    reads = harness.cluster.cluster.secret_reads
    assert not [r for r in reads if r.startswith("/api/v1/secrets")], "nothing cluster-wide"

    harness.cluster.grant_secrets("team")
    eventually(lambda: "ci" in _records(node), what="granted, then live")
    eventually(lambda: _ready(harness, "auditusers", "ci"), what="ci Ready")
    assert "team" in node.runtime.intake._namespaces

    harness.custom.delete_cluster_custom_object("kube-audit.io", "v1alpha1", "auditusers", "ci")
    eventually(lambda: "ci" not in _records(node), what="ci gone")
    eventually(lambda: not node.runtime.store.has("secrets", ("team", "ci")), what="team forgotten")
    assert not node.runtime.intake._namespaces


async def test_a_dead_secret_watch_ends_the_process(harness: Harness) -> None:
    """A watch thread that died silently left a pod alive that no longer saw token changes."""

    class BrokenWatch(KubeApi):
        def watch_secrets(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("unexpected")

    harness.add_control_plane("cp-1")
    runtime = NodeRuntime(
        OperatorConfig(node_name="cp-1", host_root=harness.tmp, no_wait=True),
        BrokenWatch(harness.api.client),
    )
    with pytest.raises(CoreTaskDied, match="Secret watch"):
        await asyncio.wait_for(run_operator(runtime), 30)


def test_a_deleted_token_secret_is_regenerated_and_said_so(harness: Harness) -> None:
    """Before: a new token, and no word anywhere; the person's kubeconfig just stopped working."""
    harness.add_control_plane("cp-1")
    node = harness.start("cp-1")
    harness.apply_user("alice")
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="alice Ready")
    old = _token(harness, "alice")
    harness.core.delete_namespaced_secret("audituser-alice", "kube-audit")
    warned = eventually(
        lambda: [e for e in _events(harness, "alice") if e["reason"] == "TokenRegenerated"],
        what="a Warning Event",
    )
    assert warned[0]["type"] == "Warning"
    assert "kube-audit kubeconfig alice" in warned[0]["message"]
    eventually(lambda: _records(node).get("alice", ("",))[0] == _token(harness, "alice"))
    assert _token(harness, "alice") != old
    harness.apply_user("carol")
    eventually(lambda: _ready(harness, "auditusers", "carol"), what="carol Ready")
    assert not [e for e in _events(harness, "carol") if e["reason"] == "TokenRegenerated"], (
        "a first token is no news"
    )


def _fingerprint_key(harness: Harness) -> bytes:
    secret = harness.core.read_namespaced_secret("kube-audit-fingerprint-key", "kube-audit")
    return base64.b64decode(secret.data["key"])


def test_a_rotation_that_failed_is_not_ready(harness: Harness) -> None:
    """A rotation changes the Secret, not the generation: before, the failed one left alice
    Ready True, her entry 'still live' from the generation before, though the new token she was
    handed works nowhere."""
    harness.add_control_plane("cp-1")
    node = harness.start("cp-1")
    harness.apply_user("alice")
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="alice Ready")
    first = _token(harness, "alice")
    harness.healthy["cp-1"] = lambda: _records(node).get("alice", ("",))[0] == first
    harness.annotate("auditusers", "alice", {"kube-audit.io/rotate-token": "2026-12-03"})
    stalled = eventually(lambda: _stalled(harness, "auditusers", "alice"), what="shown")
    assert stalled["reason"] == "RolledBack", stalled
    assert harness.condition("auditusers", "alice")["status"] == "False"  # type: ignore[index]
    assert _records(node)["alice"][0] == first != _token(harness, "alice")
    entry = harness.get("auditusers", "alice")["status"]["nodes"]["cp-1"]
    assert entry["token"] == fingerprint(first, _fingerprint_key(harness)), "what it still serves"
    del harness.healthy["cp-1"]
    harness.annotate("auditusers", "alice", {"kube-audit.io/rotate-token": "2026-12-04"})
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="Ready once it is live")
    assert _records(node)["alice"][0] == _token(harness, "alice")


def test_a_restart_reads_the_users_page_by_page(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kopf lists a whole resource in one response unless told a chunk size: at a restart with
    10,000 AuditUsers that one list was the operator's memory peak (issue 20, item 9). Pages of
    ``LIST_CHUNK`` (2 here, 500 in the field) still deliver every user."""
    monkeypatch.setattr(handlers, "LIST_CHUNK", 2)
    harness.add_control_plane("cp-1")
    names = [f"user-{i}" for i in range(5)]
    for name in names:
        harness.apply_user(name)
    node = harness.start("cp-1")
    eventually(lambda: set(_records(node)) == set(names), what="all five users live")
    assert harness.cluster.cluster is not None
    pages = [
        (limit, n)
        for plural, limit, n in harness.cluster.cluster.list_pages
        if plural == "auditusers"
    ]
    assert all(limit > 0 for limit, _ in pages), f"a list of every user at once: {pages}"
    assert [n for limit, n in pages if limit == 2][:3] == [2, 2, 1], pages
