from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from kube_audit.core.audit_query import (
    Query,
    matches,
    may_match,
    parse_status,
    parse_time,
    resource_plural,
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
