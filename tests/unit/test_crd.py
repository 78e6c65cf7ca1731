"""The CRDs agree with the pydantic models: same fields, types, defaults, and CEL rules that
accept what the core accepts and refuse what it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml

from kube_audit.core.crd import CRD_FILES, render_crd, render_crd_yaml
from kube_audit.core.models import AuditPolicySpec, AuditUserSpec
from kube_audit.core.plan import collect_inputs
from kube_audit.core.settings import Settings
from kube_audit.core.users import resolve_users
from tests.conftest import audit_policy, audit_user

REPO = Path(__file__).resolve().parents[2]
_CEL = celpy.Environment()


def _schema(kind: str) -> dict[str, Any]:
    return render_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_checked_in_crds_are_current(kind: str) -> None:
    assert (REPO / "crds" / CRD_FILES[kind]).read_text() == render_crd_yaml(kind), "run `make crds`"


def _walk_fields(model: Any, schema: dict[str, Any]) -> None:
    props = schema["properties"]
    keys = {info.alias or name for name, info in model.model_fields.items()}
    assert set(props) == keys
    for name, info in model.model_fields.items():
        prop = props[info.alias or name]
        assert prop.get("description"), f"{name} has a description for kubectl explain"
        if info.is_required():
            assert (info.alias or name) in schema.get("required", [])
        inner = prop.get("items", prop)
        if "properties" in inner:
            sub = info.annotation
            args = getattr(sub, "__args__", ())
            _walk_fields(next(a for a in (*args, sub) if hasattr(a, "model_fields")), inner)


@pytest.mark.parametrize(
    ("kind", "model"), [("AuditUser", AuditUserSpec), ("AuditPolicy", AuditPolicySpec)]
)
def test_schema_has_every_model_field(kind: str, model: Any) -> None:
    _walk_fields(model, _schema(kind)["properties"]["spec"])


def test_printer_columns_and_names() -> None:
    user = render_crd("AuditUser")["spec"]
    columns = user["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in columns] == [
        "Username",
        "Groups",
        "Disabled",
        "Ready",
        "Status",
        "Age",
        "Message",
    ]
    assert [c.get("priority", 0) for c in columns] == [0, 0, 0, 0, 0, 0, 1], "Message: -o wide"
    assert user["names"]["shortNames"] == ["au"] and user["scope"] == "Cluster"
    policy = render_crd("AuditPolicy")["spec"]
    assert [c["name"] for c in policy["versions"][0]["additionalPrinterColumns"]] == [
        "Priority",
        "Rules",
        "Ready",
        "Status",
        "Shipping",
        "Age",
        "Message",
    ]
    assert policy["versions"][0]["subresources"] == {"status": {}}


def _cel_failures(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Evaluate every x-kubernetes-validations rule the way the apiserver walks the object."""
    failures = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = _CEL.program(_CEL.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            failures.append(f"{path}: {rule['message']}")
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                failures += _cel_failures(sub, value[key], f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            failures += _cel_failures(schema["items"], item, f"{path}[{i}]")
    return failures


def _crd_refuses(kind: str, obj: dict[str, Any]) -> bool:
    schema = _schema(kind)
    try:
        jsonschema.validate(obj["spec"], schema["properties"]["spec"])
    except jsonschema.ValidationError:
        return True
    return bool(_cel_failures(schema["properties"]["spec"], obj["spec"]))


def _core_refuses(obj: dict[str, Any]) -> bool:
    """The core's verdict, leaving out the missing token Secret (not a schema matter)."""
    inputs = collect_inputs([("t", obj)])
    problems = [*inputs.problems, *resolve_users(inputs.users, [], Settings()).problems]
    return any("does not exist" not in p.message for p in problems)


R = {"level": "Metadata"}
CASES = [
    ("AuditUser", audit_user("ok", groups=["developer"], uid="a@b"), False),
    ("AuditUser", audit_user("ok"), False),
    ("AuditUser", audit_user("x", groups=["system:masters"]), True),
    ("AuditUser", audit_user("x", groups=["kubeadm:cluster-admins"]), True),
    ("AuditUser", audit_user("x", username="system:admin"), True),
    ("AuditUser", audit_user("x", groups=["a,b"]), True),
    ("AuditUser", audit_user("x", groups="developer"), True),
    ("AuditUser", audit_user("x", groups=[""]), True),
    ("AuditUser", audit_user("x", disabled="yes"), True),
    ("AuditUser", audit_user("x", tokenSecretRef={"name": "s"}), True),
    (
        "AuditPolicy",
        audit_policy("ok", rules=[{**R, "nonResourceURLs": ["/healthz*", "*"]}]),
        False,
    ),
    (
        "AuditPolicy",
        audit_policy("ok", priority=5, omitStages=["RequestReceived"], rules=[R]),
        False,
    ),
    (
        "AuditPolicy",
        audit_policy(
            "ok",
            rules=[
                {
                    **R,
                    "resources": [
                        {"group": "apps", "resources": ["deployments"], "resourceNames": ["web"]}
                    ],
                }
            ],
        ),
        False,
    ),
    ("AuditPolicy", audit_policy("x", rules=[]), True),
    ("AuditPolicy", audit_policy("x", rules=[{"level": "Loud"}]), True),
    ("AuditPolicy", audit_policy("x", rules=[{**R, "omitStages": ["Done"]}]), True),
    ("AuditPolicy", audit_policy("x", rules=[{**R, "nonResourceURLs": ["healthz"]}]), True),
    ("AuditPolicy", audit_policy("x", rules=[{**R, "nonResourceURLs": ["/a*b"]}]), True),
    (
        "AuditPolicy",
        audit_policy("x", rules=[{**R, "nonResourceURLs": ["/a"], "namespaces": ["n"]}]),
        True,
    ),
    (
        "AuditPolicy",
        audit_policy("x", rules=[{**R, "resources": [{"group": "rbac.authorization.k8s.io/v1"}]}]),
        True,
    ),
    (
        "AuditPolicy",
        audit_policy("x", rules=[{**R, "resources": [{"resourceNames": ["a"]}]}]),
        True,
    ),
]


@pytest.mark.parametrize(("kind", "obj", "refused"), CASES)
def test_crd_and_core_agree(kind: str, obj: dict[str, Any], refused: bool) -> None:
    assert _core_refuses(obj) is refused
    assert _crd_refuses(kind, obj) is refused


def test_examples_pass_the_crds() -> None:
    for path in (REPO / "examples").glob("*.yaml"):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj and obj.get("apiVersion") == "kube-audit.io/v1alpha1":
                assert not _crd_refuses(obj["kind"], obj), path


def test_the_guard_flags_given_to_crds_let_exactly_those_names_through() -> None:
    """Issue 37 item 5: the CRD cannot read the operator's flags, so ``kube-audit crds`` takes
    the same ones; what it lets through is what the core lets through with them."""
    from kube_audit.core.identities import Allowed  # noqa: PLC0415

    allowed = Allowed(frozenset({"system:kube-audit-probe"}),
                      frozenset({"system:monitoring", "kubeadm:cluster-admins"}))  # fmt: skip
    spec = render_crd("AuditUser", allowed)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = spec["properties"]["spec"]
    settings = Settings(allowed_system_users=allowed.users, allowed_system_groups=allowed.groups)
    cases = [
        ({"username": "system:kube-audit-probe"}, False),
        ({"username": "system:kube-scheduler"}, True),
        ({"groups": ["system:monitoring", "kubeadm:cluster-admins", "dev"]}, False),
        ({"groups": ["system:masters"]}, True),
        ({"groups": ["system:monitoring", "system:masters"]}, True),
    ]
    for fields, refused in cases:
        obj = audit_user("probe", **fields)
        assert bool(_cel_failures(spec, obj["spec"])) == refused, fields
        inputs = collect_inputs([("x#0", obj)])
        problems = [*inputs.problems, *resolve_users(inputs.users, [], settings).problems]
        core = any("does not exist" not in p.message for p in problems)
        assert core == refused, (fields, problems)
    default = _schema("AuditUser")["properties"]["spec"]
    assert _cel_failures(default, {"username": "system:kube-audit-probe"})
    assert _cel_failures(default, {"groups": ["system:monitoring"]})
    header = render_crd_yaml("AuditUser", allowed).splitlines()[0]
    assert "allowing kubeadm:cluster-admins, system:kube-audit-probe, system:monitoring" in header
