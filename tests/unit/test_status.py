from __future__ import annotations

from typing import Any

import yaml

from kube_audit.core.kubeconfig import render_kubeconfig
from kube_audit.core.status import (
    APPLIED,
    BLOCKED,
    INVALID,
    PENDING,
    ROLLED_BACK,
    STALE,
    compute_conditions,
    conditions_differ,
    entry_differs,
    entry_patch,
    node_entry,
    stale_snapshots,
    summarize,
)

NOW = "2026-11-27T10:00:00Z"


def _obj(
    generation: int,
    nodes: dict[str, tuple[int, str]],
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"name": "alice", "generation": generation},
        "status": {
            "nodes": {
                n: node_entry(generation=g, outcome=o, message=f"{o} msg", time=NOW)
                for n, (g, o) in nodes.items()
            },
            "conditions": conditions or [],
        },
    }


def _by_type(patch: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in patch["conditions"]}


def test_ready_only_when_every_node_has_the_generation() -> None:
    patch = compute_conditions(_obj(2, {"a": (2, APPLIED), "b": (1, APPLIED)}), ["a", "b"], NOW)
    c = _by_type(patch)
    assert patch["observedGeneration"] == 2
    assert (c["Ready"]["status"], c["Reconciling"]["status"], c["Stalled"]["status"]) == (
        "False",
        "True",
        "False",
    )
    assert "1 of 2" in c["Reconciling"]["message"]
    c = _by_type(
        compute_conditions(_obj(2, {"a": (2, APPLIED), "b": (2, APPLIED)}), ["a", "b"], NOW)
    )
    assert c["Ready"]["status"] == "True" and c["Reconciling"]["status"] == "False"


def test_invalid_and_rolled_back_are_stalled() -> None:
    c = _by_type(compute_conditions(_obj(1, {"a": (1, INVALID)}), ["a"], NOW))
    assert c["Stalled"]["status"] == "True" and c["Stalled"]["reason"] == INVALID
    assert c["Stalled"]["message"] == "Invalid msg"
    c = _by_type(
        compute_conditions(_obj(1, {"a": (1, APPLIED), "b": (1, ROLLED_BACK)}), ["a", "b"], NOW)
    )
    assert c["Ready"]["reason"] == ROLLED_BACK and "node b" in c["Stalled"]["message"]


def test_the_node_that_failed_is_named_not_the_ones_it_stopped() -> None:
    obj = _obj(1, {"a": (1, BLOCKED), "c": (1, ROLLED_BACK)})
    c = _by_type(compute_conditions(obj, ["a", "b", "c"], NOW))
    assert c["Ready"]["message"].startswith("node c: RolledBack msg"), c["Ready"]["message"]


def test_a_blocked_node_alone_is_stalled_with_its_reason() -> None:
    """A node we must not manage is a permanent failure the user must see, not a wait."""
    obj = _obj(1, {"a": (1, APPLIED), "b": (1, BLOCKED)})
    c = _by_type(compute_conditions(obj, ["a", "b"], NOW))
    assert c["Ready"]["status"] == "False" and c["Ready"]["reason"] == BLOCKED
    assert c["Stalled"]["status"] == "True" and c["Stalled"]["message"] == "node b: Blocked msg"


def test_a_token_not_created_yet_is_reconciling_not_stalled() -> None:
    """Flux and Argo CD treat Stalled as failed: a burst must not flap through it."""
    c = _by_type(compute_conditions(_obj(1, {"a": (1, PENDING)}), ["a"], NOW))
    assert (c["Ready"]["status"], c["Reconciling"]["status"], c["Stalled"]["status"]) == (
        "False",
        "True",
        "False",
    )


def test_no_nodes_is_not_ready() -> None:
    c = _by_type(compute_conditions(_obj(1, {}), [], NOW))
    assert c["Ready"]["status"] == "False"


def test_transition_time_kept_while_status_unchanged() -> None:
    old = [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    patch = compute_conditions(_obj(1, {"a": (1, APPLIED)}, old), ["a"], NOW)
    assert _by_type(patch)["Ready"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert _by_type(patch)["Stalled"]["lastTransitionTime"] == NOW
    obj = _obj(1, {"a": (1, APPLIED)})
    obj["status"].update(patch)
    assert not conditions_differ(
        obj["status"], compute_conditions(obj, ["a"], "2027-01-01T00:00:00Z")
    )


def test_entry_time_alone_is_no_change() -> None:
    a = node_entry(generation=1, outcome=APPLIED, message="m", time="t1")
    assert not entry_differs(a, {**a, "time": "t2"})
    assert entry_differs(a, {**a, "observedGeneration": 2}) and entry_differs(None, a)


def test_an_entry_holds_no_config_hash_and_drops_an_old_one() -> None:
    """The node's config hash changes with every user added: in each entry, it made every
    change rewrite every object's status. An entry written before loses it, once."""
    new = node_entry(generation=1, outcome=APPLIED, message="live", time="t1")
    assert "configHash" not in new
    old = {**new, "configHash": "abc"}
    assert entry_differs(old, new)
    assert entry_patch(old, new) == {**new, "configHash": None}
    assert entry_patch(new, new) == new


def test_a_node_whose_snapshot_is_not_confirmed_within_the_bound_is_live_for_nobody() -> None:
    """Issue 36, finding 4: judged from each node's record by whoever writes conditions, so a
    node whose operator is stuck or cut off is seen by the others."""
    confirmed = "kube-audit.io/snapshot-confirmed-at"
    records = {
        "a": {confirmed: "2026-11-27T09:59:00Z"},
        "b": {confirmed: "2026-11-27T09:40:00Z"},
        "c": {},  # token-file mode: no confirmation to judge
        "d": {confirmed: "yesterday"},
        "gone": {confirmed: "2026-11-27T09:00:00Z"},
    }
    stale = stale_snapshots(records, ["a", "b", "c", "d"], NOW, 900)
    assert sorted(stale) == ["b", "d"]
    assert "node b" in stale["b"] and "2026-11-27T09:40:00Z" in stale["b"]
    assert "900 s" in stale["b"] and "'yesterday'" in stale["d"]
    assert stale_snapshots(records, ["a", "b"], NOW, 1200) == {}

    obj = _obj(1, {"a": (1, APPLIED), "b": (1, APPLIED)})
    c = _by_type(compute_conditions(obj, ["a", "b"], NOW, stale={"b": stale["b"]}))
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", STALE)
    assert (c["Stalled"]["status"], c["Reconciling"]["status"]) == ("True", "False")
    assert c["Ready"]["message"] == stale["b"]
    c = _by_type(compute_conditions(obj, ["a", "b"], NOW, stale={}))
    assert c["Ready"]["status"] == "True"


def test_summarize() -> None:
    ready = _obj(1, {"a": (1, APPLIED)})
    ready["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    bad = _obj(1, {"a": (1, ROLLED_BACK)})
    bad["metadata"]["name"] = "bob"
    bad["status"]["conditions"] = [{"type": "Stalled", "status": "True", "message": "boom"}]
    records = {
        "a": {
            "kube-audit.io/config-hash": "abcdef0123456789ffff",
            "kube-audit.io/outcome": APPLIED,
            "kube-audit.io/applied-at": NOW,
            "kube-audit.io/snapshot-confirmed-at": NOW,
        },
        "old": {"kube-audit.io/outcome": APPLIED},
    }
    objects, nodes = summarize([("AuditUser", bad), ("AuditUser", ready)], ["a", "b"], records)
    assert objects[0] == ["AuditUser/alice", "True", "1/2 (a)", ""]
    assert objects[1] == ["AuditUser/bob", "Unknown", "0/2", "boom"]
    assert nodes == [
        ["a", "abcdef0123456789", APPLIED, NOW, "-", NOW],
        ["b", "-", "-", "-", "-", "-"],
        ["old", "-", "Applied (not a control-plane node now)", "-", "-", "-"],
    ]


def test_kubeconfig() -> None:
    text = render_kubeconfig(
        cluster="prod",
        server="https://x:6443",
        ca_data="Q0E=",
        insecure=False,
        user="alice",
        token="t",
    )
    doc = yaml.safe_load(text)
    assert doc["current-context"] == "alice@prod"
    assert doc["clusters"][0]["cluster"] == {
        "server": "https://x:6443",
        "certificate-authority-data": "Q0E=",
    }
    assert doc["users"] == [{"name": "alice", "user": {"token": "t"}}]
    insecure = yaml.safe_load(
        render_kubeconfig(cluster="c", server="s", ca_data=None, insecure=True, user="u", token="t")
    )
    assert insecure["clusters"][0]["cluster"]["insecure-skip-tls-verify"] is True


def test_a_disabled_person_is_not_said_to_be_live() -> None:
    obj = {**_obj(1, {"a": (1, APPLIED), "b": (1, APPLIED)}), "spec": {"disabled": True}}
    ready = {c["type"]: c for c in compute_conditions(obj, ["a", "b"], NOW)["conditions"]}["Ready"]
    assert ready["status"] == "True"
    assert ready["message"] == "disabled: no token on any of the 2 control-plane node(s)"


def test_ready_only_where_a_node_serves_the_current_token() -> None:
    """A rotation: same generation, a new token; one node applied it, one still serves the old."""
    obj = _obj(1, {"a": (1, APPLIED), "b": (1, APPLIED)})
    obj["status"]["nodes"]["a"]["token"] = "sha256:new"
    obj["status"]["nodes"]["b"]["token"] = "sha256:old"
    conditions = {
        c["type"]: c for c in compute_conditions(obj, ["a", "b"], NOW, "sha256:new")["conditions"]
    }
    assert (
        conditions["Ready"]["status"] == "False" and conditions["Reconciling"]["status"] == "True"
    )
    assert conditions["Ready"]["message"] == (
        "live on 1 of 2 control-plane node(s); b still serve(s) the previous token"
    )
    obj["status"]["nodes"]["b"]["token"] = "sha256:new"
    ready = compute_conditions(obj, ["a", "b"], NOW, "sha256:new")["conditions"][0]
    assert ready["type"] == "Ready" and ready["status"] == "True"


def test_a_policy_has_no_token_to_compare() -> None:
    obj = _obj(1, {"a": (1, APPLIED)})
    ready = compute_conditions(obj, ["a"], NOW)["conditions"][0]
    assert ready["status"] == "True"


def test_a_generation_no_node_has_applied_yet_says_so() -> None:
    """What the status task writes as soon as a change is seen, before any node applied it:
    Reconciling for the new generation, not Ready for the one before."""
    obj = {
        "metadata": {"name": "alice", "generation": 2},
        "status": {
            "nodes": {
                "a": node_entry(generation=1, outcome=APPLIED, message="live", time="t"),
            },
            "conditions": [
                {"type": "Ready", "status": "True", "reason": APPLIED, "observedGeneration": 1}
            ],
        },
    }
    out = compute_conditions(obj, ["a", "b"], "now")
    ready = {c["type"]: c for c in out["conditions"]}
    assert out["observedGeneration"] == 2
    assert ready["Ready"]["status"] == "False" and ready["Reconciling"]["status"] == "True"
    assert ready["Ready"]["message"] == (
        "generation 2 seen, not yet applied on any of the 2 control-plane node(s)"
    )
