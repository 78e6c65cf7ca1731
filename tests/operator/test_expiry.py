"""spec.expiresAt in the operator (issue 21): nothing else changes, yet at that time the line
leaves the token file (token-file mode: one restart), the status says Expired and an Event
tells why; a metric counts the seconds left."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kube_audit.core.status import EXPIRED
from tests.operator.conftest import Harness, eventually
from tests.operator.test_operator import _ready, _records


def test_a_person_expires_at_that_time(harness: Harness) -> None:
    harness.add_control_plane("cp-1")
    node = harness.start("cp-1")
    expires = (datetime.now(UTC) + timedelta(seconds=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
    harness.apply_user("alice", groups=["developer"], expiresAt=expires)
    harness.apply_user("bob", groups=["developer"])
    eventually(lambda: set(_records(node)) == {"alice", "bob"}, what="both served")
    eventually(lambda: _ready(harness, "auditusers", "alice"), what="alice Ready")
    left = node.runtime.metrics.expiry.labels("alice")._value.get()
    assert 0 < left <= 6, left
    eventually(lambda: set(_records(node)) == {"bob"}, timeout=30, what="alice's line gone")
    ready = eventually(lambda: (c := harness.condition("auditusers", "alice")) and
                       c["reason"] == EXPIRED and c, timeout=10, what="alice Expired")  # fmt: skip
    assert ready["status"] == "False"
    assert ready["message"] == (
        f"expired at {expires}: its token is refused; gone from 1 of 1 control-plane node(s)"
    )
    assert _ready(harness, "auditusers", "bob")

    def expired_event() -> bool:
        events = harness.core.list_namespaced_event("default").items
        return any(e.involved_object.name == "alice" and e.reason == "Expired" for e in events)

    eventually(expired_event, what="an Expired Event on alice")
    assert node.runtime.metrics.expiry.labels("alice")._value.get() == 0
