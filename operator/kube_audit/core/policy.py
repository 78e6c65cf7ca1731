"""AuditPolicy validation (kube-apiserver's own rules) and rendering of the node's audit policy."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from kube_audit.constants import AUDIT_POLICY
from kube_audit.core import yamlio
from kube_audit.core.models import (
    DNS_SUBDOMAIN,
    STAGE_ORDER,
    AuditPolicy,
    AuditPolicySpec,
    Kept,
    PolicyRule,
    _meta,
    problems_from_validation,
    validate_rest,
)
from kube_audit.errors import InvalidInput, Problem


def _non_resource_url_problem(url: str) -> str | None:
    if url == "*":
        return None
    if not url.startswith("/"):
        return "non-resource URL rules must begin with a '/' character"
    star = url.find("*")
    if star >= 0 and star != len(url) - 1:
        return "non-resource URL wildcards '*' must be the final character of the rule"
    return None


def _group_problem(group: str) -> str | None:
    if len(group) > 253:
        return "must be no more than 253 characters"
    if not DNS_SUBDOMAIN.match(group):
        return (
            "must be a lower-case DNS subdomain, the API group alone without a version "
            "(for example 'rbac.authorization.k8s.io', not 'rbac.authorization.k8s.io/v1')"
        )
    return None


def validate_rule(obj: str, path: str, rule: PolicyRule) -> list[Problem]:
    """The checks kube-apiserver applies to a PolicyRule before it will start."""
    problems = []
    if rule.non_resource_urls and (rule.resources or rule.namespaces):
        problems.append(
            Problem(
                obj,
                f"{path}.nonResourceURLs",
                "rules cannot apply to both regular resources and non-resource URLs "
                "(split it into two rules)",
            )
        )
    for i, url in enumerate(rule.non_resource_urls):
        why = _non_resource_url_problem(url)
        if why:
            problems.append(Problem(obj, f"{path}.nonResourceURLs[{i}]", f"{url!r}: {why}"))
    for i, gr in enumerate(rule.resources):
        if gr.group:
            why = _group_problem(gr.group)
            if why:
                problems.append(Problem(obj, f"{path}.resources[{i}].group", f"{gr.group!r} {why}"))
        if gr.resource_names and not gr.resources:
            problems.append(
                Problem(
                    obj,
                    f"{path}.resources[{i}].resourceNames",
                    "using resourceNames requires at least one resource",
                )
            )
    return problems


def validate_policy_spec(obj: str, spec: AuditPolicySpec) -> list[Problem]:
    problems: list[Problem] = []
    for i, rule in enumerate(spec.rules):
        problems.extend(validate_rule(obj, f"spec.rules[{i}]", rule))
    return problems


def parse_audit_policy(obj: Mapping[str, Any]) -> AuditPolicy:
    """Validate an AuditPolicy object, including kube-apiserver's own policy rules."""
    meta, problems = _meta(obj, AUDIT_POLICY)
    if problems:
        raise InvalidInput(problems)
    ref = f"{AUDIT_POLICY}/{meta.name}"
    data = obj.get("spec") or {}
    try:
        spec = AuditPolicySpec.model_validate(data, by_alias=True)
    except ValidationError as error:
        problems = problems_from_validation(ref, "spec", error)
        rules = data.get("rules") if isinstance(data, Mapping) else None
        for i, raw in enumerate(rules if isinstance(rules, list) else []):
            path = f"spec.rules[{i}]"
            try:
                rest: tuple[PolicyRule, Kept] | None = (
                    PolicyRule.model_validate(raw, by_alias=True),
                    Kept(),
                )
            except ValidationError as rule_error:
                rest = validate_rest(PolicyRule, raw, rule_error, fill={"level": "None"})
            if rest is not None:
                rule, kept = rest
                problems.extend(kept.original(p, path) for p in validate_rule(ref, path, rule))
        raise InvalidInput(problems) from None
    problems = validate_policy_spec(ref, spec)
    if problems:
        raise InvalidInput(problems)
    return AuditPolicy(meta, spec)


def _ordered_stages(*groups: Iterable[str]) -> list[str]:
    wanted = {s for g in groups for s in g}
    return [s for s in STAGE_ORDER if s in wanted]


def _render_rule(policy: AuditPolicy, rule: PolicyRule) -> dict[str, Any]:
    """One rule in apiserver field order, with its object's defaults folded in.

    Folding keeps each object's meaning when objects are concatenated: policy-level omitStages add
    to the rule's own, and a rule without omitManagedFields takes its object's value.
    """
    out: dict[str, Any] = {"level": rule.level}
    for key, values in (
        ("users", rule.users),
        ("userGroups", rule.user_groups),
        ("verbs", rule.verbs),
    ):
        if values:
            out[key] = list(values)
    if rule.resources:
        resources = []
        for gr in rule.resources:
            entry: dict[str, Any] = {"group": gr.group}
            if gr.resources:
                entry["resources"] = list(gr.resources)
            if gr.resource_names:
                entry["resourceNames"] = list(gr.resource_names)
            resources.append(entry)
        out["resources"] = resources
    if rule.namespaces:
        out["namespaces"] = list(rule.namespaces)
    if rule.non_resource_urls:
        out["nonResourceURLs"] = list(rule.non_resource_urls)
    stages = _ordered_stages(policy.spec.omit_stages, rule.omit_stages)
    if stages:
        out["omitStages"] = stages
    omit_managed = (
        rule.omit_managed_fields
        if rule.omit_managed_fields is not None
        else policy.spec.omit_managed_fields
    )
    if omit_managed is not None:
        out["omitManagedFields"] = omit_managed
    return out


def policy_order(policies: Iterable[AuditPolicy]) -> list[AuditPolicy]:
    """(priority, name): the order in which objects' rules are matched."""
    return sorted(policies, key=lambda p: (p.spec.priority, p.meta.name))


def render_audit_policy(policies: Iterable[AuditPolicy]) -> bytes | None:
    """The audit.k8s.io/v1 Policy for these objects, or None when there are none.

    None (not an empty policy) because a policy with 0 rules stops kube-apiserver: without any
    AuditPolicy the audit flags are left off altogether.
    """
    ordered = policy_order(policies)
    rules = [_render_rule(p, r) for p in ordered for r in p.spec.rules]
    if not rules:
        return None
    doc = {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "rules": rules}
    sources = ", ".join(f"{p.meta.name} (priority {p.spec.priority})" for p in ordered)
    header = f"# Generated by kube-audit from AuditPolicy objects: {sources}. Do not edit.\n"
    body = yamlio.dump(doc)
    return (header + body).encode()
