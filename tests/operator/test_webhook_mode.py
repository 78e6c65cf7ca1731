"""The operator in webhook mode (issue 21), against the emulated API: identity changes reach
the node's snapshot with no manifest change and no health wait (no apiserver restart), each
person is Ready once served, and a policy refused on the node holds back neither a new person
nor a deletion."""

from __future__ import annotations

import base64
import json
from typing import Any

from kube_audit.agent.records import failures_of, read_state
from kube_audit.agent.webhook_files import digest_key
from kube_audit.core.identities import lookup_digest, parse_identity_snapshot, token_digest
from kube_audit.core.manifest import flag_value, parse_manifest
from kube_audit.core.settings import Settings
from kube_audit.core.tokens import fingerprint
from tests.operator.conftest import Harness, SimNode, eventually
from tests.operator.test_operator import DEV_RULES, _ready, _token

WEBHOOK: dict[str, Any] = {
    "settings": Settings(identity_mode="webhook"),
    "webhook_probe": lambda layout: None,  # the pod's webhook container, answering
}


def _served(node: SimNode) -> dict[str, str]:
    """Person -> token digest (keyed with the node's secret), as the node's webhook answers."""
    path = node.layout.identity_snapshot
    if not path.exists():
        return {}
    return {i.username: digest for digest, i in parse_identity_snapshot(path.read_bytes()).items()}


def _digest(node: SimNode, token: str) -> str:
    return lookup_digest(token, digest_key(node.layout))


def test_identity_changes_restart_nothing(harness: Harness) -> None:
    harness.add_control_plane("cp-1")
    node = harness.start("cp-1", **WEBHOOK)
    harness.apply_policy("dev", rules=DEV_RULES)
    harness.apply_user("alice", groups=["developer"])
    eventually(lambda: set(_served(node)) == {"alice"}, what="alice served")
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="alice Ready")
    eventually(lambda: _ready(harness, "auditpolicies", "dev"), what="policy Ready")
    manifest = parse_manifest(node.layout.manifest.read_text())
    assert flag_value(manifest, "--authentication-token-webhook-config-file")
    assert flag_value(manifest, "--token-auth-file") is None
    assert _served(node)["alice"] == _digest(node, _token(harness, "alice"))
    text, restarts = node.layout.manifest.read_text(), len(harness.journal)

    harness.apply_user("bob", groups=["developer"])
    eventually(lambda: set(_served(node)) == {"alice", "bob"}, what="bob served")
    eventually(lambda: _ready(harness, "auditusers", "bob"), what="bob Ready")
    harness.delete("auditusers", "alice")
    eventually(lambda: set(_served(node)) == {"bob"}, what="alice no longer served")
    assert node.layout.manifest.read_text() == text
    assert len(harness.journal) == restarts, "no apiserver restart for identities"


def test_a_refused_policy_holds_back_no_identity(harness: Harness) -> None:
    """The policy's new content never becomes ready on the node and is rolled back; meanwhile
    a new person is served and a deleted one is not."""
    harness.add_control_plane("cp-1")
    node = harness.start("cp-1", **WEBHOOK)
    harness.apply_policy("dev", rules=DEV_RULES)
    harness.apply_user("alice", groups=["developer"])
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="alice Ready")
    harness.healthy["cp-1"] = lambda: False
    harness.apply_policy("dev", rules=[{"level": "RequestResponse"}])
    eventually(lambda: failures_of(read_state(node.layout)), what="the policy rolled back")
    harness.apply_user("bob", groups=["developer"])
    harness.delete("auditusers", "alice")
    eventually(lambda: set(_served(node)) == {"bob"}, what="bob served, alice not")


def test_a_person_is_ready_only_once_the_webhook_answers_with_them(harness: Harness) -> None:
    """A token asked of kube-apiserver before the webhook reads the new snapshot is refused,
    and that answer is cached for the whole TTL: the node reports the person Pending, with the
    probe's reason, until its webhook names the snapshot the agent wrote."""
    behind: dict[str, str | None] = {"why": None}
    harness.add_control_plane("cp-1")
    probe = {"webhook_probe": lambda layout: behind["why"], "webhook_poll": 0.2}
    node = harness.start("cp-1", **{**WEBHOOK, **probe})
    harness.apply_policy("dev", rules=DEV_RULES)
    harness.apply_user("alice", groups=["developer"])
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="alice Ready")

    behind["why"] = "https://127.0.0.1:6441/healthz still answers from another identity snapshot"
    harness.apply_user("bob", groups=["developer"])
    eventually(lambda: set(_served(node)) == {"alice", "bob"}, what="bob written")

    def bob_on_cp1() -> dict[str, Any]:
        status = harness.get("auditusers", "bob").get("status") or {}
        return dict((status.get("nodes") or {}).get("cp-1") or {})

    eventually(lambda: bob_on_cp1().get("outcome") == "Pending", what="bob Pending on cp-1")
    assert behind["why"] in bob_on_cp1()["message"]
    assert not _ready(harness, "auditusers", "bob")
    assert _ready(harness, "auditusers", "alice"), "alice, still served, stays Ready"

    behind["why"] = None
    eventually(lambda: _ready(harness, "auditusers", "bob"), what="bob Ready once answered")


def test_a_node_whose_operator_stops_confirming_is_shown_stale(harness: Harness) -> None:
    """Issue 36, finding 4: a node whose operator is stuck or gone keeps answering from its
    last snapshot; the other nodes see from its record that it stopped confirming, every
    AuditUser says so (not Ready, reason SnapshotStale) and the Node gets a Warning Event.
    Before, the status went on saying live there."""
    harness.add_control_plane("cp-1")
    harness.add_control_plane("cp-2")
    fast = {**WEBHOOK, "snapshot_stale_after": 3.0, "resync": 0.5}
    harness.start("cp-1", **fast)
    second = harness.start("cp-2", **fast)
    harness.apply_policy("dev", rules=DEV_RULES)
    harness.apply_user("alice", groups=["developer"])
    eventually(lambda: _ready(harness, "auditusers", "alice"), timeout=30, what="alice Ready")

    second.halt()  # its record keeps the last confirmation; nothing on cp-2 confirms anymore

    def reason() -> str | None:
        return (harness.condition("auditusers", "alice") or {}).get("reason")

    eventually(lambda: reason() == "SnapshotStale", timeout=30, what="alice shown stale")
    ready = harness.condition("auditusers", "alice") or {}
    assert ready["status"] == "False" and ready["message"].startswith("node cp-2: ")
    assert (harness.condition("auditusers", "alice", "Stalled") or {})["status"] == "True"
    assert _ready(harness, "auditpolicies", "dev"), "a policy does not depend on the snapshot"

    def node_events(reason: str) -> list[Any]:
        events = harness.core.list_namespaced_event("default").items
        return [
            e
            for e in events
            if e.involved_object.kind == "Node"
            and e.involved_object.name == "cp-2"
            and e.reason == reason
        ]

    eventually(lambda: node_events("SnapshotStale"), what="a Warning Event on the Node")
    (warning,) = node_events("SnapshotStale")
    assert warning.type == "Warning" and "last confirmed current at" in warning.message

    harness.start("cp-2", fresh=False, **fast)
    eventually(lambda: _ready(harness, "auditusers", "alice"), timeout=30, what="Ready again")
    eventually(lambda: node_events("SnapshotConfirmed"), what="confirmed again, said once")


def test_status_and_answers_show_no_digest_of_a_token(harness: Harness) -> None:
    """Issue 36, finding 8: the token fingerprint on an AuditUser's status (and the credential
    ID the webhook gives kube-apiserver for its audit events) was the start of the token's
    SHA-256, a digest anyone who may read AuditUsers could guess a short token of a person's
    own against. Now it is keyed with the cluster's fingerprint key (a Secret the operator
    makes once), the same on every node, and the snapshot carries it for the webhook."""
    harness.add_control_plane("cp-1")
    harness.add_control_plane("cp-2")
    nodes = [harness.start(name, **WEBHOOK) for name in ("cp-1", "cp-2")]
    harness.apply_user("alice", groups=["developer"])
    eventually(lambda: _ready(harness, "auditusers", "alice"), timeout=30, what="alice Ready")
    token = _token(harness, "alice")
    secret = harness.core.read_namespaced_secret("kube-audit-fingerprint-key", "kube-audit")
    key = base64.b64decode(secret.data["key"])
    entries = harness.get("auditusers", "alice")["status"]["nodes"]
    assert {e["token"] for e in entries.values()} == {fingerprint(token, key)}
    assert fingerprint(token, key).startswith("hmac:")
    assert fingerprint(token).removeprefix("sha256:") not in json.dumps(entries)
    for node in nodes:
        (served,) = parse_identity_snapshot(node.layout.identity_snapshot.read_bytes()).values()
        assert served.credential == "kube-audit-token=" + fingerprint(token, key)
        assert token_digest(token) not in node.layout.identity_snapshot.read_text()
