"""``kube-audit who --store``: the question asked of the audit store (VictoriaLogs).

The answer is read in slices of log time, oldest first, each sorted by the store, so the first
rows print at once and memory stays bounded however broad the question; rows delivered twice
(the shipper sends at least once) count once. The time range is always in the query itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol, TextIO

import orjson

from kube_audit.constants import WHO_LAG_SECONDS
from kube_audit.core.audit_query import (
    NODE_HEADER,
    NODE_WIDE_HEADER,
    GrowingTable,
    Query,
    render_node_event,
    table_row,
)
from kube_audit.core.logsql import (
    ServiceAddress,
    StoreRow,
    next_width,
    order_requests,
    parse_store_row,
    parse_store_time,
    render_first_query,
    render_window_query,
)
from kube_audit.errors import ClusterError, StoreError
from kube_audit.logstore import QUERY_PATH

FIRST_WIDTH = timedelta(minutes=10)


class Store(Protocol):
    """What a question needs of the store: a name for messages and a LogsQL query."""

    @property
    def url(self) -> str: ...

    def query(self, logsql: str) -> Iterator[bytes]: ...


class ServiceGet(Protocol):
    def get_through_service(
        self, proxy_path: str, params: dict[str, str], what: str, timeout: float
    ) -> bytes: ...


@dataclass
class ProxiedStore:
    """The store as a Service, asked through the API server (``who --cluster`` when the
    install names one): the caller's kubeconfig and RBAC, no route into the cluster."""

    api: ServiceGet
    address: ServiceAddress
    timeout: float

    @property
    def url(self) -> str:
        a = self.address
        return f"service {a.namespace}/{a.name}:{a.port} (through the API server)"

    def refusal(self) -> str | None:
        """Why the caller may not ask the store through the proxy (RBAC: ``get`` on
        ``services/proxy``), from one ask of its /health; None when it may, or when the store
        fails otherwise (the query then says how). A caller who may read the ConfigMap, as
        ``view`` allows, need not be allowed this."""
        try:
            self.api.get_through_service(
                self.address.proxy_path("/health"), {}, f"the store at {self.url}", self.timeout
            )
        except ClusterError as error:
            return str(error) if error.status == 403 else None
        return None

    def query(self, logsql: str) -> Iterator[bytes]:
        params = {"query": logsql, "allow_partial_response": "0"}
        path = self.address.proxy_path(QUERY_PATH)
        try:
            data = self.api.get_through_service(
                path, params, f"the store at {self.url}", self.timeout
            )
        except ClusterError as error:
            raise StoreError(str(error)) from None
        yield from data.splitlines()


def _rows(store: Store, query: Query, start: datetime, end: datetime) -> Iterator[StoreRow]:
    width = FIRST_WIDTH
    while start < end:
        stop = min(start + width, end)
        count = 0
        for line in store.query(render_window_query(query, start, stop)):
            if not line.strip():
                continue
            try:
                yield parse_store_row(line)
            except ValueError as error:
                raise StoreError(
                    f"the store at {store.url} answered a row that is not an event ({error}): "
                    f"{line[:200].decode('utf-8', 'replace')}"
                ) from None
            count += 1
        start = stop
        width = next_width(width, count)


def _first_logged(store: Store, query: Query, end: datetime) -> datetime | None:
    for line in store.query(render_first_query(query, end)):
        if line.strip():
            first = str(orjson.loads(line).get("first") or "")
            return parse_store_time(first) if first else None
    return None


def run_who_store(
    store: Store, query: Query, *, output: str, out: TextIO, err: TextIO, now: datetime
) -> int:
    """Rows print as they are found, with the node that logged each; exit 7 (``StoreError``)
    when the store does not answer in full, after the rows it did give."""
    lag = timedelta(seconds=WHO_LAG_SECONDS)
    end = (parse_store_time(query.until) if query.until else now) + lag
    start = parse_store_time(query.since) if query.since else _first_logged(store, query, end)
    results = 0
    if start is not None:
        wide = output == "wide"
        table = GrowingTable(NODE_WIDE_HEADER if wide else NODE_HEADER)
        for row in order_requests(_rows(store, query, start, end), query, lag):
            if output == "json":
                out.write(render_node_event(row.node, row.event).decode())
            else:
                if not results:
                    out.write(table.line(table.header))
                out.write(table.line([row.node, *table_row(row.event, wide)]))
            results += 1
            if results == 1 or results % 256 == 0:
                out.flush()
    out.flush()
    if not results and output != "json":
        err.write(f"no matching requests in the store at {store.url}\n")
    return 0
