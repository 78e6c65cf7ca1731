"""How far each node's audit log has reached the store, as the cluster sees it.

The ship container writes a report beside its positions; the node's operator copies it into
the node's record (its Lease) and the status owner judges every record: a ``Shipping``
condition and a ``status.shipping`` entry per node on each AuditPolicy. Judged from the
records, not by each node, so a node whose ship container or whole pod stopped is seen by the
others: its report simply stops getting younger."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from kube_audit.constants import NODE_SHIPPING_ANNOTATION
from kube_audit.core.shipping import parse_versioned
from kube_audit.core.status import conditions_differ, with_transition_times

REPORT_VERSION = 1
SHIPPING = "Shipping"
SHIPPED = "Shipped"
STALLED = "ShippingStalled"
FAILING = "ShippingFailing"


@dataclass(frozen=True)
class ShipReport:
    """One node's shipper, as of ``reported_at`` (wall seconds). ``logged_until``: the
    stageTimestamp of the last event the store acknowledged ("" before any);
    ``pending_bytes``: what the store does not have yet; ``last_error``: why the last batch
    failed ("" when the last one was taken), since ``failing_since``."""

    reported_at: float
    logged_until: str = ""
    pending_bytes: int = 0
    last_error: str = ""
    failing_since: float | None = None


def render_ship_report(report: ShipReport) -> bytes:
    """The report file, and the node record's annotation: one line of JSON."""
    body: dict[str, Any] = {
        "version": REPORT_VERSION,
        "reportedAt": _time(report.reported_at),
        "loggedUntil": report.logged_until,
        "pendingBytes": report.pending_bytes,
    }
    if report.last_error:
        body["lastError"] = report.last_error[:300]
        body["failingSince"] = _time(report.failing_since or report.reported_at)
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def parse_ship_report(data: bytes | str) -> ShipReport:
    """A report back; ValueError when it is not one (the caller says where)."""
    raw = parse_versioned(data, REPORT_VERSION, "ship report")
    try:
        failing = raw.get("failingSince")
        return ShipReport(
            reported_at=_seconds(str(raw["reportedAt"])),
            logged_until=str(raw.get("loggedUntil") or ""),
            pending_bytes=int(raw.get("pendingBytes") or 0),
            last_error=str(raw.get("lastError") or ""),
            failing_since=_seconds(str(failing)) if failing else None,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"a bad field ({error})") from None


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seconds(text: str) -> float:
    """An RFC 3339 time (a stageTimestamp's microseconds too) as Unix seconds."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no zone")
    return moment.timestamp()


@dataclass(frozen=True)
class ShippingJudgement:
    """What the status owner writes on every AuditPolicy (None: no node ships: no store)."""

    condition: dict[str, str]
    entries: list[dict[str, Any]]


def judge_shipping(
    records: Mapping[str, Mapping[str, str]],
    control_plane: Sequence[str],
    now: float,
    stall_after: float,
    *,
    missing_stalled: bool = True,
) -> ShippingJudgement | None:
    """Each control-plane node's shipping from its record: stalled when its last report is
    older than ``stall_after`` (its ship container or pod stopped, or its operator cannot
    write the record), failing when the store has taken nothing for that long. A node with no
    report at all is stalled too once any node ships (the store is installed for all), unless
    ``missing_stalled`` is False (the judge has not seen shipping for ``stall_after`` yet: a
    new install, whose nodes copy their first reports one by one)."""
    reports: dict[str, ShipReport | str] = {}
    for node in control_plane:
        note = (records.get(node) or {}).get(NODE_SHIPPING_ANNOTATION)
        if note is None:
            continue
        try:
            reports[node] = parse_ship_report(note)
        except ValueError as error:
            reports[node] = f"its record's report does not read ({error})"
    if not reports:
        return None
    entries: list[dict[str, Any]] = []
    problems: list[tuple[str, str]] = []
    for node in sorted(control_plane):
        report = reports.get(node)
        if report is None:
            if missing_stalled:
                why = f"{node}: no ship report (is its ship container running?)"
                problems.append((STALLED, why))
            entries.append({"node": node, "state": "Stalled" if missing_stalled else "Unknown"})
            continue
        if isinstance(report, str):
            problems.append((STALLED, f"{node}: {report}"))
            entries.append({"node": node, "state": "Stalled"})
            continue
        entry, problem = _judge_node(node, report, now, stall_after)
        entries.append(entry)
        if problem is not None:
            problems.append(problem)
    if problems:
        reason = STALLED if any(r == STALLED for r, _ in problems) else FAILING
        message = "; ".join(m for _, m in problems)
        condition = {"type": SHIPPING, "status": "False", "reason": reason, "message": message}
    else:
        lags = [(e.get("lagSeconds", 0), e["node"]) for e in entries]
        lag, node = max(lags)
        message = (
            f"{len(entries)} node(s) ship their audit log; the furthest behind: {node}, {lag} s"
        )
        condition = {"type": SHIPPING, "status": "True", "reason": SHIPPED, "message": message}
    return ShippingJudgement(condition, entries)


def _judge_node(
    node: str, report: ShipReport, now: float, stall_after: float
) -> tuple[dict[str, Any], tuple[str, str] | None]:
    age = now - report.reported_at
    lag = 0
    if report.pending_bytes and report.logged_until:
        try:
            lag = max(0, round(now - _seconds(report.logged_until)))
        except ValueError:
            lag = 0
    entry: dict[str, Any] = {
        "node": node,
        "state": "Shipping",
        "shippedUntil": report.logged_until,
        "lagSeconds": lag,
        "pendingBytes": report.pending_bytes,
        "reportedAt": _time(report.reported_at),
    }
    if report.last_error:
        entry["lastError"] = report.last_error
    if age > stall_after:
        entry["state"] = "Stalled"
        why = (
            f"{node}: its shipper last reported {age:.0f} s ago (are its ship and operator "
            "containers running?)"
        )
        return entry, (STALLED, why)
    failing_for = now - report.failing_since if report.failing_since is not None else 0.0
    if report.last_error and failing_for > stall_after:
        entry["state"] = "Failing"
        why = (
            f"{node}: the store has taken nothing for {failing_for:.0f} s "
            f"({report.pending_bytes} bytes wait on the node): {report.last_error}"
        )
        return entry, (FAILING, why)
    return entry, None


def shipping_patch(
    status: Mapping[str, Any], judged: ShippingJudgement | None, now: str
) -> dict[str, Any] | None:
    """The status patch that brings one AuditPolicy to ``judged`` (None: nothing to write).
    Its other conditions are kept as they are (a merge patch replaces the list whole)."""
    conditions = list(status.get("conditions") or [])
    others = [c for c in conditions if c.get("type") != SHIPPING]
    if judged is None:
        if "shipping" not in status and len(others) == len(conditions):
            return None
        return {"conditions": others, "shipping": None}
    shipping = with_transition_times([dict(judged.condition)], status, now)
    patch: dict[str, Any] = {"conditions": [*others, *shipping], "shipping": judged.entries}
    return patch if conditions_differ(status, patch) else None
