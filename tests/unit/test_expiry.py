"""spec.expiresAt (issue 21): checked as RFC 3339, refused when not after the object's creation,
judged against an injected time: out of the token file and the status Expired from that time,
carried in the webhook's snapshot so the webhook refuses the token at that second."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kube_audit.core import yamlio
from kube_audit.core.identities import parse_identity_snapshot, review_token
from kube_audit.core.models import parse_audit_user
from kube_audit.core.plan import TOKEN_FILE, collect_inputs, plan_desired
from kube_audit.core.settings import Settings
from kube_audit.core.status import APPLIED, EXPIRED, compute_conditions, node_entry
from kube_audit.errors import InvalidInput
from tests.conftest import audit_user, long_token, token_secret

EXPIRES = "2027-01-31T18:00:00Z"
AT = datetime(2027, 1, 31, 18, tzinfo=UTC)


def _problems(obj: dict[str, Any]) -> list[str]:
    with pytest.raises(InvalidInput) as error:
        parse_audit_user(obj)
    return [f"{p.obj}: {p.field}: {p.message}" for p in error.value.problems]


@pytest.mark.parametrize(
    "value",
    ["2027-01-31T18:00:00Z", "2027-01-31t18:00:00.5+02:00", "2027-01-31 18:00:00-07:30"],
)
def test_rfc3339_times_are_taken(value: str) -> None:
    user = parse_audit_user(audit_user("alice", expiresAt=value))
    assert user.expires is not None and user.expires.tzinfo is not None


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("tomorrow", "'tomorrow' is not an RFC 3339 time with a zone"),
        ("2027-01-31T18:00:00", "is not an RFC 3339 time with a zone"),
        (1798740000, "must be"),
    ],
)
def test_a_bad_time_is_named(value: Any, said: str) -> None:
    (problem,) = _problems(audit_user("alice", expiresAt=value))
    assert problem.startswith("AuditUser/alice: spec.expiresAt: ") and said in problem, problem


def test_a_yaml_timestamp_is_read_as_go_reads_it() -> None:
    """Unquoted in a file, PyYAML makes it a datetime (Go keeps the text): the same instant;
    without a zone, or a bare date, it is refused with what to write instead."""
    (obj,) = yamlio.load_all(
        "apiVersion: kube-audit.io/v1alpha1\nkind: AuditUser\nmetadata: {name: a}\n"
        "spec: {expiresAt: 2027-01-31T18:00:00Z}\n"
    )
    assert parse_audit_user(obj).expires == AT
    obj["spec"]["expiresAt"] = AT.replace(tzinfo=None)
    assert "has no zone; add Z or an offset" in _problems(obj)[0]
    obj["spec"]["expiresAt"] = AT.date()
    assert "give a time and a zone, e.g. 2027-01-31T00:00:00Z" in _problems(obj)[0]


def test_an_expiry_not_after_creation_is_refused() -> None:
    obj = audit_user("alice", expiresAt=EXPIRES)
    obj["metadata"]["creationTimestamp"] = "2027-02-01T00:00:00Z"
    (problem,) = _problems(obj)
    assert problem.startswith("AuditUser/alice: spec.expiresAt: 2027-01-31T18:00:00Z is not after")
    assert "the token would never work" in problem
    obj["metadata"]["creationTimestamp"] = "2027-01-01T00:00:00Z"
    assert parse_audit_user(obj).expires == AT


def _plan(now: datetime, mode: str = "token-file") -> Any:
    objs = [
        audit_user("alice", expiresAt=EXPIRES),
        token_secret("audituser-alice", long_token("tok-alice")),
        audit_user("bob"),
        token_secret("audituser-bob", long_token("tok-bob")),
    ]
    settings = Settings(identity_mode="webhook" if mode == "webhook" else "token-file")
    inputs = collect_inputs([(f"t#{i}", o) for i, o in enumerate(objs)])
    return plan_desired(inputs, settings, now=now)


def _review(snapshot: bytes, token: str, now: float) -> dict[str, Any]:
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": token}}  # fmt: skip
    answer = review_token(parse_identity_snapshot(snapshot), json.dumps(body).encode(), now)
    return dict(answer.body["status"])


def test_the_plan_leaves_an_expired_person_out_from_that_time() -> None:
    before, after = _plan(AT - timedelta(seconds=1)), _plan(AT)
    assert b"alice" in before.files[TOKEN_FILE] and b"alice" not in after.files[TOKEN_FILE]
    assert before.users.expiries == (("alice", AT),) and before.users.expired == ()
    assert after.users.expired == ("alice",) and ("alice", "") in after.users.tokens
    assert before.config_hash != after.config_hash, "token-file mode: one restart per node"
    webhook_before, webhook_after = (
        _plan(AT - timedelta(seconds=1), "webhook"),
        _plan(AT, "webhook"),
    )
    assert webhook_before.config_hash == webhook_after.config_hash, "webhook mode: none"


def test_the_webhook_refuses_the_token_before_any_cached_success_outlives_it() -> None:
    """From the snapshot planned before the expiry: the operator need not be there. Issue 36
    finding 10: refused from expiresAt less what kube-apiserver may still serve from its
    cache (the webhook TTL, 10 s by default, plus 10 s), so no request is accepted after
    expiresAt; before, a success cached a second before it served for 20 s more."""
    snapshot = _plan(AT - timedelta(hours=1), "webhook").identities
    assert json.loads(snapshot)["identities"][0]["expiresAt"] == "2027-01-31T18:00:00+00:00"
    assert json.loads(snapshot)["refuseBeforeExpirySeconds"] == 20
    alice = long_token("tok-alice")
    assert _review(snapshot, alice, AT.timestamp() - 20.001)["authenticated"] is True
    assert _review(snapshot, alice, AT.timestamp() - 20) == {"authenticated": False}
    assert _review(snapshot, long_token("tok-bob"), AT.timestamp() + 1e6)["authenticated"] is True


def test_the_status_says_expired() -> None:
    obj = audit_user("alice", expiresAt=EXPIRES)
    obj["metadata"]["generation"] = 1
    entries = {n: node_entry(generation=1, outcome=APPLIED, message="live", time=EXPIRES,
                             token="") for n in ("cp-1", "cp-2")}  # fmt: skip
    entries["cp-2"]["token"] = "sha256:0123456789ab"
    obj["status"] = {"nodes": entries}
    status = compute_conditions(obj, ["cp-1", "cp-2"], "2027-01-31T18:00:00Z", "")
    ready = {c["type"]: c for c in status["conditions"]}
    assert (ready["Ready"]["status"], ready["Ready"]["reason"]) == ("False", EXPIRED)
    assert ready["Ready"]["message"] == (
        "expired at 2027-01-31T18:00:00Z: its token is refused; gone from 1 of 2 control-plane "
        "node(s)"
    )
    assert ready["Stalled"]["status"] == ready["Reconciling"]["status"] == "False"
    earlier = compute_conditions(obj, ["cp-1", "cp-2"], "2027-01-31T17:59:59Z", "")
    assert {c["type"]: c for c in earlier["conditions"]}["Ready"]["reason"] != EXPIRED


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [("10s", 20.0), ("1m30s", 100.0), ("250us", 10.00025), ("1.5s", 11.5), ("0", 10.0)],
)
def test_every_go_duration_the_ttl_takes_sets_the_margin(ttl: str, seconds: float) -> None:
    """The CLI takes any Go duration for the cache TTL; the snapshot's margin reads them all."""
    settings = Settings(identity_mode="webhook", webhook_cache_ttl=ttl)
    snapshot = plan_desired(collect_inputs([]), settings).identities
    assert json.loads(snapshot)["refuseBeforeExpirySeconds"] == pytest.approx(seconds)
