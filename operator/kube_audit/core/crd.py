"""CustomResourceDefinitions rendered from the pydantic models, so schema and code cannot drift.

The structural schema comes from the models' fields (types, defaults, lengths, enums,
descriptions); CEL rules repeat the checks CEL can express, so most mistakes already fail at
``kubectl apply``. ``crds/*.yaml`` are this module's output (``make crds``), checked by a test.
"""

from __future__ import annotations

import copy
import types
import typing
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from kube_audit.constants import GROUP, VERSION
from kube_audit.core import yamlio
from kube_audit.core.identities import NONE_ALLOWED, Allowed
from kube_audit.core.models import (
    DNS_SUBDOMAIN_PATTERN,
    AuditPolicySpec,
    AuditUserSpec,
    GroupResources,
    PolicyRule,
)

# Inside a CEL string literal, a backslash is written twice.
_DNS = DNS_SUBDOMAIN_PATTERN.replace("\\", "\\\\")

CEL: dict[tuple[type[BaseModel], str | None], list[dict[str, str]]] = {
    (AuditUserSpec, None): [
        {
            "rule": "!has(self.username) || !self.username.startsWith('system:')",
            "message": "usernames starting with 'system:' are reserved for Kubernetes components "
            "(to allow one: `kube-audit crds --allow-system-user` and the operator's flag)",
            "fieldPath": ".username",
        },
    ],
    (AuditUserSpec, "groups"): [
        {
            "rule": "self.all(g, !g.startsWith('system:') && g != 'kubeadm:cluster-admins')",
            "message": "'system:' groups (above all system:masters) and kubeadm:cluster-admins "
            "are refused (to allow one: `kube-audit crds --allow-system-group`, the admission "
            "policy's ConfigMap and the operator's --allow-system-group; see docs/security.md)",
        },
        {"rule": "self.all(g, !g.contains(','))", "message": "a group must not contain ','"},
    ],
    (PolicyRule, None): [
        {
            "rule": "!(has(self.nonResourceURLs) && size(self.nonResourceURLs) > 0) || "
            "((!has(self.resources) || size(self.resources) == 0) && "
            "(!has(self.namespaces) || size(self.namespaces) == 0))",
            "message": "rules cannot apply to both regular resources and non-resource URLs",
            "fieldPath": ".nonResourceURLs",
        },
    ],
    (PolicyRule, "non_resource_urls"): [
        {
            "rule": "self.all(u, u == '*' || u.matches('^/[^*]*[*]?$'))",
            "message": "a non-resource URL begins with '/' and may hold '*' only as its last "
            "character",
        },
    ],
    (GroupResources, None): [
        {
            "rule": "!has(self.resourceNames) || size(self.resourceNames) == 0 || "
            "(has(self.resources) && size(self.resources) > 0)",
            "message": "using resourceNames requires at least one resource",
            "fieldPath": ".resourceNames",
        },
    ],
    (GroupResources, "group"): [
        {
            "rule": f"self == '' || self.matches('{_DNS}')",
            "message": "an API group is a lower-case DNS subdomain without a version "
            "(for example 'rbac.authorization.k8s.io')",
        },
    ],
}


def _constraints(metadata: list[Any], schema: dict[str, Any], array: bool) -> None:
    for item in metadata:
        if isinstance(item, annotated_types.MinLen):
            schema["minItems" if array else "minLength"] = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            schema["maxItems" if array else "maxLength"] = item.max_length


def _type_schema(annotation: Any, metadata: list[Any]) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        inner = args[0]
        extra = [m for a in args[1:] for m in (a.metadata if isinstance(a, FieldInfo) else [a])]
        return _type_schema(inner, [*extra, *metadata])
    if origin in (types.UnionType, typing.Union):
        (real,) = [a for a in args if a is not type(None)]
        return _type_schema(real, metadata)
    if origin is typing.Literal:
        return {"type": "string", "enum": list(args)}
    if origin is list:
        schema: dict[str, Any] = {"type": "array", "items": _type_schema(args[0], [])}
        _constraints(metadata, schema, array=True)
        return schema
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_schema(annotation)
    mapping = {str: "string", int: "integer", bool: "boolean"}
    schema = {"type": mapping[annotation]}
    if annotation is str:
        _constraints(metadata, schema, array=False)
    return schema


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a spec model (camelCase names, as the API has them)."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        schema = _type_schema(info.annotation, list(info.metadata))
        if isinstance(info.json_schema_extra, dict):
            schema.update(info.json_schema_extra)  # e.g. format: date-time, checked by the API
        if info.description:
            schema = {"description": info.description, **schema}
        if info.is_required():
            required.append(key)
        elif info.default is not None and info.default_factory is None:
            schema["default"] = info.default
        rules = CEL.get((model, name))
        if rules:
            schema["x-kubernetes-validations"] = rules
        properties[key] = schema
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    rules = CEL.get((model, None))
    if rules:
        out["x-kubernetes-validations"] = rules
    if model.__doc__:
        out = {"description": " ".join(model.__doc__.split()), **out}
    return out


_WAITING = "waiting for kube-audit to see it"
# What an object reads before the operator wrote anything. Without it a new object has no
# status, which Flux's kstatus reads as Current and Argo CD's health as Progressing: a
# Kustomization with wait: true passed at once. The apiserver fills a default into a missing
# status on every read, so a new object reads Reconciling until the operator judged it.
_STATUS = {
    "type": "object",
    "description": "Written by the operator: conditions (kstatus) and per-node results.",
    "x-kubernetes-preserve-unknown-fields": True,
    "default": {
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "Pending", "message": _WAITING},
            {"type": "Reconciling", "status": "True", "reason": "Pending", "message": _WAITING},
            {"type": "Stalled", "status": "False", "reason": "Pending", "message": ""},
        ]
    },
}
_READY = {
    "name": "Ready",
    "type": "string",
    "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
}
# Why not Ready (Progressing, Invalid, RolledBack, Blocked...) at a glance; the words with -o wide.
_REASON = {
    "name": "Status",
    "type": "string",
    "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
}
_MESSAGE = {
    "name": "Message",
    "type": "string",
    "priority": 1,
    "jsonPath": '.status.conditions[?(@.type=="Ready")].message',
}
_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def _cel_list(values: frozenset[str]) -> str:
    quoted = (v.replace("\\", "\\\\").replace("'", "\\'") for v in sorted(values))
    return "[" + ", ".join(f"'{v}'" for v in quoted) + "]"


def _allow(schema: dict[str, Any], allowed: Allowed) -> dict[str, Any]:
    """The AuditUser spec schema with the exact ``system:`` names the operator's guard flags
    allow let through: the CRD cannot read the operator's flags, so ``kube-audit crds`` is
    given the same ones."""
    schema = copy.deepcopy(schema)  # its rules are the module's own CEL lists
    if allowed.users:
        for rule in schema["x-kubernetes-validations"]:
            if "startsWith('system:')" in rule["rule"]:
                rule["rule"] += f" || self.username in {_cel_list(allowed.users)}"
    if allowed.groups:
        for rule in schema["properties"]["groups"]["x-kubernetes-validations"]:
            if "startsWith('system:')" in rule["rule"]:
                rule["rule"] = (
                    "self.all(g, (!g.startsWith('system:') && g != 'kubeadm:cluster-admins') "
                    f"|| g in {_cel_list(allowed.groups)})"
                )
    return schema


def render_crd(kind: str, allowed: Allowed = NONE_ALLOWED) -> dict[str, Any]:
    """The CustomResourceDefinition object of AuditUser or AuditPolicy; ``allowed``: the
    operator's guard flags, which the AuditUser CRD must let through too."""
    spec: type[BaseModel]
    if kind == "AuditUser":
        plural, short, spec = "auditusers", "au", AuditUserSpec
        columns = [
            {"name": "Username", "type": "string", "jsonPath": ".status.username"},
            {"name": "Groups", "type": "string", "jsonPath": ".spec.groups"},
            {"name": "Disabled", "type": "boolean", "jsonPath": ".spec.disabled"},
            _READY,
            _REASON,
            _AGE,
            _MESSAGE,
        ]
        what = "A person's identity: a static bearer token for kube-apiserver."
    else:
        plural, short, spec = "auditpolicies", "ap", AuditPolicySpec
        columns = [
            {"name": "Priority", "type": "integer", "jsonPath": ".spec.priority"},
            {"name": "Rules", "type": "integer", "jsonPath": ".status.ruleCount"},
            _READY,
            _REASON,
            # With the audit store: whether every node's audit log reaches it (empty without).
            {
                "name": "Shipping",
                "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="Shipping")].status',
            },
            _AGE,
            _MESSAGE,
        ]
        what = "Rules of the kube-apiserver audit policy, joined by (priority, name)."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Cluster",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["kube-audit"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "description": what,
                            "type": "object",
                            **({"required": ["spec"]} if kind == "AuditPolicy" else {}),
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": _allow(model_schema(spec), allowed)
                                if kind == "AuditUser"
                                else model_schema(spec),
                                "status": _STATUS,
                            },
                        }
                    },
                }
            ],
        },
    }


CRD_FILES = {
    "AuditUser": "auditusers.kube-audit.io.yaml",
    "AuditPolicy": "auditpolicies.kube-audit.io.yaml",
}


def render_crd_yaml(kind: str, allowed: Allowed = NONE_ALLOWED) -> str:
    header = "# Generated by `make crds` from operator/kube_audit/core/models.py. Do not edit.\n"
    if kind == "AuditUser" and (allowed.users or allowed.groups):
        names = ", ".join(sorted(allowed.users | allowed.groups))
        header = f"# Generated by `kube-audit crds`, allowing {names}. Do not edit.\n"
    return header + yamlio.dump(render_crd(kind, allowed))
