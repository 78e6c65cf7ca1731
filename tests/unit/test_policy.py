from __future__ import annotations

import pytest
import yaml

from kube_audit.core.policy import parse_audit_policy, render_audit_policy
from kube_audit.errors import InvalidInput
from tests.conftest import audit_policy


def _rule(**kw: object) -> dict[str, object]:
    return {"level": "Metadata", **kw}


@pytest.mark.parametrize(
    ("rule", "field", "fragment"),
    [
        (_rule(level="Verbose"), "spec.rules[0].level", "unsupported value 'Verbose'"),
        (_rule(omitStages=["Done"]), "spec.rules[0].omitStages[0]", "unsupported value 'Done'"),
        (
            _rule(nonResourceURLs=["healthz"]),
            "spec.rules[0].nonResourceURLs[0]",
            "must begin with a '/'",
        ),
        (
            _rule(nonResourceURLs=["/api/*/x"]),
            "spec.rules[0].nonResourceURLs[0]",
            "final character",
        ),
        (
            _rule(nonResourceURLs=["/healthz"], resources=[{"group": "", "resources": ["pods"]}]),
            "spec.rules[0].nonResourceURLs",
            "both regular resources and non-resource URLs",
        ),
        (
            _rule(nonResourceURLs=["/healthz"], namespaces=["default"]),
            "spec.rules[0].nonResourceURLs",
            "both regular resources",
        ),
        (
            _rule(resources=[{"group": "rbac.authorization.k8s.io/v1", "resources": ["roles"]}]),
            "spec.rules[0].resources[0].group",
            "without a version",
        ),
        (_rule(resources=[{"group": "Apps"}]), "spec.rules[0].resources[0].group", "lower-case"),
        (
            _rule(resources=[{"group": "", "resourceNames": ["x"]}]),
            "spec.rules[0].resources[0].resourceNames",
            "requires at least one resource",
        ),
        (_rule(users="alice"), "spec.rules[0].users", "list"),
        (_rule(color="red"), "spec.rules[0].color", "unknown field"),
        ({"users": ["a"]}, "spec.rules[0].level", "required"),
    ],
)
def test_rule_validation_matches_kube_apiserver(rule: dict, field: str, fragment: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidInput) as info:
        parse_audit_policy(audit_policy("p", rules=[rule]))
    problem = info.value.problems[0]
    assert (problem.obj, problem.field) == ("AuditPolicy/p", field)
    assert fragment in problem.message


def test_policy_without_rules_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"AuditPolicy/p: spec.rules: .*at least 1"):
        parse_audit_policy(audit_policy("p", rules=[]))


def test_valid_edge_cases_accepted() -> None:
    policy = parse_audit_policy(
        audit_policy(
            "p",
            rules=[
                _rule(nonResourceURLs=["*", "/healthz*", "/api"]),
                _rule(
                    resources=[
                        {
                            "group": "apps",
                            "resources": ["deployments/scale"],
                            "resourceNames": ["web"],
                        }
                    ]
                ),
                {"level": "None"},
            ],
        )
    )
    assert len(policy.spec.rules) == 3


def test_no_policies_renders_nothing() -> None:
    assert render_audit_policy([]) is None


def test_rules_ordered_by_priority_then_name_with_defaults_folded_in() -> None:
    a = parse_audit_policy(
        audit_policy(
            "a-late",
            priority=200,
            omitStages=["RequestReceived"],
            omitManagedFields=True,
            rules=[_rule(verbs=["get"], omitStages=["Panic"]), _rule(omitManagedFields=False)],
        )
    )
    b = parse_audit_policy(
        audit_policy(
            "b-first", priority=10, rules=[{"level": "None", "users": ["system:kube-proxy"]}]
        )
    )
    c = parse_audit_policy(audit_policy("a-first", priority=10, rules=[_rule(userGroups=["dev"])]))
    data = render_audit_policy([a, b, c])
    assert data is not None
    doc = yaml.safe_load(data)
    assert doc["apiVersion"] == "audit.k8s.io/v1" and doc["kind"] == "Policy"
    assert "omitStages" not in doc
    assert doc["rules"] == [
        {"level": "Metadata", "userGroups": ["dev"]},
        {"level": "None", "users": ["system:kube-proxy"]},
        {
            "level": "Metadata",
            "verbs": ["get"],
            "omitStages": ["RequestReceived", "Panic"],
            "omitManagedFields": True,
        },
        {"level": "Metadata", "omitStages": ["RequestReceived"], "omitManagedFields": False},
    ]


def test_render_is_byte_identical_for_any_input_order() -> None:
    ps = [
        parse_audit_policy(audit_policy(n, priority=p, rules=[_rule(users=[n])]))
        for n, p in [("x", 5), ("y", 5), ("z", 1)]
    ]
    assert render_audit_policy(ps) == render_audit_policy(list(reversed(ps)))


def test_starter_policy_logs_every_persons_writes_not_the_machinerys() -> None:
    """As the field note: writes and Secret/ConfigMap access at Metadata, RequestReceived
    omitted; but for anyone (kubernetes-admin and CI tokens too), not one group, with the
    cluster's own components kept out by None rules that come first."""
    with open("examples/auditpolicy-starter.yaml") as fh:
        policy = parse_audit_policy(yaml.safe_load(fh))
    data = render_audit_policy([policy])
    assert data is not None
    rules = yaml.safe_load(data)["rules"]
    logged = [r for r in rules if r["level"] != "None"]
    assert [r["level"] for r in logged] == ["Metadata", "Metadata"]
    assert rules.index(logged[0]) == len(rules) - 2, "every None rule comes before"
    assert logged[0]["resources"] == [{"group": "", "resources": ["secrets", "configmaps"]}]
    assert logged[1]["verbs"] == ["create", "update", "patch", "delete", "deletecollection"]
    assert all("users" not in r and "userGroups" not in r for r in logged), "anyone's"
    ignored = {g for r in rules if r["level"] == "None" for g in r.get("userGroups", [])}
    assert {"system:nodes", "system:serviceaccounts:kube-system"} <= ignored
    assert "system:masters" not in ignored and "kubeadm:cluster-admins" not in ignored
    assert all(r["omitStages"] == ["RequestReceived"] for r in rules)
