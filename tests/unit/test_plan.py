from __future__ import annotations

import pytest
import yaml

from kube_audit.core.manifest import flag_value, parse_manifest, unpatch_manifest
from kube_audit.core.plan import (
    POLICY_FILE,
    TOKEN_FILE,
    collect_inputs,
    parse_documents,
    plan_desired,
    plan_manifest,
)
from kube_audit.core.settings import Settings
from tests.conftest import audit_policy, audit_user, kubeadm_manifest_text, long_token, token_secret

RULES = [{"level": "Metadata", "userGroups": ["developer"]}]


def _docs(*objs: object) -> list[tuple[str, object]]:
    return [(f"test#{i}", o) for i, o in enumerate(objs)]


def test_full_plan() -> None:
    inputs = collect_inputs(
        _docs(
            audit_user("alice", groups=["developer"]),
            audit_policy("dev", rules=RULES),
            token_secret("audituser-alice", long_token("tok-a")),
        )
    )
    desired = plan_desired(inputs, Settings())
    assert desired.problems == ()
    assert desired.files[TOKEN_FILE] == long_token("tok-a").encode() + b",alice,alice,developer\n"
    assert yaml.safe_load(desired.files[POLICY_FILE])["rules"] == RULES
    assert len(desired.config_hash) == 64
    manifest = plan_manifest(parse_manifest(kubeadm_manifest_text("v1.31")), desired)
    assert flag_value(manifest, "--token-auth-file") == (
        f"/etc/kubernetes/kube-audit/{desired.config_hash[:16]}/tokens.csv"
    )


def test_same_input_same_bytes_and_hash() -> None:
    objs = [
        audit_user("b"),
        audit_user("a"),
        token_secret("audituser-a", long_token("ta")),
        token_secret("audituser-b", long_token("tb")),
        audit_policy("p", rules=RULES),
    ]
    one = plan_desired(collect_inputs(_docs(*objs)), Settings())
    two = plan_desired(collect_inputs(_docs(*reversed(objs))), Settings())
    assert one.files == two.files and one.config_hash == two.config_hash


def test_hash_changes_with_content_and_rotation_settings() -> None:
    objs = _docs(audit_user("a"), token_secret("audituser-a", long_token("ta")))
    base = plan_desired(collect_inputs(objs), Settings())
    rotated = plan_desired(
        collect_inputs(_docs(audit_user("a"), token_secret("audituser-a", long_token("tb")))),
        Settings(),
    )
    longer = plan_desired(collect_inputs(objs), Settings(log_maxage=60))
    assert len({base.config_hash, rotated.config_hash, longer.config_hash}) == 3


def test_nothing_managed_when_no_objects() -> None:
    desired = plan_desired(collect_inputs([]), Settings())
    assert desired.files == {} and desired.config_hash == ""
    original = parse_manifest(kubeadm_manifest_text("v1.17"))
    assert plan_manifest(original, desired) == original


def test_invalid_objects_are_reported_and_left_out() -> None:
    inputs = collect_inputs(
        _docs(
            audit_user("alice"),
            token_secret("audituser-alice", long_token("t")),
            audit_user("mallory", groups=["system:masters"]),
            audit_policy("broken", rules=[{"level": "Loud"}]),
            audit_policy("good", rules=RULES),
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}},
            "just a string",
        )
    )
    desired = plan_desired(inputs, Settings())
    assert {p.obj for p in desired.problems} == {
        "AuditUser/mallory",
        "AuditPolicy/broken",
        "test#5",
        "test#6",
    }
    assert desired.users.accepted == ("alice",)
    assert desired.policies_accepted == ("good",)


def test_lists_are_flattened_and_duplicates_reported() -> None:
    inputs = collect_inputs(
        _docs({"apiVersion": "v1", "kind": "List", "items": [audit_user("a"), audit_user("a")]})
    )
    assert [p.message for p in inputs.problems] == [
        "is defined twice: test#0.items[0] and test#0.items[1]"
    ]


@pytest.mark.parametrize(
    ("api_version", "kind", "hint"),
    [
        ("kube-audit.io/v1alpha1", "AuditUsers", "did you mean AuditUser?"),
        ("kube-audit.io/v1alpha1", "audituser", "did you mean AuditUser?"),
        ("kube-audit.io/v1", "AuditPolicy", "AuditPolicy needs apiVersion kube-audit.io/v1alpha1"),
        ("v1", "ConfigMap", "or v1 Secret"),
    ],
)
def test_an_unknown_kind_suggests_the_closest(api_version: str, kind: str, hint: str) -> None:
    inputs = collect_inputs(_docs({"apiVersion": api_version, "kind": kind, "metadata": {}}))
    (problem,) = inputs.problems
    assert problem.field == "kind" and problem.message.endswith(hint), problem.message


def test_parse_documents_names_sources() -> None:
    docs = parse_documents("---\na: 1\n---\n---\nb: 2\n", "f.yaml")
    assert [s for s, _ in docs] == ["f.yaml#1", "f.yaml#3"]


def test_every_error_of_an_object_is_reported_at_once() -> None:
    """A type error in one field does not hide what the later checks find in the others."""
    user = audit_user(
        "bob",
        username="system:bob",
        disabled="maybe",
        extra=1,
        groups=["", "system:masters", "a,b"],
    )
    policy = audit_policy(
        "p",
        priority="x",
        rules=[
            {
                "level": "Loud",
                "verbs": [""],
                "nonResourceURLs": ["", "/a*b"],
                "resources": [{"group": "", "resourceNames": ["x"]}],
            }
        ],
    )
    desired = plan_desired(collect_inputs([("f#0", user), ("f#1", policy)]), Settings())
    found = {(p.obj, p.field) for p in desired.problems}
    assert found == {
        ("AuditUser/bob", "spec.disabled"),
        ("AuditUser/bob", "spec.extra"),
        ("AuditUser/bob", "spec.username"),
        ("AuditUser/bob", "spec.groups[0]"),  # empty: refused by the model
        ("AuditUser/bob", "spec.groups[1]"),  # named by the later check, at its input index
        ("AuditUser/bob", "spec.groups[2]"),
        ("AuditPolicy/p", "spec.priority"),
        ("AuditPolicy/p", "spec.rules[0].level"),
        ("AuditPolicy/p", "spec.rules[0].verbs[0]"),
        ("AuditPolicy/p", "spec.rules[0].nonResourceURLs"),
        ("AuditPolicy/p", "spec.rules[0].nonResourceURLs[0]"),
        ("AuditPolicy/p", "spec.rules[0].nonResourceURLs[1]"),
        ("AuditPolicy/p", "spec.rules[0].resources[0].resourceNames"),
    }
    messages = {p.field: p.message for p in desired.problems if p.obj == "AuditUser/bob"}
    assert "system:masters" in messages["spec.groups[1]"]
    assert '","' in messages["spec.groups[2]"]
    assert desired.files == {} and desired.users.accepted == ()


def test_audit_log_compression_is_a_flag_and_part_of_the_hash_only_when_on() -> None:
    objs = _docs(
        audit_user("a"),
        token_secret("audituser-a", long_token("ta")),
        audit_policy("p", rules=[{"level": "Metadata"}]),
    )
    base = plan_desired(collect_inputs(objs), Settings())
    compressed = plan_desired(collect_inputs(objs), Settings(log_compress=True))
    assert base.config_hash != compressed.config_hash
    assert base.config_hash == "d059975b521686cbd685d08b93ef61f831a51bf9b7f2af167332d786edf0341b", (
        "off, the hash is what 0.1.0 computed: upgrading restarts no apiserver"
    )
    manifest = parse_manifest(kubeadm_manifest_text("v1.31"))
    on = plan_manifest(manifest, compressed)
    assert flag_value(on, "--audit-log-compress") == "true"
    assert flag_value(plan_manifest(manifest, base), "--audit-log-compress") is None
    assert "--audit-log-compress" not in yaml.safe_dump(unpatch_manifest(on))
