"""Nothing lost, counted: every (auditID, stage) written to the log is in the real store after
the shipper was killed, frozen across rotations, the store was down, or crashed right after it
acknowledged. Duplicates are allowed (delivery is at least once; ``who`` counts a request once)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.auditlog import generate
from tests.logwriter import RotatingLog
from tests.store.store import (
    KUBE_AUDIT,
    Server,
    ShipProcess,
    cluster,
    count_stored,
    require_store,
    single_node,
    wait_for,
)

ROTATE_BYTES = 4 * 1024 * 1024  # about 6,000 events a file


class Writer:
    """kube-apiserver's side: events appended at a steady rate, rotated and gzipped as
    lumberjack does, in a thread the test starts and stops."""

    def __init__(
        self, folder: Path, per_second: int = 3_000, seed: int = 11, max_backups: int = 50
    ) -> None:
        self.log = RotatingLog(folder, ROTATE_BYTES, compress=True, max_backups=max_backups)
        self.per_second = per_second
        self.lines = generate(10_000_000, seed=seed)
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        step = max(1, self.per_second // 10)
        while not self._stop.wait(0.1):
            self.log.write(next(self.lines) for _ in range(step))
            self.written += step

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.written

    def wait_rotations(self, more: int, timeout: float = 120) -> None:
        target = self.log.rotations + more
        wait_for(f"{more} rotations", lambda: self.log.rotations >= target, timeout)


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    require_store()
    yield tmp_path


def _finish(writer: Writer, ship: ShipProcess, url: str) -> str:
    """Stops writing, waits for the store to hold every event, and counts: nothing lost."""
    written = writer.stop()
    rows, events = _all_there(url, written)
    ship.stop()
    assert events == written, f"{written - events} of {written} events lost"
    return f"{written} events, {rows - events} sent twice"


def _all_there(url: str, written: int, timeout: float = 180) -> tuple[int, int]:
    """Waits until every written event is in the store; (rows, events) as counted there."""
    deadline = time.monotonic() + timeout
    while (counted := count_stored(url))[1] < written and time.monotonic() < deadline:
        time.sleep(0.5)
    return counted


def test_shipper_killed_three_times_mid_stream(work: Path) -> None:
    with single_node(work) as store, Writer(work / "audit") as writer:
        ship = ShipProcess(work / "audit", work / "state", store.url).start()
        for _ in range(3):
            writer.wait_rotations(1)
            time.sleep(0.7)
            ship.signal(signal.SIGKILL)
            writer.wait_rotations(1)
            ship.start()
        print(_finish(writer, ship, store.url))
    assert writer.log.rotations >= 6


def test_shipper_frozen_across_two_rotations_then_killed(work: Path) -> None:
    """vlagent's loss (issue 35): behind when it dies across rotations. Frozen, the shipper is
    as behind as it gets; the rotated files are gzipped meanwhile."""
    with single_node(work) as store, Writer(work / "audit") as writer:
        ship = ShipProcess(work / "audit", work / "state", store.url).start()
        writer.wait_rotations(1)
        ship.signal(signal.SIGSTOP)
        writer.wait_rotations(2)
        ship.signal(signal.SIGKILL)
        ship.start()
        writer.wait_rotations(1)
        print(_finish(writer, ship, store.url))


def test_store_down_two_minutes_while_the_log_rotates(work: Path) -> None:
    with single_node(work) as store, Writer(work / "audit", per_second=1_000) as writer:
        ship = ShipProcess(work / "audit", work / "state", store.url).start()
        writer.wait_rotations(1)
        store.stop()
        down = time.monotonic()
        writer.wait_rotations(2)
        time.sleep(max(0.0, 120 - (time.monotonic() - down)))
        store.start()
        writer.wait_rotations(1)
        print(_finish(writer, ship, store.url))


def test_store_down_while_rotation_removes_more_backups_than_are_kept(work: Path) -> None:
    """Issue 35 item 2: ``--audit-log-maxbackup=1`` and the store down while the log rotates
    eight times: every backup is removed before the store is back. The running shipper holds
    the files it has not shipped open and sends them from their descriptors. Before, the
    removed backups were lost (counted in kube_audit_ship_lost_bytes_total)."""
    with (
        single_node(work) as store,
        Writer(work / "audit", per_second=3_000, max_backups=1) as writer,
    ):
        ship = ShipProcess(work / "audit", work / "state", store.url).start()
        writer.wait_rotations(1)
        store.stop()
        writer.wait_rotations(8)
        store.start()
        writer.wait_rotations(1)
        print(_finish(writer, ship, store.url))


def test_store_killed_right_after_it_acknowledged(work: Path) -> None:
    """VictoriaLogs answers an insert before the rows are on disk (up to
    -inmemoryDataFlushInterval, 5 s). Killed then, it loses them; the shipper, which kept the
    last --keep-after of acknowledged events, sends them again."""
    folder = work / "audit"
    log = RotatingLog(folder, ROTATE_BYTES, compress=True)
    lines = list(generate(20_000, seed=5))
    with single_node(work) as store:
        ship = ShipProcess(folder, work / "state", store.url).start()
        log.write(lines)
        wait_for("every event acknowledged", lambda: count_stored(store.url)[1] >= len(lines))
        ship.signal(signal.SIGSTOP)
        store.kill()
        store.start()
        survived = count_stored(store.url)[1]
        ship.signal(signal.SIGCONT)
        _, events = _all_there(store.url, len(lines), 60)
        ship.stop()
    assert events == len(lines), f"{len(lines) - events} of {len(lines)} events lost"
    print(f"the killed store kept {survived} of {len(lines)} acknowledged events; all back")


def _who_store(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KUBE_AUDIT), "who", "--store", url, "--user", "alice", "--request-timeout", "20s"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_cluster_with_one_vlstorage_down(work: Path) -> None:
    """No replication in a VictoriaLogs cluster: with a vlstorage down, ingestion goes on to
    the other, and a query is refused as partial: ``who --store`` says so (exit 7)."""
    with cluster(work) as vl, Writer(work / "audit", per_second=2_000) as writer:
        ship = ShipProcess(work / "audit", work / "state", vl.insert.url).start()
        writer.wait_rotations(1)
        down: Server = vl.storage[1]
        down.kill()
        writer.wait_rotations(2)
        partial = _who_store(vl.select.url)
        down.start()
        written = writer.stop()
        rows, events = _all_there(vl.select.url, written)
        whole = _who_store(vl.select.url)
        ship.stop()
    assert partial.returncode == 7, partial.stderr
    assert "store" in partial.stderr and partial.stdout.count("\n") <= 1, partial.stderr
    assert whole.returncode == 0, whole.stderr
    assert events == written, f"{written - events} of {written} events lost"
    print(f"{written} events, {rows - events} sent twice; partial: {partial.stderr.strip()}")
