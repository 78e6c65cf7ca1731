"""``kube-audit who`` against ``jq -c 'select(...)'`` and ``grep -F`` on the same 200 MB log.

Targets: on a selective question at least 10x faster than jq and within 3x of ``grep -F`` (which
only finds lines and answers nothing); on a broad one at least 3x faster than jq; under 100 MB of
memory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.auditlog import generate  # noqa: E402

LOG = REPO / "build/bench/audit.log"
ROTATED = LOG.parent / "audit-2026-10-31T16-00-00.000.log"
ROTATED_START = datetime(2026, 10, 31, 16, tzinfo=UTC)
SIZE = int(os.environ.get("BENCH_LOG_MB", "200")) * 1024 * 1024
WHO = str(REPO / ".venv/bin/kube-audit")

QUESTIONS = {
    "selective (alice's creates of services)": (
        ["--user", "alice", "--verb", "create", "--resource", "svc"],
        'select(.user.username=="alice" and .verb=="create" and .objectRef.resource=="services")',
        '"username":"alice"',
        10.0,
    ),
    "broad (every get by an authenticated user)": (
        ["--verb", "get", "--group", "system:authenticated"],
        'select(.verb=="get" and (.user.groups|index("system:authenticated")))',
        '"verb":"get"',
        3.0,
    ),
}
FIRST_ROW_S = 0.5
ROWS, ROWS_MB = 150_000, 100
# Within this factor of grep -F on the selective question (the broad one prints 72,000 results).
GREP_FACTOR = {"selective (alice's creates of services)": 3.0}


def ensure_log() -> None:
    """The 200 MB log, and a rotated one before it (50 MB) for the question over a folder."""
    for path, size, start in ((LOG, SIZE, None), (ROTATED, SIZE // 4, ROTATED_START)):
        if path.exists() and path.stat().st_size >= size:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with path.open("wb") as fh:
            for line in generate(10**9, seed=11, start=start) if start else generate(10**9):
                fh.write(line)
                written += len(line)
                if written >= size:
                    break


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command; output goes to a real file, since grep
    stops at the first match when it sees its output is /dev/null."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        raise RuntimeError(f"{cmd[0]} failed")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def first_row_seconds(cmd: list[str]) -> float:
    """Wall seconds until the first row reaches a pipe, as `who ... | head` sees it; the
    command is stopped there."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    seconds = time.perf_counter() - start
    proc.kill()
    proc.wait()
    if not first:
        raise RuntimeError(f"{cmd} printed nothing")
    return seconds


def streaming() -> int:
    """Rows as found: time to the first row (target <= 0.5 s) and memory while printing every
    request of the log as a table (target <= 100 MB for 150,000 rows)."""
    failed = 0
    for title, flags in (("table", []), ("json", ["-o", "json"])):
        seconds = first_row_seconds([WHO, "who", str(LOG), "--verb", "get", *flags])
        ok = seconds <= FIRST_ROW_S
        failed += not ok
        print(f"who first row ({title}, | head): {seconds:5.2f} s (target <= {FIRST_ROW_S} s) "
              f"{'ok' if ok else 'ABOVE TARGET'}")  # fmt: skip
    with tempfile.TemporaryFile() as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [WHO, "who", str(LOG.parent)], stdout=sink, stderr=subprocess.DEVNULL
        )
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        sink.seek(0)
        rows = sum(1 for _ in sink) - 1
    mb = usage.ru_maxrss / 1024
    ok = os.waitstatus_to_exitcode(status) == 0 and rows >= ROWS and mb <= ROWS_MB
    failed += not ok
    verdict = "ok" if ok else "ABOVE TARGET"
    print(
        f"who every request of {LOG.parent.name}/ as a table: {rows:,} rows in {seconds:5.2f} "
        f"s, {mb:5.1f} MB (target >= {ROWS:,} rows in <= {ROWS_MB} MB) {verdict}"
    )
    return failed


def main() -> int:
    ensure_log()
    print(f"who: log {LOG.stat().st_size / 2**20:.0f} MB")
    failed = streaming()
    jq = shutil.which("jq")
    for title, (flags, jq_filter, grep_text, target) in QUESTIONS.items():
        who_s, who_mb = run([WHO, "who", str(LOG), "-o", "json", *flags])
        grep_s, _ = run(["grep", "-F", grep_text, str(LOG)])
        line = f"who {title}: {who_s:6.2f} s, {who_mb:5.1f} MB; grep -F {grep_s:5.2f} s"
        if title in GREP_FACTOR:
            close = who_s <= GREP_FACTOR[title] * grep_s
            failed += not close
            line += f" ({who_s / grep_s:.1f}x grep, target <= {GREP_FACTOR[title]:.0f}x)"
        if jq:
            jq_s, _ = run([jq, "-c", jq_filter, str(LOG)])
            speedup = jq_s / who_s
            ok = speedup >= target and who_mb < 100
            failed += not ok
            verdict = "ok" if ok else "BELOW TARGET"
            line += f"; jq {jq_s:6.2f} s -> {speedup:4.1f}x (target {target:.0f}x) {verdict}"
        else:
            line += "; jq not installed (apt-get install jq), no comparison"
        print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
