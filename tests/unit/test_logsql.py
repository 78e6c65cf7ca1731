"""``who --store``'s LogsQL and the rows it gets back (core.logsql), without a store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from kube_audit.core.audit_query import Query
from kube_audit.core.logsql import (
    StoreRow,
    next_width,
    order_requests,
    parse_service_url,
    parse_store_row,
    parse_store_time,
    quote,
    rebuild_event,
    render_filters,
    render_window_query,
)

# A row as VictoriaLogs v1.52 printed it for an event with a 404 (shipped with
# _time_field=stageTimestamp, node as a stream field): flat names, arrays as JSON text, numbers
# as strings, empty values gone.
ROW = {
    "_msg": "missing _msg field; see https://docs.victoriametrics.com/victorialogs/keyconcepts/#message-field",
    "_stream": '{node="cp-1"}',
    "_stream_id": "0000000000000000588bde953efb47c08f8de16086ca98e9",
    "_time": "2026-11-01T00:00:00.002001Z",
    "annotations.authorization.k8s.io/decision": "allow",
    "annotations.authorization.k8s.io/reason": "RBAC: allowed by",
    "apiVersion": "audit.k8s.io/v1",
    "auditID": "x1",
    "kind": "Event",
    "level": "Metadata",
    "node": "cp-1",
    "requestReceivedTimestamp": "2026-11-01T00:00:00.000001Z",
    "requestURI": "/api/v1/namespaces/team/pods/x",
    "objectRef.resource": "pods",
    "objectRef.namespace": "team",
    "objectRef.name": "x",
    "objectRef.apiVersion": "v1",
    "responseStatus.code": "404",
    "responseStatus.details.kind": "pods",
    "responseStatus.details.name": "x",
    "responseStatus.message": 'pods "x" not found',
    "responseStatus.reason": "NotFound",
    "responseStatus.status": "Failure",
    "sourceIPs": '["10.0.0.7","10.0.0.8"]',
    "stage": "ResponseComplete",
    "user.extra.authentication.kubernetes.io/credential-id": '["X509SHA256=ab"]',
    "user.groups": '["g,1","system:authenticated"]',
    "user.uid": "1",
    "user.username": "alice",
    "userAgent": "kubectl/v1.34.3",
    "verb": "get",
}


def test_a_row_becomes_the_event_as_kube_apiserver_writes_it() -> None:
    row = parse_store_row(orjson.dumps(ROW))
    assert row.node == "cp-1"
    assert row.logged == datetime(2026, 11, 1, 0, 0, 0, 2001, tzinfo=UTC)
    expected = (
        b'{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"x1",'
        b'"stage":"ResponseComplete","requestURI":"/api/v1/namespaces/team/pods/x","verb":"get",'
        b'"user":{"username":"alice","uid":"1","groups":["g,1","system:authenticated"],'
        b'"extra":{"authentication.kubernetes.io/credential-id":["X509SHA256=ab"]}},'
        b'"sourceIPs":["10.0.0.7","10.0.0.8"],"userAgent":"kubectl/v1.34.3",'
        b'"objectRef":{"resource":"pods","namespace":"team","name":"x","apiVersion":"v1"},'
        b'"responseStatus":{"metadata":{},"status":"Failure","message":"pods \\"x\\" not found",'
        b'"reason":"NotFound","details":{"name":"x","kind":"pods"},"code":404},'
        b'"requestReceivedTimestamp":"2026-11-01T00:00:00.000001Z",'
        b'"stageTimestamp":"2026-11-01T00:00:00.002001Z",'
        b'"annotations":{"authorization.k8s.io/decision":"allow",'
        b'"authorization.k8s.io/reason":"RBAC: allowed by"}}'
    )
    assert orjson.dumps(row.event) == expected


def test_request_bodies_come_back_as_objects_and_arrays() -> None:
    event = rebuild_event(
        {
            "auditID": "a",
            "requestObject.kind": "ConfigMap",
            "requestObject.data.key": "1",
            "requestObject.metadata.finalizers": '["a","b"]',
        }
    )
    assert event["requestObject"] == {
        "kind": "ConfigMap",
        "data": {"key": "1"},
        "metadata": {"finalizers": ["a", "b"]},
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01T00:00:00Z", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T00:00:00.123456789Z", datetime(2026, 11, 1, 0, 0, 0, 123456, tzinfo=UTC)),
        ("2026-11-01T00:00:00.5+00:00", datetime(2026, 11, 1, 0, 0, 0, 500000, tzinfo=UTC)),
        ("2026-11-01T00:00:00.000001Z", datetime(2026, 11, 1, 0, 0, 0, 1, tzinfo=UTC)),
    ],
)
def test_store_times_to_the_microsecond(text: str, expected: datetime) -> None:
    assert parse_store_time(text) == expected


def test_every_filter_narrows_to_what_matches_keeps() -> None:
    q = Query(
        users=frozenset({"alice", 'o"dd'}),
        groups=frozenset({"ops"}),
        verbs=frozenset({"create", "delete"}),
        resources=frozenset({"pods/log"}),
        namespaces=frozenset({"team"}),
        names=frozenset({"x"}),
        statuses=frozenset({"403", "5xx"}),
        since="2026-11-01T00:00:00.000000Z",
    )
    assert render_filters(q) == (
        '("user.username":in("alice", "o\\"dd") OR "impersonatedUser.username":in("alice", '
        '"o\\"dd")) AND "user.groups":json_array_contains_any("ops") AND "verb":in("create", '
        '"delete") AND "objectRef.resource":in("pods") AND "objectRef.namespace":in("team") AND '
        '"objectRef.name":in("x") AND ("responseStatus.code":in("403") OR '
        '"responseStatus.code":range[500, 600)) AND "requestReceivedTimestamp":string_range('
        '"2026-11-01T00:00:00.000000Z", "\U0010ffff")'
    )
    assert render_filters(Query()) == "*"


def test_a_window_is_a_time_range_in_the_query_itself() -> None:
    start = datetime(2026, 11, 1, tzinfo=UTC)
    query = render_window_query(Query(verbs=frozenset({"get"})), start, start + timedelta(hours=1))
    assert query == (
        '_time:[2026-11-01T00:00:00.000000Z, 2026-11-01T01:00:00.000000Z) AND "verb":in("get") '
        "| sort by (_time)"
    )


def test_quote_escapes_as_go_reads_it() -> None:
    assert quote('a"b\\c\n') == '"a\\"b\\\\c\\n"'


def _row(audit_id: str, stage: str, received_s: float, logged_s: float) -> StoreRow:
    base = datetime(2026, 11, 1, tzinfo=UTC)
    received = (base + timedelta(seconds=received_s)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    event = {"auditID": audit_id, "stage": stage, "requestReceivedTimestamp": received}
    return StoreRow(base + timedelta(seconds=logged_s), "n", event)


def test_one_result_per_request_at_its_latest_stage_in_request_order() -> None:
    rows = [
        _row("b", "RequestReceived", 2, 2),
        _row("a", "RequestReceived", 1, 3),  # logged late (omitted stage, slow request)
        _row("b", "ResponseComplete", 2, 4),
        _row("b", "ResponseComplete", 2, 4),  # delivered twice: counted once
        _row("a", "ResponseComplete", 1, 5),
        _row("c", "ResponseComplete", 200, 200),  # the log moved on: a and b leave first
        _row("a", "RequestReceived", 1, 201),  # long gone: ignored
    ]
    out = list(order_requests(rows, Query(), timedelta(seconds=60)))
    assert [(r.event["auditID"], r.event["stage"]) for r in out] == [
        ("a", "ResponseComplete"),
        ("b", "ResponseComplete"),
        ("c", "ResponseComplete"),
    ]


def test_slices_widen_when_sparse_and_narrow_when_dense() -> None:
    ten = timedelta(minutes=10)
    assert next_width(ten, 10) == 2 * ten
    assert next_width(ten, 20_000) == ten
    assert next_width(ten, 80_000) == ten / 2
    assert next_width(timedelta(days=1), 0) == timedelta(days=1)
    assert next_width(timedelta(seconds=1), 10**6) == timedelta(seconds=1)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://victorialogs.logging.svc:9428", ("http", "logging", "victorialogs", "9428")),
        ("https://vlselect.obs.svc.cluster.local", ("https", "obs", "vlselect", "443")),
        ("http://vl.logging.svc.cluster.local.:9471/", ("http", "logging", "vl", "9471")),
        ("http://victorialogs.example.com:9428", None),
        ("http://10.0.0.5:9428", None),
        ("http://vl.logging.svc:9428/select", None),
    ],
)
def test_a_service_address_is_asked_through_the_api_servers_proxy(
    url: str, expected: tuple[str, str, str, str] | None
) -> None:
    found = parse_service_url(url)
    if expected is None:
        assert found is None
        return
    assert found is not None
    assert (found.scheme, found.namespace, found.name, found.port) == expected
    assert found.proxy_path("/select/logsql/query") == (
        f"/api/v1/namespaces/{expected[1]}/services/{expected[0]}:{expected[2]}:{expected[3]}"
        "/proxy/select/logsql/query"
    )
