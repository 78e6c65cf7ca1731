"""``kube-audit ship`` over real files and a store that fails as told: every line of the log
reaches the store whatever stops the shipper, counted line by line."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from kube_audit.agent.ship import STATE_FILE, Shipper
from kube_audit.constants import SHIP_REPORT_FILE
from kube_audit.core.ship_report import parse_ship_report
from kube_audit.errors import HostError, StoreError
from tests.auditlog import generate
from tests.logwriter import RotatingLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeStore:
    """Keeps what it acknowledged, with when; ``crash`` loses what it acknowledged within the
    last ``unflushed`` seconds (as VictoriaLogs' in-memory rows) and closes the connection."""

    url = "http://store.test"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.rows: list[tuple[float, bytes]] = []
        self.down = False
        self.broken_connection = False
        self.inserts = 0

    def insert(self, lines: bytes, params: dict[str, str]) -> None:
        assert params["extra_fields"].startswith("node=cp-1")
        if self.down or self.broken_connection:
            self.broken_connection = False
            raise StoreError("the store at http://store.test did not take the lines: refused")
        self.inserts += 1
        self.rows += [(self.clock(), line) for line in lines.splitlines(keepends=True)]

    def check(self) -> None:
        if self.down or self.broken_connection:
            self.broken_connection = False
            raise StoreError("the store at http://store.test broke the connection: reset")

    def crash(self, unflushed: float) -> None:
        self.rows = [(t, r) for t, r in self.rows if t <= self.clock() - unflushed]
        self.broken_connection = True

    def keys(self) -> list[tuple[str, str]]:
        return [_key(line) for _, line in self.rows]


def _key(line: bytes) -> tuple[str, str]:
    event = orjson.loads(line)
    return (event["auditID"], event["stage"])


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> FakeStore:
    return FakeStore(clock)


def _shipper(tmp_path: Path, store: FakeStore, clock: Clock, **kw: object) -> Shipper:
    return Shipper(
        folder=tmp_path / "log",
        log_file="audit.log",
        state_dir=tmp_path / "state",
        store=store,  # type: ignore[arg-type]
        node="cp-1",
        monotonic=clock,
        wall=clock,
        batch_bytes=kw.pop("batch_bytes", 64 << 10),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def _lines(count: int, seed: int) -> list[bytes]:
    return list(generate(count, seed=seed, start=datetime(2026, 11, 1, tzinfo=UTC)))


def test_two_rotations_and_a_gzip_while_stopped_lose_nothing_and_send_nothing_twice(
    tmp_path: Path, store: FakeStore, clock: Clock
) -> None:
    log = RotatingLog(tmp_path / "log", max_bytes=200_000, compress=True)
    lines = _lines(1500, seed=1)
    log.write(lines[:400])
    first = _shipper(tmp_path, store, clock)
    first.poll()
    clock.now += 60
    first.poll()  # what was sent is kept by now, and the state file says so
    log.write(lines[400:])  # the shipper is gone (SIGKILL): the log rotates, backups gzipped
    assert log.rotations >= 2
    _shipper(tmp_path, store, clock).poll()
    assert sorted(store.keys()) == sorted(_key(line) for line in lines)


def test_a_kill_between_acknowledgement_and_state_file_only_sends_lines_again(
    tmp_path: Path, store: FakeStore, clock: Clock
) -> None:
    log = RotatingLog(tmp_path / "log", max_bytes=300_000)
    lines = _lines(800, seed=2)
    log.write(lines[:500])
    shipper = _shipper(tmp_path, store, clock)
    shipper.poll()
    state_before = (tmp_path / "state" / STATE_FILE).read_bytes()
    log.write(lines[500:])
    shipper.poll()
    (tmp_path / "state" / STATE_FILE).write_bytes(state_before)  # the last save never happened
    _shipper(tmp_path, store, clock).poll()
    keys = store.keys()
    assert set(keys) == {_key(line) for line in lines}
    assert len(keys) > len(lines)  # sent again, never lost: who counts a line once


def test_lines_the_store_lost_in_a_crash_after_acknowledging_are_sent_again(
    tmp_path: Path, store: FakeStore, clock: Clock
) -> None:
    log = RotatingLog(tmp_path / "log", max_bytes=250_000)
    lines = _lines(1200, seed=3)
    shipper = _shipper(tmp_path, store, clock, keep_after=10.0)
    for start in range(0, len(lines), 100):
        log.write(lines[start : start + 100])
        shipper.poll()
        clock.now += 1.0
    store.crash(unflushed=5.0)  # acknowledged in the last 5 s: gone with the store's memory
    assert len(set(store.keys())) < len({_key(line) for line in lines})
    with pytest.raises(StoreError):
        shipper.poll()  # the old connection is broken: the shipper learns of the restart
    shipper.poll()
    assert set(store.keys()) == {_key(line) for line in lines}


def test_the_store_down_while_the_log_rotates_loses_nothing(
    tmp_path: Path, store: FakeStore, clock: Clock
) -> None:
    log = RotatingLog(tmp_path / "log", max_bytes=150_000, compress=True)
    lines = _lines(1500, seed=4)
    shipper = _shipper(tmp_path, store, clock)
    log.write(lines[:300])
    shipper.poll()
    store.down = True
    log.write(lines[300:])
    for _ in range(3):
        with pytest.raises(StoreError):
            shipper.poll()
        clock.now += 40
    assert log.rotations >= 2
    store.down = False
    shipper.poll()
    assert set(store.keys()) == {_key(line) for line in lines}
    assert shipper.metrics.lost_bytes._value.get() == 0


def test_backups_rotated_away_while_the_store_is_down_are_held_and_shipped(
    tmp_path: Path, store: FakeStore, clock: Clock
) -> None:
    """Issue 35 item 2: lumberjack removes the oldest backups (``--audit-log-maxbackup``)
    while the store is down; the running shipper holds every file it has not shipped in full
    open, reads the removed ones through their descriptors, and loses nothing. Before, the
    removed backups were counted lost."""
    log = RotatingLog(tmp_path / "log", max_bytes=100_000, max_backups=2, compress=True)
    lines = _lines(1000, seed=5)
    shipper = _shipper(tmp_path, store, clock)
    log.write(lines[:100])
    shipper.poll()
    store.down = True
    for start in range(100, len(lines), 100):  # the shipper looks now and then, the store down
        log.write(lines[start : start + 100])
        with pytest.raises(StoreError):
            shipper.poll()
        clock.now += 5
    assert log.rotations >= 4, "more rotations than backups kept: some were removed"
    store.down = False
    shipper.poll()
    clock.now += 60
    shipper.poll()
    assert shipper.metrics.lost_bytes._value.get() == 0
    assert set(store.keys()) == {_key(line) for line in lines}
    assert not shipper._held, "every file shipped in full is let go"


def _rotate_away_while_down(
    tmp_path: Path, store: FakeStore, clock: Clock, shipper: Shipper, lines: list[bytes]
) -> RotatingLog:
    log = RotatingLog(tmp_path / "log", max_bytes=100_000, max_backups=2)
    log.write(lines[:100])
    shipper.poll()
    store.down = True
    log.write(lines[100:300])  # the shipper sees these backups but cannot send them
    with pytest.raises(StoreError):
        shipper.poll()
    log.write(lines[300:])  # rotations remove the backups it saw
    store.down = False
    return log


def test_past_the_hold_bound_a_removed_backup_is_let_go_and_counted_lost(
    tmp_path: Path, store: FakeStore, clock: Clock
) -> None:
    """Held removed files keep their disk space: past ``hold_max_bytes`` the oldest is let go
    (the control-plane disk comes first), and what it held is counted in
    kube_audit_ship_lost_bytes_total."""
    lines = _lines(1000, seed=5)
    shipper = _shipper(tmp_path, store, clock, hold_max_bytes=50_000)
    _rotate_away_while_down(tmp_path, store, clock, shipper, lines)
    store.down = True  # still down at the next look, which lets go past the bound
    with pytest.raises(StoreError):
        shipper.poll()
    store.down = False
    shipper.poll()
    lost = shipper.metrics.lost_bytes._value.get()
    assert lost > 0 and shipper.metrics.lost_files._value.get() >= 1
    sent = {_key(line) for _, line in store.rows}
    assert [line for line in lines if _key(line) not in sent]


def test_a_shipper_killed_while_the_store_is_down_counts_what_rotated_away(
    tmp_path: Path, store: FakeStore, clock: Clock
) -> None:
    """Holding protects only a running shipper: killed (its descriptors closed with it), the
    next one finds the backups gone and counts them lost, never silently."""
    lines = _lines(1000, seed=5)
    first = _shipper(tmp_path, store, clock)
    log = RotatingLog(tmp_path / "log", max_bytes=100_000, max_backups=2)
    log.write(lines[:100])
    first.poll()
    store.down = True
    log.write(lines[100:300])
    with pytest.raises(StoreError):
        first.poll()
    seen = {p.name: p.stat().st_size for p in (tmp_path / "log").iterdir()}
    for held in first._held.values():  # SIGKILL: the kernel closes its descriptors
        os.close(held.fd)
    log.write(lines[300:])
    store.down = False
    second = _shipper(tmp_path, store, clock)
    second.poll()
    gone = {name: size for name, size in seen.items() if not (tmp_path / "log" / name).exists()}
    assert gone
    lost = second.metrics.lost_bytes._value.get()
    assert 0 < lost <= sum(gone.values())


def test_a_line_longer_than_a_batch_is_sent_whole(
    tmp_path: Path, store: FakeStore, clock: Clock
) -> None:
    log = RotatingLog(tmp_path / "log", max_bytes=10 << 20)
    event = orjson.loads(_lines(1, seed=6)[0])
    event["requestObject"] = {"data": {"big": "x" * 200_000}}
    big = orjson.dumps(event) + b"\n"
    log.write([big, *_lines(5, seed=7)])
    _shipper(tmp_path, store, clock, batch_bytes=4096).poll()
    assert store.rows[0][1] == big
    assert len(store.rows) == 1 + len(_lines(5, seed=7))


def test_a_line_still_being_written_waits_for_its_end(
    tmp_path: Path, store: FakeStore, clock: Clock
) -> None:
    (tmp_path / "log").mkdir()
    whole, *_ = _lines(1, seed=8)
    (tmp_path / "log" / "audit.log").write_bytes(whole + whole[:40])
    shipper = _shipper(tmp_path, store, clock)
    shipper.poll()
    assert len(store.rows) == 1
    with (tmp_path / "log" / "audit.log").open("ab") as fh:
        fh.write(whole[40:])
    shipper.poll()
    assert len(store.rows) == 2


def test_a_damaged_state_file_is_named_and_left_alone(
    tmp_path: Path, store: FakeStore, clock: Clock
) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / STATE_FILE).write_bytes(b"{not json")
    with pytest.raises(HostError, match=r"ship-state.json: not JSON.*move it away"):
        _shipper(tmp_path, store, clock)
    assert (tmp_path / "state" / STATE_FILE).read_bytes() == b"{not json"


def _once() -> Callable[[], bool]:
    """``stop`` for one turn of the shipper's loop."""
    answers = itertools.chain([False], itertools.repeat(True))
    return lambda: next(answers)


def test_the_report_says_how_far_and_why_not(
    tmp_path: Path, store: FakeStore, clock: Clock
) -> None:
    """Issue 35 item 2: what the operator copies into the node's record. Written every few
    seconds while nothing changes (its age is how the cluster sees a stopped shipper), at
    once when the store starts or stops failing."""
    clock.now = 1_800_000_000.0
    log = RotatingLog(tmp_path / "log", max_bytes=10_000_000)
    lines = _lines(200, seed=7)
    log.write(lines[:100])
    shipper = _shipper(tmp_path, store, clock)
    shipper.run(_once(), lambda _: None)
    report = parse_ship_report((tmp_path / "state" / SHIP_REPORT_FILE).read_bytes())
    assert report.reported_at == clock.now and report.pending_bytes == 0 and not report.last_error
    assert report.logged_until == orjson.loads(lines[99])["stageTimestamp"]
    store.down = True
    log.write(lines[100:])
    clock.now += 1
    shipper.run(_once(), lambda _: None)
    failing = parse_ship_report((tmp_path / "state" / SHIP_REPORT_FILE).read_bytes())
    assert "did not take" in failing.last_error or "broke the connection" in failing.last_error
    assert failing.failing_since == clock.now and failing.pending_bytes > 0
    assert failing.reported_at == clock.now, "a change of state is written at once"
    clock.now += 2
    shipper.run(_once(), lambda _: None)
    again = parse_ship_report((tmp_path / "state" / SHIP_REPORT_FILE).read_bytes())
    assert again.reported_at == clock.now - 2, "nothing changed: not rewritten within 5 s"
    clock.now += 5
    store.down = False
    shipper.run(_once(), lambda _: None)
    done = parse_ship_report((tmp_path / "state" / SHIP_REPORT_FILE).read_bytes())
    assert not done.last_error and done.pending_bytes == 0 and done.failing_since is None
    assert done.logged_until == orjson.loads(lines[-1])["stageTimestamp"]
