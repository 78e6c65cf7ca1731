"""``who``'s question for VictoriaLogs as LogsQL, and the store's rows back as audit events.

The LogsQL only narrows: every row it returns is rebuilt into an event and tested again with
``matches``, as a line of a file is, so the store can never answer more than the files would.
Nothing here may make it answer less: each filter keeps every event ``matches`` would keep.

VictoriaLogs stores a JSON line as flat fields (``user.username``), arrays as JSON text, numbers
as strings, and drops empty values; ``rebuild_event`` puts the audit event back together in the
order kube-apiserver writes its fields, with the types the audit.k8s.io/v1 schema gives them.
"""

from __future__ import annotations

import heapq
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from kube_audit.constants import STORE_NODE_FIELD, WHO_WINDOW
from kube_audit.core.audit_query import STAGE_RANK, Query, matches

# kube-apiserver's field order (audit.k8s.io/v1 Event), and the parts of each object.
_EVENT_FIELDS = (
    "kind", "apiVersion", "level", "auditID", "stage", "requestURI", "verb", "user",
    "impersonatedUser", "sourceIPs", "userAgent", "objectRef", "responseStatus", "requestObject",
    "responseObject", "requestReceivedTimestamp", "stageTimestamp", "annotations",
)  # fmt: skip
_USER_FIELDS = ("username", "uid", "groups", "extra")
_OBJECT_REF_FIELDS = (
    "resource", "namespace", "name", "uid", "apiGroup", "apiVersion", "resourceVersion",
    "subresource",
)  # fmt: skip
_STATUS_FIELDS = ("metadata", "status", "message", "reason", "details", "code")
_DETAILS_FIELDS = ("name", "group", "kind", "uid", "causes", "retryAfterSeconds")
_ARRAYS = frozenset({"sourceIPs", "user.groups", "impersonatedUser.groups"})
_INTEGERS = frozenset({"responseStatus.code", "responseStatus.details.retryAfterSeconds"})
# Maps whose keys hold dots themselves (authorization.k8s.io/decision): one level, not a path.
_FLAT_MAPS = ("annotations.", "user.extra.", "impersonatedUser.extra.")
_BODIES = ("requestObject.", "responseObject.")
# How many rows a slice of the answer should hold: enough for few queries, few for memory.
SLICE_ROWS_LOW = 5_000
SLICE_ROWS_HIGH = 50_000


def quote(value: str) -> str:
    """A LogsQL quoted string: Go's escapes, which JSON's are a subset of."""
    return orjson.dumps(value).decode()


def _in(field: str, values: frozenset[str]) -> str:
    return f"{quote(field)}:in({', '.join(quote(v) for v in sorted(values))})"


def _status_filter(statuses: frozenset[str]) -> str:
    parts = []
    codes = sorted(s for s in statuses if not s.endswith("xx"))
    if codes:
        parts.append(_in("responseStatus.code", frozenset(codes)))
    for cls in sorted(s for s in statuses if s.endswith("xx")):
        low = int(cls[0]) * 100
        parts.append(f'"responseStatus.code":range[{low}, {low + 100})')
    return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"


def render_filters(q: Query) -> str:
    """The query's filters, ANDed; ``*`` when there are none."""
    parts = []
    if q.users:
        parts.append(
            f"({_in('user.username', q.users)} OR {_in('impersonatedUser.username', q.users)})"
        )
    if q.groups:
        groups = ", ".join(quote(g) for g in sorted(q.groups))
        parts.append(f'"user.groups":json_array_contains_any({groups})')
    if q.verbs:
        parts.append(_in("verb", q.verbs))
    if q.resources:
        parts.append(_in("objectRef.resource", frozenset(r.partition("/")[0] for r in q.resources)))
    if q.namespaces:
        parts.append(_in("objectRef.namespace", q.namespaces))
    if q.names:
        parts.append(_in("objectRef.name", q.names))
    if q.statuses:
        parts.append(_status_filter(q.statuses))
    if q.since is not None or q.until is not None:
        low = quote(q.since or "")
        high = quote(q.until or "\U0010ffff")
        parts.append(f'"requestReceivedTimestamp":string_range({low}, {high})')
    return " AND ".join(parts) or "*"


def render_time(moment: datetime) -> str:
    """An RFC 3339 time in UTC to the microsecond, as LogsQL's ``_time`` filter takes it."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def render_window_query(q: Query, start: datetime, end: datetime) -> str:
    """One slice of the answer: rows logged in ``[start, end)``, oldest first."""
    window = f"_time:[{render_time(start)}, {render_time(end)})"
    return f"{window} AND {render_filters(q)} | sort by (_time)"


def render_first_query(q: Query, end: datetime) -> str:
    """When the oldest row that may match was logged (the answer's first slice starts there)."""
    return f"_time:<{render_time(end)} AND {render_filters(q)} | stats min(_time) as first"


def parse_store_time(value: str) -> datetime:
    """A ``_time`` as VictoriaLogs prints it (RFC 3339, up to nanoseconds, ``Z``)."""
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    whole, dot, rest = text.partition(".")
    if dot:
        zone = rest.lstrip("0123456789")
        digits = rest[: len(rest) - len(zone)]
        text = f"{whole}.{digits[:6].ljust(6, '0')}{zone}"
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class StoreRow:
    """One stored event: when it was logged (``_time``), the node that logged it, the event."""

    logged: datetime
    node: str
    event: dict[str, Any]


def _value(path: str, text: str) -> Any:
    if path in _INTEGERS:
        try:
            return int(text)
        except ValueError:
            return text
    if path in _ARRAYS or path.startswith(("user.extra.", "impersonatedUser.extra.")):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            return [text]
    if path.startswith(_BODIES) and text[:1] in ("[", "{"):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            return text
    return text


def _ordered(values: Mapping[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    known = {k: values[k] for k in order if k in values}
    return {**known, **{k: v for k, v in sorted(values.items()) if k not in known}}


def rebuild_event(fields: Mapping[str, str]) -> dict[str, Any]:
    """The audit event a stored row was made from (without the store's own ``_`` fields and
    the node). Empty strings and objects were not stored, except ``responseStatus.metadata``,
    which kube-apiserver always writes."""
    event: dict[str, Any] = {}
    for name, text in fields.items():
        if name.startswith("_") or name == STORE_NODE_FIELD:
            continue
        flat = next((p for p in _FLAT_MAPS if name.startswith(p)), None)
        if flat is not None:
            *parents, _ = flat.split(".")
            keys = [*parents, name[len(flat) :]]
        else:
            keys = name.split(".")
        node = event
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):  # a value and a path through it: keep the value
                break
            node = child
        else:
            node[keys[-1]] = _value(name, text)
    if isinstance(event.get("responseStatus"), dict):
        event["responseStatus"].setdefault("metadata", {})
    for key, order in (("user", _USER_FIELDS), ("impersonatedUser", _USER_FIELDS)):
        if isinstance(event.get(key), dict):
            event[key] = _ordered(event[key], order)
    if isinstance(event.get("objectRef"), dict):
        event["objectRef"] = _ordered(event["objectRef"], _OBJECT_REF_FIELDS)
    status = event.get("responseStatus")
    if isinstance(status, dict):
        if isinstance(status.get("details"), dict):
            status["details"] = _ordered(status["details"], _DETAILS_FIELDS)
        event["responseStatus"] = _ordered(status, _STATUS_FIELDS)
    return _ordered(event, _EVENT_FIELDS)


def parse_store_row(line: bytes) -> StoreRow:
    """A line of ``/select/logsql/query``'s answer. Raises ValueError when it is not a row."""
    try:
        fields = orjson.loads(line)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"not a JSON row: {error}") from None
    if not isinstance(fields, dict) or "_time" not in fields:
        raise ValueError("a row without _time")
    logged = parse_store_time(str(fields["_time"]))
    texts = {str(k): str(v) for k, v in fields.items()}
    texts.setdefault("stageTimestamp", render_time(logged))  # vlagent made it the row's _time
    return StoreRow(logged, str(fields.get(STORE_NODE_FIELD) or ""), rebuild_event(texts))


def next_width(width: timedelta, rows: int) -> timedelta:
    """The next slice's width: doubled while slices come back small, halved when large, so a
    sparse question takes few queries and a dense one never holds a huge slice in memory."""
    if rows < SLICE_ROWS_LOW:
        return min(width * 2, timedelta(days=1))
    if rows > SLICE_ROWS_HIGH:
        return max(width / 2, timedelta(seconds=1))
    return width


def order_requests(rows: Iterable[StoreRow], q: Query, lag: timedelta) -> Iterator[StoreRow]:
    """The matching requests, one per auditID at its latest stage (a row delivered twice counts
    once), in request-time order: rows come in log-time order, and a request leaves once the log
    has moved ``lag`` past it, as ``who`` over files does, so both give the same answer."""
    pending: dict[str, tuple[str, int, StoreRow]] = {}
    heap: list[tuple[str, str]] = []
    done: OrderedDict[str, None] = OrderedDict()

    def pop() -> StoreRow:
        _, audit_id = heapq.heappop(heap)
        done[audit_id] = None
        if len(done) > WHO_WINDOW:
            done.popitem(last=False)
        return pending.pop(audit_id)[2]

    for row in rows:
        cutoff = render_time(row.logged - lag)
        while heap and heap[0][0] < cutoff:
            yield pop()
        event = row.event
        if not matches(event, q):
            continue
        audit_id = str(event.get("auditID") or "")
        rank = STAGE_RANK.get(str(event.get("stage") or ""), -1)
        seen = pending.get(audit_id)
        if seen is not None:
            if rank >= seen[1]:
                pending[audit_id] = (seen[0], rank, row)
            continue
        if audit_id in done:
            continue
        received = str(event.get("requestReceivedTimestamp") or "")
        pending[audit_id] = (received, rank, row)
        heapq.heappush(heap, (received, audit_id))
        if len(pending) > WHO_WINDOW:
            yield pop()
    while heap:
        yield pop()


@dataclass(frozen=True)
class ServiceAddress:
    """A store reached through the API server's service proxy: the caller's own credentials
    and RBAC (``get`` on ``services/proxy``), no route into the cluster needed."""

    scheme: str
    namespace: str
    name: str
    port: str

    def proxy_path(self, path: str) -> str:
        return (
            f"/api/v1/namespaces/{self.namespace}/services/"
            f"{self.scheme}:{self.name}:{self.port}/proxy{path}"
        )


_SERVICE_URL = re.compile(
    r"(?P<scheme>https?)://(?P<name>[a-z0-9]([-a-z0-9]*[a-z0-9])?)\."
    r"(?P<namespace>[a-z0-9]([-a-z0-9]*[a-z0-9])?)\.svc(\.cluster\.local)?\.?"
    r"(:(?P<port>[0-9]{1,5}))?/?"
)


def parse_service_url(url: str) -> ServiceAddress | None:
    """``http(s)://NAME.NAMESPACE.svc[.cluster.local][:PORT]`` as a Service, else None (an
    address reached directly)."""
    found = _SERVICE_URL.fullmatch(url.strip())
    if found is None:
        return None
    scheme = found["scheme"]
    port = found["port"] or ("443" if scheme == "https" else "80")
    return ServiceAddress(scheme, found["namespace"], found["name"], port)
