"""Shipping to the real VictoriaLogs: ``kube-audit ship``'s throughput and peak memory, and the
fault that decided against vlagent (issue 35), run on both: the shipper frozen while the log
rotates twice, then killed and started again, counted in the store by (auditID, stage).

Targets: at least 20,000 events/s from one shipper; peak RSS under 100 MB (the ship container's
limit is 192 MiB); nothing lost in the fault. vlagent's figures are reported, not judged.
Needs ``make victorialogs`` (Go 1.26+). BENCH_SHIP_EVENTS sets the size (default 1,000,000).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.auditlog import generate  # noqa: E402
from tests.logwriter import RotatingLog  # noqa: E402
from tests.store.store import BIN, Server, ShipProcess, count_stored, wait_for  # noqa: E402

EVENTS = int(os.environ.get("BENCH_SHIP_EVENTS", "1000000"))
ROTATE = 100 * 1024 * 1024


def _write(log: RotatingLog, lines: object, count: int) -> int:
    written, batch = 0, []
    for line in lines:  # type: ignore[attr-defined]
        batch.append(line)
        if len(batch) == 5_000:
            log.write(batch)
            written += len(batch)
            batch = []
        if written + len(batch) >= count:
            break
    log.write(batch)
    return written + len(batch)


def _peak_rss_kb(pid: int) -> int:
    """The process's own peak (VmHWM starts again at exec; a child's getrusage would count the
    parent's pages it was forked with)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0])


def throughput(work: Path) -> tuple[float, float, int, int]:
    """(events/s, peak RSS MB, events, files) for one shipper sending a rotated, gzipped log."""
    log = RotatingLog(work / "audit", ROTATE, compress=True)
    events = _write(log, generate(EVENTS), EVENTS)
    store = Server("victoria-logs", work / "store").start()
    try:
        ship = ShipProcess(work / "audit", work / "state", store.url).start()
        started = time.monotonic()
        wait_for("every event in the store", lambda: count_stored(store.url)[1] >= events, 1800)
        took = time.monotonic() - started
        assert ship.proc is not None
        peak_kb = _peak_rss_kb(ship.proc.pid)
        ship.stop()
    finally:
        store.stop()
    return events / took, peak_kb / 1024, events, log.rotations + 1


def _vlagent(folder: Path, state: Path, url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "vlagent"), f"-remoteWrite.url={url}/insert/native",
         f"-tmpDataPath={state}", f"-fileCollector.glob={folder}/audit.log",
         "-fileCollector.timeField=stageTimestamp", "-httpListenAddr=127.0.0.1:0",
         "-loggerLevel=ERROR"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def frozen_across_rotations(work: Path, shipper: str) -> tuple[int, int, int]:
    """(written, stored once, stored twice): 60,000 events, frozen, 2 rotations, killed, again."""
    log = RotatingLog(work / "audit", 8 * 1024 * 1024, compress=False, max_backups=10)
    lines = generate(10_000_000, seed=3)
    store = Server("victoria-logs", work / "store").start()
    try:
        if shipper == "vlagent":
            proc = _vlagent(work / "audit", work / "state", store.url)
        else:
            ship = ShipProcess(work / "audit", work / "state", store.url).start()
            assert ship.proc is not None
            proc = ship.proc
        written = _write(log, lines, 20_000)
        wait_for("the first events stored", lambda: count_stored(store.url)[1] >= written, 120)
        proc.send_signal(signal.SIGSTOP)
        rotations = log.rotations
        while log.rotations < rotations + 2:
            written += _write(log, lines, 5_000)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if shipper == "vlagent":
            proc = _vlagent(work / "audit", work / "state", store.url)
        else:
            ship.start()
            assert ship.proc is not None
            proc = ship.proc
        written += _write(log, lines, 5_000)
        deadline = time.monotonic() + 90
        while count_stored(store.url)[1] < written and time.monotonic() < deadline:
            time.sleep(1)
        rows, events = count_stored(store.url)
        proc.terminate()
        proc.wait()
    finally:
        store.stop()
    return written, events, rows - events


def main() -> int:
    if not (BIN / "victoria-logs").is_file():
        print("store bench: skipped, no build/victorialogs (make victorialogs, Go 1.26+)")
        return 0
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        rate, peak, events, files = throughput(Path(tmp) / "rate")
        ok = rate >= 20_000 and peak < 100
        failed += not ok
        verdict = "ok" if ok else "OVER TARGET"
        print(f"kube-audit ship: {events:,} events in {files} files, gzipped: {rate:,.0f} "
              f"events/s, peak RSS {peak:.0f} MB (target 20,000/s, 100 MB) {verdict}")  # fmt: skip
        for shipper in ("kube-audit ship", "vlagent"):
            work = Path(tmp) / shipper.replace(" ", "-")
            written, stored, twice = frozen_across_rotations(work, shipper.split()[0])
            lost = written - stored
            if shipper != "vlagent":
                failed += lost != 0
            print(f"{shipper}, frozen across 2 rotations then killed: {stored:,} of {written:,} "
                  f"events stored ({lost:,} lost), {twice:,} twice")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
