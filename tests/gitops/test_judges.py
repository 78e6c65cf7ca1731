"""Every status the operator writes, judged by Flux's and Argo CD's own code (issue 20, item 14).

tests/unit checks the same states with Python stand-ins (cel-python for Flux's
``healthCheckExprs``, lupa for Argo CD's Lua). Here the judges are the Go code the GitOps tools
run: Flux's kstatus ``status.Compute`` (what Flux uses when no expression is configured, the
default), Flux's CEL status evaluator on deploy/flux's ``healthCheckExprs``, and
deploy/argocd/health.lua under gopher-lua with the libraries Argo CD gives a health
customization. ``make gitops-health`` builds them as one program (tests/gitops/health).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kube_audit.constants import GROUP, VERSION
from kube_audit.core.crd import render_crd
from kube_audit.core.status import (
    APPLIED,
    BLOCKED,
    INVALID,
    PENDING,
    ROLLED_BACK,
    compute_conditions,
    node_entry,
)
from tests.toolchain import go_1_26_or_newer
from tests.unit.test_deploy import FLUX, LUA, _flux, _health

ROOT = Path(__file__).resolve().parents[2]
JUDGE = ROOT / "build/gitops/bin/gitops-health"
NODES = ["cp-1", "cp-2", "cp-3"]
NOW = "2026-12-04T00:00:00Z"
# What each tool does with a state: Flux (kstatus), Argo CD.
DONE, WORKING, FAILED = (
    ("Current", "Healthy"),
    ("InProgress", "Progressing"),
    ("Failed", "Degraded"),
)
# States plain kstatus (no healthCheckExprs) reads otherwise: a Ready condition False is
# InProgress to it whatever the reason, so an expired AuditUser is Current only with
# deploy/flux's expressions, as docs/gitops.md says.
KSTATUS_ALONE = {"expired (Ready False, reason Expired)": "InProgress"}


def _judge_available() -> None:
    if JUDGE.is_file():
        return
    if go_1_26_or_newer():
        pytest.fail(f"{JUDGE} is not built: run `make gitops-health`", pytrace=False)
    pytest.skip("needs Go 1.26+ to build Flux's kstatus and Argo CD's Lua check (`make test`)")


def judge(objects: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Flux's (kstatus, and the expressions) and Argo CD's verdict on each object."""
    _judge_available()
    run = subprocess.run(
        [str(JUDGE)],
        input=json.dumps(
            {"lua": LUA, "healthCheckExprs": FLUX["healthCheckExprs"], "objects": objects}
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in run.stdout.splitlines()]


def _object(
    kind: str, generation: int, status: dict[str, Any] | None, **spec: Any
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {"name": "x", "generation": generation},
        "spec": spec,
    }
    if status is not None:
        obj["status"] = status
    return obj


def _written(
    kind: str, generation: int, outcomes: dict[str, str], *, seen: int | None = None, **spec: Any
) -> dict[str, Any]:
    """The object as the status owner leaves it: each node's entry, then the conditions
    computed from them (``seen``: the generation the entries and conditions were written for)."""
    written_for = seen or generation
    entries = {
        node: node_entry(
            generation=written_for,
            outcome=outcome,
            message=f"{outcome.lower()} on {node}",
            time=NOW,
        )
        for node, outcome in outcomes.items()
    }
    obj = _object(kind, written_for, {"nodes": entries}, **spec)
    status = {"nodes": entries, **compute_conditions(obj, NODES, NOW)}
    return _object(kind, generation, status, **spec)


def _states(kind: str) -> list[tuple[str, dict[str, Any], tuple[str, str]]]:
    """(what, object, (Flux, Argo CD)) for every state the operator writes, and the states
    between: a new object (the CRD's status default) and a change not yet judged."""
    schema = render_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    default = schema["properties"]["status"]["default"]
    all_applied = dict.fromkeys(NODES, APPLIED)
    states = [
        (
            "new, the CRD's status default",
            _object(kind, 1, json.loads(json.dumps(default))),
            WORKING,
        ),
        ("live on every node", _written(kind, 1, all_applied), DONE),
        ("live on one node of three", _written(kind, 1, {"cp-1": APPLIED}), WORKING),
        ("seen, applied nowhere yet", _written(kind, 1, {}), WORKING),
        ("waiting on a node", _written(kind, 1, {"cp-1": APPLIED, "cp-2": PENDING}), WORKING),
        ("refused as invalid", _written(kind, 1, {"cp-1": INVALID}), FAILED),
        ("rolled back on a node", _written(kind, 1, {"cp-1": ROLLED_BACK}), FAILED),
        ("blocked on a node", _written(kind, 1, {"cp-1": APPLIED, "cp-2": BLOCKED}), FAILED),
        ("changed, not judged yet", _written(kind, 2, all_applied, seen=1), WORKING),
        ("invalid, then fixed", _written(kind, 2, {"cp-1": INVALID}, seen=1), WORKING),
    ]
    if kind == "AuditPolicy":
        # Issue 35 item 2: a node's audit log not reaching the store is a warning (Argo CD's
        # message says it), never a failed or unfinished policy.
        not_shipping = _written(kind, 1, all_applied)
        not_shipping["status"]["conditions"].append(
            {
                "type": "Shipping",
                "status": "False",
                "reason": "ShippingStalled",
                "message": "cp-2: its shipper last reported 60 s ago",
            }
        )
        states.append(("live, one node not shipping to the store", not_shipping, DONE))
    if kind == "AuditUser":
        states.append(("disabled everywhere", _written(kind, 1, all_applied, disabled=True), DONE))
        expired = _written(kind, 1, all_applied, expiresAt="2026-12-03T00:00:00Z")
        states.append(("expired (Ready False, reason Expired)", expired, DONE))
    return states


@pytest.mark.parametrize("kind", ["AuditUser", "AuditPolicy"])
def test_flux_and_argo_cd_judge_every_state_as_documented(kind: str) -> None:
    states = _states(kind)
    verdicts = judge([obj for _, obj, _ in states])
    for (what, obj, (flux, argo)), verdict in zip(states, verdicts, strict=True):
        alone = KSTATUS_ALONE.get(what, flux)
        assert (verdict["kstatus"], verdict["argo"]) == (alone, argo), (what, verdict)
        assert verdict["fluxExprs"] == flux, ("with deploy/flux's healthCheckExprs", what, verdict)
        conditions = {c["type"]: c for c in obj["status"]["conditions"]}
        if (flux, argo) == FAILED:
            stalled = conditions["Stalled"]["message"]
            assert verdict["kstatusMessage"] == stalled and verdict["argoMessage"] == stalled, what
        if conditions.get("Shipping", {}).get("status") == "False":
            assert verdict["argoMessage"].endswith(
                "; not shipping: " + conditions["Shipping"]["message"]
            ), (what, verdict)


@pytest.mark.parametrize("kind", ["AuditUser", "AuditPolicy"])
def test_the_stand_ins_of_the_unit_tier_agree_with_the_real_judges(kind: str) -> None:
    """cel-python on deploy/flux's expressions and lupa on the Lua give what Flux's CEL
    evaluator and gopher-lua give, state by state: the fast unit tests test what the tools do."""
    states = _states(kind)
    for (what, obj, _), verdict in zip(states, judge([o for _, o, _ in states]), strict=True):
        assert _flux(kind, obj) == verdict["fluxExprs"], what
        assert _health(obj) == (verdict["argo"], verdict["argoMessage"]), what


def test_without_the_status_default_flux_reads_a_new_object_as_done() -> None:
    """Why the CRDs default ``status``: an object with no status at all is Current to kstatus,
    so Flux's ``wait: true`` passed before kube-audit had looked at it. The real apiserver fills
    the default on every read (tests/controlplane, test_controlplane.py), so no client sees
    this state."""
    [bare] = judge([_object("AuditUser", 1, None)])
    assert bare["kstatus"] == "Current", bare
    # With the expressions, Flux's evaluator cannot even resolve ``status`` there: an error,
    # which kstatus's generic reader turns into Unknown, so Flux waits (never Current either).
    assert bare["fluxExprs"].startswith("error: ") and "status.conditions" in bare["fluxExprs"]
    assert bare["argo"] == "Progressing", "Argo CD's check never relied on the default"
