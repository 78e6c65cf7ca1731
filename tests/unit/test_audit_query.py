from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from kube_audit.constants import CREDENTIAL_ID
from kube_audit.core.audit_query import (
    WIDE_HEADER,
    Query,
    matches,
    may_match,
    parse_status,
    parse_time,
    resource_plural,
    table_row,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
EVENT = {
    "auditID": "1",
    "stage": "ResponseComplete",
    "verb": "create",
    "user": {"username": "alice", "groups": ["developer", "system:authenticated"]},
    "objectRef": {"resource": "ingresses", "namespace": "test", "name": "web"},
    "responseStatus": {"code": 201},
    "requestReceivedTimestamp": "2026-11-27T10:00:00.000000Z",
}


@pytest.mark.parametrize(
    ("name", "plural"),
    [("crd", "customresourcedefinitions"), ("ing", "ingresses"), ("svc", "services"),
     ("ingress", "ingresses"), ("pod", "pods"), ("pods", "pods"), ("networkpolicy", "networkpolicies"),
     ("deployment", "deployments"), ("Deploy", "deployments"), ("au", "auditusers"),
     ("ingresses.networking.k8s.io", "ingresses")],
)  # fmt: skip
def test_resource_names(name: str, plural: str) -> None:
    assert resource_plural(name) == plural


def test_times() -> None:
    assert parse_time("2h", NOW) == "2026-11-27T10:00:00.000000Z"
    assert parse_time("7d", NOW) == "2026-11-20T12:00:00.000000Z"
    assert parse_time("2026-11-27T11:30:00+01:00", NOW) == "2026-11-27T10:30:00.000000Z"
    with pytest.raises(ValueError, match="neither RFC 3339"):
        parse_time("yesterday", NOW)


def test_status_values() -> None:
    assert parse_status("4xx") == "4xx" and parse_status("404") == "404"
    with pytest.raises(ValueError, match="not an HTTP status"):
        parse_status("4x")


@pytest.mark.parametrize(
    ("query", "ok"),
    [
        (Query(), True),
        (Query(users=frozenset({"alice"})), True),
        (Query(users=frozenset({"bob"})), False),
        (Query(groups=frozenset({"developer"})), True),
        (Query(verbs=frozenset({"create", "delete"})), True),
        (Query(verbs=frozenset({"get"})), False),
        (Query(resources=frozenset({"ingresses"}), namespaces=frozenset({"test"})), True),
        (Query(names=frozenset({"other"})), False),
        (Query(since="2026-11-27T10:00:00.000000Z"), True),
        (Query(until="2026-11-27T10:00:00.000000Z"), False),
        (Query(statuses=frozenset({"2xx"})), True),
        (Query(statuses=frozenset({"403"})), False),
    ],
)
def test_matches_and_the_byte_prefilter_agree(query: Query, ok: bool) -> None:
    assert matches(EVENT, query) is ok
    if ok:
        assert may_match(orjson.dumps(EVENT), query.needles), "the prefilter never drops a match"


def test_prefilter_drops_lines_without_the_values() -> None:
    q = Query(users=frozenset({"alice"}), verbs=frozenset({"create"}))
    assert not may_match(b'{"verb":"create","user":{"username":"bob"}}', q.needles)


def _line(event: dict[str, object]) -> bytes:
    """As kube-apiserver writes it: Go's encoding/json escapes &, < and >."""
    text = orjson.dumps(event).decode()
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e").encode()


def test_a_user_is_found_when_impersonated_and_shown_as_such() -> None:
    event = {**EVENT, "user": {"username": "kubernetes-admin"},
             "impersonatedUser": {"username": "alice"}}  # fmt: skip
    query = Query(users=frozenset({"alice"}))
    assert may_match(_line(event), query.needles) and matches(event, query)
    assert table_row(event, wide=False)[1] == "kubernetes-admin as alice"
    assert matches(event, Query(users=frozenset({"kubernetes-admin"})))


def test_subresources() -> None:
    log = {**EVENT, "objectRef": {"resource": "pods", "subresource": "log", "name": "p"}}
    assert resource_plural("po/log") == "pods/log"
    for wanted, ok in (("pods/log", True), ("pods", True), ("pods/exec", False)):
        query = Query(resources=frozenset({resource_plural(wanted)}))
        assert may_match(_line(log), query.needles)
        assert matches(log, query) is ok, wanted
    assert not matches(EVENT, Query(resources=frozenset({"ingresses/status"})))


def test_the_prefilter_finds_values_go_escaped() -> None:
    event = {**EVENT, "user": {"username": "R&D-bot", "groups": ["<team>"]}}
    assert b"R\\u0026D-bot" in _line(event)
    query = Query(users=frozenset({"R&D-bot"}), groups=frozenset({"<team>"}))
    assert may_match(_line(event), query.needles) and matches(event, query)


def test_a_cut_user_agent_ends_with_an_ellipsis() -> None:
    agent = "kubectl/v1.34.3 (linux/amd64) kubernetes/abcdef0 with a long tail"
    row = table_row({**EVENT, "userAgent": agent}, wide=False)
    assert row[-1].endswith("…") and len(row[-1]) == 40 and agent.startswith(row[-1][:-1])
    assert table_row({**EVENT, "userAgent": agent}, wide=True)[7] == agent
    assert table_row({**EVENT, "userAgent": "curl/8"}, wide=False)[-1] == "curl/8"


def test_relative_times_combine_units() -> None:
    assert parse_time("1h30m", NOW) == "2026-11-27T10:30:00.000000Z"
    assert parse_time("2d12h", NOW) == "2026-11-25T00:00:00.000000Z"


def test_wide_shows_the_credential_that_made_the_request() -> None:
    """Issue 36 finding 7: the webhook names the token's fingerprint as the credential ID, and
    kube-apiserver writes it into the event: a rotated or leaked token's requests stand apart.
    x509 and ServiceAccount tokens carry their own; an event without one shows -."""
    rotated = {**EVENT, "user": {**EVENT["user"], "extra": {
        CREDENTIAL_ID: ["kube-audit-token=sha256:0123456789ab"]}}}  # fmt: skip
    column = WIDE_HEADER.index("CREDENTIAL")
    assert table_row(rotated, wide=True)[column] == "kube-audit-token=sha256:0123456789ab"
    assert table_row(EVENT, wide=True)[column] == "-"
    assert len(table_row(EVENT, wide=True)) == len(WIDE_HEADER)
