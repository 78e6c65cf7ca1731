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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.auditlog import generate  # noqa: E402

LOG = REPO / "build/bench/audit.log"
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
# Within this factor of grep -F on the selective question (the broad one prints 72,000 results).
GREP_FACTOR = {"selective (alice's creates of services)": 3.0}


def ensure_log() -> None:
    if LOG.exists() and LOG.stat().st_size >= SIZE:
        return
    LOG.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with LOG.open("wb") as fh:
        for line in generate(10**9):
            fh.write(line)
            written += len(line)
            if written >= SIZE:
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


def main() -> int:
    ensure_log()
    print(f"who: log {LOG.stat().st_size / 2**20:.0f} MB")
    failed = 0
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
