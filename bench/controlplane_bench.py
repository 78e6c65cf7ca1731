"""On a real kubeadm node (tests/controlplane): how long from ``kubectl apply`` of one new
AuditUser to a working token, and how long kube-apiserver is down per restart. Reported, not
asserted; skipped with the reason where the control-plane tier cannot run (no Go, not root).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.controlplane.cluster import (  # noqa: E402
    OperatorProcess,
    boot_single_node,
    control_plane,
    install_operator,
    wait_for,
    why_unavailable,
)
from tests.controlplane.test_job import USERS, token_of, whoami  # noqa: E402

ROUNDS = 3


class Downtime(threading.Thread):
    """Polls /readyz every 0.1 s and records each stretch without a 200."""

    def __init__(self, probe: object) -> None:
        super().__init__(daemon=True)
        self.probe = probe
        self.stop = threading.Event()
        self.gaps: list[float] = []

    def run(self) -> None:
        down_since: float | None = None
        while not self.stop.is_set():
            try:
                ok = self.probe() == 200  # type: ignore[operator]
            except OSError:
                ok = False
            now = time.monotonic()
            if not ok and down_since is None:
                down_since = now
            elif ok and down_since is not None:
                self.gaps.append(now - down_since)
                down_since = None
            time.sleep(0.1)


def main() -> int:
    problem = why_unavailable()
    if problem is not None:
        print(f"control plane: skipped: {problem[0]}")
        return 1 if problem[1] else 0
    with tempfile.TemporaryDirectory() as tmp, control_plane(Path(tmp)) as cp:
        node = boot_single_node(cp)
        operator = OperatorProcess(cp, node, install_operator(cp))
        operator.start()
        wait_for(
            "the operator's first reconcile",
            lambda: "unchanged, the node runs config" in operator.log.read_text(),
            timeout=120,
        )
        downtime = Downtime(node.readyz)
        downtime.start()
        to_token = []
        for i in range(ROUNDS):
            name = f"bench-{i}"
            start = time.monotonic()
            cp.apply([{"apiVersion": USERS, "kind": "AuditUser", "metadata": {"name": name}}])
            wait_for(
                f"{name}'s token to work",
                lambda n=name: isinstance(whoami(cp, token_of(cp, n)), dict),
                timeout=300,
                interval=0.2,
            )
            to_token.append(time.monotonic() - start)
        downtime.stop.set()
        downtime.join()
        print(
            f"control plane: kubectl apply of one AuditUser -> working token: median "
            f"{statistics.median(to_token):.1f} s over {ROUNDS} (each: "
            + ", ".join(f"{t:.1f}" for t in to_token)
            + ")"
        )
        gaps = downtime.gaps
        if gaps:
            print(
                f"control plane: kube-apiserver down per restart: median "
                f"{statistics.median(gaps):.1f} s over {len(gaps)} (each: "
                + ", ".join(f"{g:.1f}" for g in gaps)
                + "); kubelet stops the old one first and it takes up to its 30 s grace"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
