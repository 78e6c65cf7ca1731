from __future__ import annotations

import pytest

from kube_audit.core.models import parse_audit_user, parse_secret
from kube_audit.core.settings import Settings
from kube_audit.core.tokens import TokenRecord, fingerprint
from kube_audit.core.users import UserResolution, resolve_users, secret_location
from kube_audit.errors import InvalidInput
from tests.conftest import audit_user, long_token, token_secret

SETTINGS = Settings()


def _resolve(users: list[dict], secrets: list[dict], settings: Settings = SETTINGS):  # type: ignore[no-untyped-def]
    return resolve_users(
        [parse_audit_user(u) for u in users], [parse_secret(s) for s in secrets], settings
    )


def test_defaults_username_uid_and_secret() -> None:
    user = parse_audit_user(audit_user("alice"))
    assert (user.username, user.uid, user.spec.groups, user.spec.disabled) == (
        "alice",
        "alice",
        [],
        False,
    )
    assert secret_location(user, SETTINGS) == ("kube-audit", "audituser-alice", "token")


def test_explicit_secret_ref_key_defaults_to_token() -> None:
    user = parse_audit_user(audit_user("a", tokenSecretRef={"namespace": "ns", "name": "s"}))
    assert secret_location(user, SETTINGS) == ("ns", "s", "token")


@pytest.mark.parametrize(
    ("spec", "field", "fragment"),
    [
        ({"groups": "developer"}, "spec.groups", "must be a list, not the string 'developer'"),
        ({"groups": ["ok", 3]}, "spec.groups[1]", "must be a string, not the number 3"),
        ({"nickname": "al"}, "spec.nickname", "unknown field"),
        ({"tokenSecretRef": {"name": "s"}}, "spec.tokenSecretRef.namespace", "is required"),
        (
            {"tokenSecretRef": {"namespace": "n", "name": "s", "extra": 1}},
            "spec.tokenSecretRef.extra",
            "unknown field",
        ),
        ({"disabled": "yes"}, "spec.disabled", "must be true or false, not the string 'yes'"),
        ({"disabled": None}, "spec.disabled", "must be true or false, not null"),
        ({"username": ""}, "spec.username", "must not be empty"),
        ({"username": "x" * 300}, "spec.username", "must be at most 253 characters"),
    ],
)
def test_schema_errors_name_object_and_field(spec: dict, field: str, fragment: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidInput) as info:
        parse_audit_user(audit_user("bob", **spec))
    problem = info.value.problems[0]
    assert problem.obj == "AuditUser/bob"
    assert problem.field == field
    assert fragment in problem.message
    assert str(problem).startswith(f"AuditUser/bob: {field}: ")
    for pydantic_words in ("Input should", "should have", "after validation", "Value error"):
        assert pydantic_words not in problem.message


def test_metadata_name_must_be_a_dns_subdomain() -> None:
    with pytest.raises(InvalidInput, match=r"metadata\.name"):
        parse_audit_user(audit_user("Bob_Smith"))


def test_records_for_enabled_users_only() -> None:
    result = _resolve(
        [
            audit_user("alice", uid="a@x", groups=["dev"]),
            audit_user("dave", disabled=True),
        ],
        [token_secret("audituser-alice", long_token("tok-a"))],
    )
    assert result.records == (TokenRecord("alice", "a@x", ("dev",), long_token("tok-a")),)
    assert result.accepted == ("alice", "dave")
    assert result.problems == ()


def test_missing_secret_names_user_and_secret() -> None:
    result = _resolve([audit_user("bob")], [])
    (problem,) = result.problems
    assert problem.obj == "AuditUser/bob"
    assert "Secret kube-audit/audituser-bob does not exist" in problem.message
    assert problem.pending, "the operator is about to create it: not a mistake of the user's"


def test_a_referenced_secret_not_there_yet_is_in_progress() -> None:
    """examples/auditusers.yaml's ci-deployer before its Secret is made (by a person, an
    ExternalSecret or a SealedSecret in the same sync): Reconciling, never Stalled, which Flux
    and Argo CD would treat as failed although it heals by itself."""
    ref = {"namespace": "kube-audit", "name": "ci-deployer-token", "key": "token"}
    result = _resolve([audit_user("ci-deployer", tokenSecretRef=ref)], [])
    (problem,) = result.problems
    assert problem.pending and problem.field == "spec.tokenSecretRef"
    assert "Secret kube-audit/ci-deployer-token does not exist yet" in problem.message


def test_missing_key_names_key() -> None:
    result = _resolve(
        [audit_user("bob", tokenSecretRef={"namespace": "vault", "name": "bob", "key": "pw"})],
        [token_secret("bob", long_token("t"), namespace="vault", token_for="bob")],
    )
    (problem,) = result.problems
    assert (problem.field, problem.message) == (
        "spec.tokenSecretRef",
        "Secret vault/bob has no key 'pw'",
    )


@pytest.mark.parametrize(
    "token",
    ["", "short", long_token("tok\n"), long_token("a b"), long_token("a,b"), long_token('a"b')],
)
def test_bad_tokens_are_refused_and_never_printed(token: str) -> None:
    result = _resolve([audit_user("bob")], [token_secret("audituser-bob", token)])
    (problem,) = result.problems
    assert problem.obj == "AuditUser/bob"
    if token.strip():
        assert token not in str(problem)
    assert result.records == ()


def test_shared_token_refuses_the_newer_user() -> None:
    alice = audit_user("alice")
    alice["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    bob = audit_user("bob")
    bob["metadata"]["creationTimestamp"] = "2026-02-01T00:00:00Z"
    result = _resolve(
        [bob, alice],
        [
            token_secret("audituser-alice", long_token("same")),
            token_secret("audituser-bob", long_token("same")),
        ],
    )
    assert [r.username for r in result.records] == ["alice"]
    (problem,) = result.problems
    assert problem.obj == "AuditUser/bob" and "AuditUser/alice" in problem.message


def test_username_conflict_names_both_objects() -> None:
    result = _resolve(
        [audit_user("alice"), audit_user("alice2", username="alice")],
        [
            token_secret("audituser-alice", long_token("t1")),
            token_secret("audituser-alice2", long_token("t2")),
        ],
    )
    (problem,) = result.problems
    assert problem.obj == "AuditUser/alice2"
    assert problem.field == "spec.username"
    assert "already claimed by AuditUser/alice" in problem.message
    assert [r.token for r in result.records] == [long_token("t1")]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"groups": ["dev", "system:masters"]}, "spec.groups[1]"),
        ({"groups": ["system:nodes"]}, "spec.groups[0]"),
        ({"username": "system:kube-controller-manager"}, "spec.username"),
        ({"groups": ["a,b"]}, "spec.groups[0]"),
        ({"groups": ["dev", "dev"]}, "spec.groups[1]"),
        ({"uid": "tab\there"}, "spec.uid"),
    ],
)
def test_identity_guard(spec: dict, field: str) -> None:  # type: ignore[type-arg]
    result = _resolve([audit_user("eve", **spec)], [token_secret("audituser-eve", long_token("t"))])
    (problem,) = result.problems
    assert (problem.obj, problem.field) == ("AuditUser/eve", field)
    assert result.records == ()


def test_system_masters_message_says_why() -> None:
    result = _resolve(
        [audit_user("eve", groups=["system:masters"])],
        [token_secret("audituser-eve", long_token("t"))],
    )
    assert "cluster-admin" in result.problems[0].message


def test_allow_list_lets_exact_group_through() -> None:
    settings = Settings(allowed_system_groups=frozenset({"system:monitoring"}))
    result = _resolve(
        [audit_user("mon", groups=["system:monitoring"])],
        [token_secret("audituser-mon", long_token("t"))],
        settings,
    )
    assert result.problems == ()
    blocked = _resolve(
        [audit_user("mon", groups=["system:masters"])],
        [token_secret("audituser-mon", long_token("t"))],
        settings,
    )
    assert blocked.problems


def test_invalid_user_does_not_block_valid_ones() -> None:
    result = _resolve(
        [audit_user("good"), audit_user("bad", groups=["system:masters"])],
        [
            token_secret("audituser-good", long_token("g")),
            token_secret("audituser-bad", long_token("b")),
        ],
    )
    assert [r.username for r in result.records] == ["good"]
    assert [p.obj for p in result.problems] == ["AuditUser/bad"]


def test_secret_data_is_base64_and_checked() -> None:
    secret = parse_secret(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s", "namespace": "n"},
            "data": {"token": "dG9r"},
        }
    )
    assert secret.data == {"token": b"tok"}
    with pytest.raises(InvalidInput, match=r"data\.token: is not valid base64"):
        parse_secret({"metadata": {"name": "s", "namespace": "n"}, "data": {"token": "!!"}})


REF = {"namespace": "team-a", "name": "sa-token", "key": "token"}


@pytest.mark.parametrize(
    "secrets",
    [
        [],  # does not exist
        [token_secret("sa-token", long_token("x"), namespace="team-a")],  # no consent
        [token_secret("sa-token", long_token("x"), namespace="team-a", token_for="eve")],
    ],
)
def test_a_secret_elsewhere_needs_its_consent_and_is_never_described(
    secrets: list[dict[str, object]],
) -> None:
    """Whoever can create an AuditUser must not turn another team's Secret into a token, nor
    learn from the status whether it exists: the message is the same in every case."""
    result = _resolve([audit_user("mallory", tokenSecretRef=REF)], secrets)
    assert result.records == ()
    (problem,) = result.problems
    assert problem.message == (
        "Secret team-a/sa-token is outside the token namespace kube-audit: it is used only if "
        "it exists and carries the label kube-audit.io/token-for=mallory (whoever can write "
        "Secrets in team-a consents by adding it)"
    )


def test_a_secret_elsewhere_labelled_for_the_user_is_used() -> None:
    secret = token_secret("sa-token", long_token("x"), namespace="team-a", token_for="mallory")
    result = _resolve([audit_user("mallory", tokenSecretRef=REF)], [secret])
    assert [r.username for r in result.records] == ["mallory"] and result.problems == ()


def test_nobody_takes_another_persons_generated_token() -> None:
    """Before: an older AuditUser naming kube-audit/audituser-bob in tokenSecretRef got bob's
    token (the older object wins the conflict) and bob was refused."""
    squatter = audit_user(
        "mallory", tokenSecretRef={"namespace": "kube-audit", "name": "audituser-bob"}
    )
    squatter["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    bob = audit_user("bob")
    bob["metadata"]["creationTimestamp"] = "2026-06-01T00:00:00Z"
    result = _resolve([squatter, bob], [token_secret("audituser-bob", long_token("bob"))])
    assert [r.username for r in result.records] == ["bob"]
    [problem] = result.problems
    assert problem.obj == "AuditUser/mallory" and problem.field == "spec.tokenSecretRef"
    assert "AuditUser bob's generated token" in problem.message


def test_a_reference_to_ones_own_generated_secret_is_fine() -> None:
    own = audit_user("bob", tokenSecretRef={"namespace": "kube-audit", "name": "audituser-bob"})
    result = _resolve([own], [token_secret("audituser-bob", long_token("bob"))])
    assert [r.username for r in result.records] == ["bob"] and not result.problems


def test_each_accepted_user_has_the_fingerprint_of_the_token_it_is_served_with() -> None:
    disabled = audit_user("dave", disabled=True)
    result = _resolve(
        [audit_user("alice"), disabled, audit_user("bob")],
        [token_secret("audituser-alice", long_token("a"))],
    )
    assert dict(result.tokens) == {"alice": fingerprint(long_token("a")), "dave": ""}
    assert "bob" not in dict(result.tokens), "not served: its Secret is missing"


def test_a_namespace_without_a_grant_says_how_to_grant_it() -> None:
    """The operator holds no cluster-wide Secret access: where its list was refused (403),
    the user names the namespace and the command an admin runs, whatever the Secret is."""
    secret = token_secret("sa-token", long_token("x"), namespace="team-a", token_for="mallory")
    users = [audit_user("mallory", tokenSecretRef=REF), audit_user("bob")]
    result = resolve_users(
        [parse_audit_user(u) for u in users],
        [parse_secret(s) for s in (secret, token_secret("audituser-bob", long_token("b")))],
        SETTINGS,
        unreadable={"team-a"},
    )
    assert [r.username for r in result.records] == ["bob"], "the others go on"
    (problem,) = result.problems
    assert (problem.obj, problem.field, problem.pending) == (
        "AuditUser/mallory",
        "spec.tokenSecretRef",
        False,
    )
    assert problem.message == (
        "kube-audit may not read Secrets in namespace team-a (no grant there): an admin grants "
        "it with 'kube-audit grant-secrets team-a | kubectl apply -f -' (a Role and "
        "RoleBinding in that namespace: list and watch Secrets)"
    )


def test_an_unreadable_token_namespace_points_at_the_install() -> None:
    """Not 'grant-secrets': there the operator also creates and rotates, as deploy/ grants."""
    result = _resolve_unreadable([audit_user("bob")], {"kube-audit"})
    (problem,) = result.problems
    assert "token namespace kube-audit: its Role there (deploy/rbac.yaml" in problem.message


def _resolve_unreadable(users: list[dict[str, object]], unreadable: set[str]) -> UserResolution:
    return resolve_users([parse_audit_user(u) for u in users], [], SETTINGS, unreadable=unreadable)


def test_fingerprints_are_keyed_with_the_clusters_key_when_it_is_there() -> None:
    """Issue 36, finding 8: the fingerprint on status is no digest of the token once the
    operator's fingerprint key Secret is in the inputs; a plan from files (no key) keeps the
    SHA-256 one. The key Secret is nobody's token."""
    key = "k" * 43
    users = [audit_user("alice")]
    secrets = [token_secret("audituser-alice", long_token("tok-a"))]
    plain = _resolve(users, secrets)
    assert plain.tokens == (("alice", fingerprint(long_token("tok-a"))),)
    assert plain.fingerprint_key is None
    keyed = _resolve(users, [*secrets, token_secret("kube-audit-fingerprint-key", key, key="key")])
    ((_, tag),) = keyed.tokens
    assert tag == fingerprint(long_token("tok-a"), key.encode()) and tag.startswith("hmac:")
    assert tag != fingerprint(long_token("tok-a"), b"another cluster's key, 32 bytes!")
    thief = audit_user("mallory", tokenSecretRef={"namespace": "kube-audit",
                                                 "name": "kube-audit-fingerprint-key", "key": "key"})  # fmt: skip
    refused = _resolve([thief], [token_secret("kube-audit-fingerprint-key", key, key="key")])
    (problem,) = refused.problems
    assert problem.field == "spec.tokenSecretRef" and "fingerprints" in problem.message
