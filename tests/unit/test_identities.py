"""The identity snapshot and the TokenReview answers of webhook mode (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, strategies as st

from kube_audit.constants import CREDENTIAL_ID
from kube_audit.core.identities import (
    Allowed,
    Identity,
    SnapshotError,
    lookup_digest,
    parse_identity_snapshot,
    render_identity_snapshot,
    render_keyed_snapshot,
    review_token,
    snapshot_is_keyed,
    token_digest,
)
from kube_audit.core.tokens import TokenRecord, fingerprint

ALICE = TokenRecord("alice", "u-alice", ("dev", "ops"), "A" * 43)
BOB = TokenRecord("bob", "u-bob", (), "B" * 43)


def _review(token: Any, version: str = "authentication.k8s.io/v1") -> bytes:
    return json.dumps(
        {"apiVersion": version, "kind": "TokenReview", "spec": {"token": token}}
    ).encode()


def test_the_snapshot_holds_digests_never_tokens_and_is_the_same_for_the_same_people() -> None:
    data = render_identity_snapshot([BOB, ALICE])
    assert ALICE.token.encode() not in data and BOB.token.encode() not in data
    assert data == render_identity_snapshot([ALICE, BOB])
    assert parse_identity_snapshot(data) == {
        token_digest(ALICE.token): Identity("alice", "u-alice", ("dev", "ops")),
        token_digest(BOB.token): Identity("bob", "u-bob", ()),
    }


names = st.text(st.characters(exclude_categories=("Cc", "Cf", "Zl", "Zp", "Cs")), min_size=1)


@given(
    st.lists(
        st.tuples(names, names, st.lists(names.filter(lambda g: "," not in g), max_size=3)),
        max_size=5,
    )
)
def test_what_is_rendered_parses_back(people: list[tuple[str, str, list[str]]]) -> None:
    records = [
        TokenRecord(
            u.strip() or "x", i.strip() or "y", tuple(g.strip() or "z" for g in gs), f"t{n:040}"
        )
        for n, (u, i, gs) in enumerate(people)
    ]
    parsed = parse_identity_snapshot(render_identity_snapshot(records))
    assert parsed == {token_digest(r.token): Identity(r.username, r.uid, r.groups) for r in records}


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"{", "not JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"apiVersion": "v1", "kind": "List"}', "apiVersion/kind must be"),
        (
            b'{"apiVersion": "kube-audit.io/v1alpha1", "kind": "IdentitySnapshot", '
            b'"identities": [{"sha256": "AB", "username": "a", "uid": "1"}]}',
            "identities[0].sha256: must be 64 lower-case hex digits",
        ),
        (
            b'{"apiVersion": "kube-audit.io/v1alpha1", "kind": "IdentitySnapshot", '
            b'"identities": [{"sha256": "' + b"a" * 64 + b'", "username": " a", "uid": "1"}]}',
            "identities[0].username: must not start or end with whitespace",
        ),
        (
            b'{"apiVersion": "kube-audit.io/v1alpha1", "kind": "IdentitySnapshot", '
            b'"identities": [{"sha256": "' + b"a" * 64 + b'", "username": "a", "uid": "1", '
            b'"groups": ["x,y"]}]}',
            "identities[0].groups[0]: must not contain",
        ),
    ],
)
def test_a_snapshot_we_did_not_write_is_refused_whole_and_says_where(
    data: bytes, says: str
) -> None:
    with pytest.raises(SnapshotError, match=r"^identity snapshot: ") as caught:
        parse_identity_snapshot(data)
    assert says in str(caught.value)


def test_one_token_for_two_people_is_refused() -> None:
    data = render_identity_snapshot([ALICE, ALICE._replace(username="mallory")])
    with pytest.raises(SnapshotError, match=r"identities\[1\].sha256: the token of alice again"):
        parse_identity_snapshot(data)


def test_a_known_token_gets_its_person_exactly_in_the_version_asked() -> None:
    identities = parse_identity_snapshot(render_identity_snapshot([ALICE, BOB]))
    for version in ("authentication.k8s.io/v1", "authentication.k8s.io/v1beta1"):
        answer = review_token(identities, _review(ALICE.token, version))
        assert answer.status == 200
        assert answer.body == {
            "apiVersion": version,
            "kind": "TokenReview",
            "status": {
                "authenticated": True,
                "user": {
                    "username": "alice",
                    "uid": "u-alice",
                    "groups": ["dev", "ops"],
                    "extra": {CREDENTIAL_ID: [f"kube-audit-token={fingerprint(ALICE.token)}"]},
                },
            },
        }


@pytest.mark.parametrize("token", ["", "C" * 43, "A" * 42, "A" * 44])
def test_an_unknown_token_is_not_authenticated_which_the_apiserver_may_cache(token: str) -> None:
    identities = parse_identity_snapshot(render_identity_snapshot([ALICE]))
    answer = review_token(identities, _review(token))
    assert answer == (
        200,
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "status": {"authenticated": False},
        },
    )
    assert token not in json.dumps(answer.body) or not token, "the token is never echoed"


def test_before_the_first_load_the_answer_is_an_error_which_is_never_cached() -> None:
    answer = review_token(None, _review(ALICE.token))
    assert answer.status == 200
    assert answer.body["status"]["authenticated"] is False
    assert "not loaded yet" in answer.body["status"]["error"]


def test_a_system_group_or_kubeadms_admin_group_is_never_given() -> None:
    crafted = ALICE._replace(groups=("dev", "system:masters", "kubeadm:cluster-admins", "system:x"))
    identities = parse_identity_snapshot(render_identity_snapshot([crafted]))
    answer = review_token(identities, _review(ALICE.token))
    assert answer.body["status"]["user"]["groups"] == ["dev"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"nope", "not JSON"),
        (b"[1]", "not a TokenReview object"),
        (
            b'{"apiVersion": "authentication.k8s.io/v2", "kind": "TokenReview"}',
            "expected a TokenReview",
        ),
        (b'{"apiVersion": "v1", "kind": "Pod", "spec": {"token": "x"}}', "got Pod v1"),
        (b'{"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview"}', "spec.token"),
        (
            b'{"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": 1}}',
            "spec.token",
        ),
    ],
)
def test_a_question_that_is_not_a_token_review_is_a_bad_request(body: bytes, says: str) -> None:
    answer = review_token({}, body)
    assert answer.status == 400
    assert says in answer.body["error"]


def test_a_system_user_name_is_never_given_but_the_guard_allows_it() -> None:
    """Issue 36 finding 7: validation refuses ``system:`` user names, and the webhook holds the
    same line on its own (one like system:serviceaccount:kube-system:x would match
    ServiceAccount subjects in RBAC); a name or group the operator's guard allows is given, as
    token-file mode gives it."""
    sneaky = TokenRecord("system:serviceaccount:kube-system:x", "u-x", ("system:nodes", "dev"),
                         "x" * 43)  # fmt: skip
    identities = parse_identity_snapshot(render_identity_snapshot([sneaky]))
    review = _review(sneaky.token, "authentication.k8s.io/v1")
    assert review_token(identities, review).body["status"] == {"authenticated": False}
    allowed = Allowed(frozenset({sneaky.username}), frozenset({"system:nodes"}))
    user = review_token(identities, review, allowed=allowed).body["status"]["user"]
    assert (user["username"], user["groups"]) == (sneaky.username, ["system:nodes", "dev"])
    only_user = Allowed(frozenset({sneaky.username}))
    user = review_token(identities, review, allowed=only_user).body["status"]["user"]
    assert user["groups"] == ["dev"]


def test_the_answer_names_the_keyed_fingerprint_and_the_file_no_digest() -> None:
    """Issue 36, finding 8: the credential ID kube-apiserver writes into every audit event is
    the status's keyed fingerprint, carried by the snapshot (the webhook has no key of the
    cluster's); the node keeps the snapshot with its digests keyed by its own secret."""
    token, cluster_key, node_key = "t" * 40, b"c" * 32, b"n" * 32
    plan = render_identity_snapshot([TokenRecord("alice", "a", ("dev",), token)], 20, cluster_key)
    on_node = render_keyed_snapshot(plan, node_key)
    assert snapshot_is_keyed(on_node) and not snapshot_is_keyed(plan)
    assert token_digest(token) not in on_node.decode()
    assert fingerprint(token).removeprefix("sha256:") not in on_node.decode()
    identities = parse_identity_snapshot(on_node)
    assert list(identities) == [lookup_digest(token, node_key)]
    body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                       "spec": {"token": token}}).encode()  # fmt: skip
    user = review_token(identities, body, 0, key=node_key).body["status"]["user"]
    assert user["extra"]["authentication.kubernetes.io/credential-id"] == [
        "kube-audit-token=" + fingerprint(token, cluster_key)
    ]
    with pytest.raises(SnapshotError, match="already keyed"):
        render_keyed_snapshot(on_node, node_key)
