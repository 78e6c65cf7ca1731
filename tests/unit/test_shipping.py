"""What ``kube-audit ship`` sends next (core.shipping), without files or a store."""

from __future__ import annotations

import pytest

from kube_audit.core.shipping import (
    LogFile,
    ShipState,
    last_logged,
    parse_state,
    parse_store_vitals,
    pending_bytes,
    plan_reads,
    plan_store_failure,
    record_ack,
    record_end,
    render_insert_params,
    render_state,
    settle,
    whole_lines,
)


def _file(fp: str, name: str, size: int, order: int, compressed: bool = False) -> LogFile:
    return LogFile(name, fp, -1 if compressed else size, order, compressed)


def _shipped(state: ShipState, fp: str, offset: int, at: float = 0.0) -> ShipState:
    return record_ack(state, fp, offset, at, "")


def test_a_new_file_is_sent_from_its_start_oldest_first() -> None:
    plan = plan_reads([_file("B", "audit.log", 50, 1), _file("A", "audit-1.log", 100, 0)],
                      ShipState(), resume_from_kept=False)  # fmt: skip
    assert [(r.file.name, r.start) for r in plan.reads] == [("audit-1.log", 0), ("audit.log", 0)]
    assert plan.lost == ()


def test_a_rotated_file_is_followed_by_its_first_line_not_its_name() -> None:
    state = plan_reads([_file("A", "audit.log", 100, 0)], ShipState(), resume_from_kept=False).state
    state = _shipped(state, "A", 60)
    # Two rotations while the shipper was stopped: A renamed, then B renamed, C is live.
    files = [_file("A", "audit-1.log", 100, 0), _file("B", "audit-2.log", 80, 1),
             _file("C", "audit.log", 10, 2)]  # fmt: skip
    plan = plan_reads(files, state, resume_from_kept=False)
    assert [(r.file.name, r.start) for r in plan.reads] == [
        ("audit-1.log", 60), ("audit-2.log", 0), ("audit.log", 0),
    ]  # fmt: skip
    assert plan.state.positions["A"].name == "audit-1.log"


def test_a_gzipped_backup_goes_on_where_its_original_stopped() -> None:
    state = plan_reads(
        [_file("A", "audit-1.log", 100, 0)], ShipState(), resume_from_kept=False
    ).state
    state = _shipped(state, "A", 70)
    both = [_file("A", "audit-1.log.gz", -1, 0, compressed=True), _file("A", "audit-1.log", 100, 1)]
    plan = plan_reads(both, state, resume_from_kept=False)
    assert [(r.file.name, r.start) for r in plan.reads] == [("audit-1.log", 70)]  # the original
    only_gz = plan_reads([_file("A", "audit-1.log.gz", -1, 0, compressed=True)], plan.state,
                         resume_from_kept=False)  # fmt: skip
    assert [(r.file.name, r.start) for r in only_gz.reads] == [("audit-1.log.gz", 70)]
    done = record_end(_shipped(only_gz.state, "A", 100), "A", 100)
    again = plan_reads([_file("A", "audit-1.log.gz", -1, 0, compressed=True)], done,
                       resume_from_kept=False)  # fmt: skip
    assert again.reads == ()


def test_a_file_removed_before_it_was_shipped_is_named_with_what_was_lost() -> None:
    state = plan_reads([_file("A", "audit-1.log", 100, 0), _file("B", "audit.log", 40, 1)],
                       ShipState(), resume_from_kept=False).state  # fmt: skip
    state = _shipped(_shipped(state, "A", 100), "B", 25)
    plan = plan_reads([_file("C", "audit.log", 5, 0)], state, resume_from_kept=False)
    assert plan.lost == (("audit.log", 15),)
    assert set(plan.state.positions) == {"C"}


def test_after_a_failure_acknowledged_lines_not_yet_kept_are_sent_again() -> None:
    state = plan_reads([_file("A", "audit.log", 300, 0)], ShipState(), resume_from_kept=False).state
    state = _shipped(state, "A", 100, at=0.0)
    state = _shipped(state, "A", 200, at=8.0)
    state = settle(state, now=12.0, keep_after=10.0)
    assert (state.positions["A"].kept, state.positions["A"].acked) == (100, 200)
    plan = plan_reads([_file("A", "audit.log", 300, 0)], state, resume_from_kept=True)
    assert [(r.file.name, r.start) for r in plan.reads] == [("audit.log", 100)]
    later = settle(state, now=18.0, keep_after=10.0)
    assert later.positions["A"].kept == 200


def test_the_state_file_round_trips_and_restarts_from_kept() -> None:
    state = plan_reads([_file("A", "audit.log", 300, 0)], ShipState(), resume_from_kept=False).state
    state = settle(_shipped(_shipped(state, "A", 100, at=0.0), "A", 250, at=9.0), 10.0, 10.0)
    back = parse_state(render_state(state))
    assert back.positions["A"].kept == 100
    plan = plan_reads([_file("A", "audit.log", 300, 0)], back, resume_from_kept=True)
    assert [r.start for r in plan.reads] == [100]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"{", "not JSON"),
        (b'{"version": 9}', "not a version 1 ship state"),
        (b'{"version": 1, "files": [{"name": "a"}]}', "a bad file entry"),
    ],
)
def test_a_damaged_state_file_is_refused_with_the_reason(data: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_state(data)


def test_only_whole_lines_leave_and_the_event_time_they_reach() -> None:
    block = b'{"a":1,"stageTimestamp":"2026-11-01T00:00:01.000000Z"}\n{"a":2,"stageTi'
    assert whole_lines(block) == block[: block.index(b"\n") + 1]
    assert last_logged(whole_lines(block)) == "2026-11-01T00:00:01.000000Z"
    assert whole_lines(b"no newline yet") == b""
    assert last_logged(b"") == ""


def test_pending_bytes_count_what_the_store_has_not_acknowledged() -> None:
    files = [_file("A", "audit-1.log", 100, 0), _file("B", "audit.log", 40, 1)]
    state = _shipped(plan_reads(files, ShipState(), resume_from_kept=False).state, "A", 70)
    assert pending_bytes(files, state) == 30 + 40


def test_node_and_cluster_are_stream_fields_and_time_is_the_stage_time() -> None:
    assert render_insert_params("cp-1", "prod") == {
        "_time_field": "stageTimestamp",
        "_stream_fields": "node,cluster",
        "extra_fields": "node=cp-1,cluster=prod",
    }
    assert render_insert_params("cp-1", "")["_stream_fields"] == "node"


def test_a_file_that_grew_after_it_was_last_seen_and_was_gzipped_is_read_on() -> None:
    state = plan_reads([_file("A", "audit.log", 100, 0)], ShipState(), resume_from_kept=False).state
    state = _shipped(state, "A", 100)  # all of it, as it was then
    gz = [_file("A", "audit-1.log.gz", -1, 0, compressed=True), _file("B", "audit.log", 9, 1)]
    plan = plan_reads(gz, state, resume_from_kept=False)
    assert [(r.file.name, r.start) for r in plan.reads] == [
        ("audit-1.log.gz", 100),
        ("audit.log", 0),
    ]


VLINSERT = """# HELP x
process_start_time_seconds 1700000000
vl_insert_remote_send_errors_total{addr="127.0.0.1:1"} 0
vl_insert_remote_send_errors_total{addr="127.0.0.1:2"} %d
"""


def test_a_storage_node_failing_behind_vlinsert_is_one_loss_to_resend_for() -> None:
    seen, why = plan_store_failure(None, parse_store_vitals(VLINSERT % 0), 0.0)
    assert (seen.started, seen.send_errors, why) == (1700000000.0, 0.0, "")
    steps = [(1, 0, ""), (2, 3, "storage node"), (3, 9, ""), (20, 12, ""), (45, 12, ""),
             (48, 13, ""), (90, 14, "storage node")]  # fmt: skip
    for at, errors, expected in steps:
        seen, why = plan_store_failure(seen, parse_store_vitals(VLINSERT % errors), at)
        assert (expected in why) if expected else why == "", (at, errors, why)


def test_a_restarted_store_is_seen_by_its_start_time() -> None:
    seen, _ = plan_store_failure(None, parse_store_vitals("process_start_time_seconds 5\n"), 0)
    _, why = plan_store_failure(seen, parse_store_vitals("process_start_time_seconds 9\n"), 1)
    assert "restarted" in why
