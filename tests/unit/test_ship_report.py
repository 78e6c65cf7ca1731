"""The ship report and what the status owner makes of the nodes' reports (issue 35 item 2)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from kube_audit.constants import NODE_SHIPPING_ANNOTATION
from kube_audit.core.ship_report import (
    ShipReport,
    judge_shipping,
    parse_ship_report,
    render_ship_report,
)

NOW = datetime(2026, 12, 7, 18, 5, tzinfo=UTC).timestamp()
NODES = ["cp-1", "cp-2", "cp-3"]


def _records(**reports: ShipReport | str) -> dict[str, dict[str, str]]:
    return {
        node: {
            NODE_SHIPPING_ANNOTATION: r if isinstance(r, str) else render_ship_report(r).decode()
        }
        for node, r in reports.items()
    }


def _fresh(**kw: object) -> ShipReport:
    return ShipReport(reported_at=NOW - 3, logged_until="2026-12-07T18:00:00.5Z", **kw)  # type: ignore[arg-type]


def test_a_report_reads_back_as_written_and_a_bad_one_is_named() -> None:
    report = ShipReport(NOW, "2026-12-07T18:00:00.123456Z", 4096, "HTTP 503", NOW - 60)
    data = render_ship_report(report)
    assert parse_ship_report(data) == report
    assert render_ship_report(parse_ship_report(data)) == data, "byte-identical"
    for bad, why in ((b"{", "not JSON"), (b'{"version": 9}', "version 1"),
                     (b'{"version": 1}', "bad field")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            parse_ship_report(bad)


def test_no_store_no_judgement() -> None:
    assert judge_shipping({"cp-1": {}}, NODES, NOW, 45) is None


def test_every_node_shipping() -> None:
    behind = ShipReport(NOW - 1, "2026-12-07T18:00:00Z", 100)
    judged = judge_shipping(_records(**{"cp-1": _fresh(), "cp-2": _fresh(), "cp-3": behind}),
                            NODES, NOW, 45)  # fmt: skip
    assert judged is not None
    assert judged.condition["status"] == "True" and judged.condition["reason"] == "Shipped"
    assert [e["state"] for e in judged.entries] == ["Shipping"] * 3
    lag = judged.entries[2]["lagSeconds"]
    assert lag > 0 and f"cp-3, {lag} s" in judged.condition["message"]
    assert judged.entries[0]["lagSeconds"] == 0, "nothing pending: not behind"


def test_a_node_whose_report_aged_is_stalled_and_named() -> None:
    old = ShipReport(NOW - 50, "2026-12-07T18:00:00Z")
    judged = judge_shipping(_records(**{"cp-1": _fresh(), "cp-2": old, "cp-3": _fresh()}),
                            NODES, NOW, 45)  # fmt: skip
    assert judged is not None and judged.condition["status"] == "False"
    assert judged.condition["reason"] == "ShippingStalled"
    assert judged.condition["message"].startswith("cp-2: its shipper last reported 50 s ago")
    assert [e["state"] for e in judged.entries] == ["Shipping", "Stalled", "Shipping"]


def test_a_store_that_takes_nothing_is_failing_after_the_bound() -> None:
    early = _fresh(last_error="HTTP 503", failing_since=NOW - 10, pending_bytes=10)
    judged = judge_shipping(_records(**{n: early for n in NODES}), NODES, NOW, 45)
    assert judged is not None and judged.condition["status"] == "True", "a blip is not shown"
    late = _fresh(last_error="HTTP 503", failing_since=NOW - 100, pending_bytes=10)
    judged = judge_shipping(_records(**{n: late for n in NODES}), NODES, NOW, 45)
    assert judged is not None and judged.condition["reason"] == "ShippingFailing"
    assert (
        "HTTP 503" in judged.condition["message"] and "10 bytes wait" in judged.condition["message"]
    )


def test_a_node_without_a_report_once_others_ship() -> None:
    records = _records(**{"cp-1": _fresh(), "cp-2": "{not json"})
    judged = judge_shipping(records, NODES, NOW, 45)
    assert judged is not None and judged.condition["reason"] == "ShippingStalled"
    message = judged.condition["message"]
    assert (
        "cp-2: its record's report does not read" in message and "cp-3: no ship report" in message
    )
    early = judge_shipping(records, NODES, NOW, 45, missing_stalled=False)
    assert early is not None and "cp-3" not in early.condition["message"]
    assert early.entries[2] == {"node": "cp-3", "state": "Unknown"}
