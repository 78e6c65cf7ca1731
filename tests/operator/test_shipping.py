"""Issue 35 item 2: shipping to the audit store reported per node, against the emulated API.
Each node's ship container writes its report (here a thread writes it as ``kube-audit ship``
does); the operators copy it into their node records and the status owner shows it on every
AuditPolicy: a Shipping condition, an entry per node, an Event on a Node that stops. Ready is
not touched: Flux and Argo CD do not read a stalled shipper as a failed policy."""

from __future__ import annotations

import threading
import time
from typing import Any

from kube_audit.agent.layout import STATE_DIR, under
from kube_audit.constants import SHIP_REPORT_FILE
from kube_audit.core.ship_report import ShipReport, render_ship_report
from tests.operator.conftest import Harness, SimNode, eventually
from tests.operator.test_operator import DEV_RULES, _ready

FAST: dict[str, Any] = {"ship_report_every": 0.2, "ship_stalled_after": 2.0}


class FakeShipper(threading.Thread):
    """A node's ship container, as far as its report goes: rewritten every 0.2 s."""

    def __init__(self, node: SimNode) -> None:
        super().__init__(daemon=True)
        self.folder = under(node.root, STATE_DIR) / "ship"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stop = threading.Event()
        self.error = ""

    def run(self) -> None:
        while not self.stop.wait(0.2):
            now = time.time()
            report = ShipReport(
                reported_at=now,
                logged_until="2026-12-07T18:00:00.123456Z",
                pending_bytes=0,
                last_error=self.error,
                failing_since=now - 10 if self.error else None,
            )
            temporary = self.folder / f".{SHIP_REPORT_FILE}.new"
            temporary.write_bytes(render_ship_report(report))
            temporary.replace(self.folder / SHIP_REPORT_FILE)


def _node_events(harness: Harness, node: str, reason: str) -> list[Any]:
    events = harness.core.list_namespaced_event("default").items
    return [
        e
        for e in events
        if e.involved_object.kind == "Node"
        and e.involved_object.name == node
        and e.reason == reason
    ]


def test_a_node_that_stops_shipping_is_shown_on_every_policy_within_seconds(
    harness: Harness,
) -> None:
    harness.add_control_plane("cp-1")
    harness.add_control_plane("cp-2")
    nodes = [harness.start(name, **FAST) for name in ("cp-1", "cp-2")]
    shippers = [FakeShipper(node) for node in nodes]
    for shipper in shippers:
        shipper.start()
    harness.apply_policy("dev", rules=DEV_RULES)
    eventually(lambda: _ready(harness, "auditpolicies", "dev"), timeout=30, what="dev Ready")

    def shipping() -> dict[str, Any]:
        return harness.condition("auditpolicies", "dev", "Shipping") or {}

    eventually(lambda: shipping().get("status") == "True", timeout=30, what="Shipping True")
    entries = harness.cluster.objects("auditpolicies")["dev"]["status"]["shipping"]
    assert [e["node"] for e in entries] == ["cp-1", "cp-2"]
    assert all(e["state"] == "Shipping" and e["shippedUntil"] for e in entries), entries

    shippers[1].stop.set()  # cp-2's ship container stops: its report gets no younger
    stopped = time.monotonic()
    eventually(lambda: shipping().get("status") == "False", timeout=30, what="Shipping False")
    seen_in = time.monotonic() - stopped
    condition = shipping()
    assert condition["reason"] == "ShippingStalled" and condition["message"].startswith("cp-2: ")
    assert _ready(harness, "auditpolicies", "dev"), "not a failure: Ready stays True"
    eventually(lambda: _node_events(harness, "cp-2", "ShippingStalled"), what="a Warning Event")
    (warning,) = _node_events(harness, "cp-2", "ShippingStalled")
    assert warning.type == "Warning" and "last reported" in warning.message
    # The bound (2 s here) plus one copy and one judgement: within a minute with the defaults.
    assert seen_in < 2.0 + 3 * 0.2 + 3.0, seen_in

    shippers[1] = FakeShipper(nodes[1])
    shippers[1].error = "the store answered HTTP 503"
    shippers[1].start()
    eventually(lambda: shipping().get("reason") == "ShippingFailing", timeout=30, what="failing")
    assert "HTTP 503" in shipping()["message"]
    shippers[1].error = ""
    eventually(lambda: shipping().get("status") == "True", timeout=30, what="shipping again")
    eventually(lambda: _node_events(harness, "cp-2", "ShippingResumed"), what="said once")
    for shipper in shippers:
        shipper.stop.set()
