"""Operator benchmark: the real ``kube-audit operator`` process against the in-process API.

Reports the time from the last change of a burst to the agent's apply (it includes the debounce
window, by design), the operator's memory (RSS) once 10,000 AuditUsers are live (target: under
150 MB), the status writes and Events of the burst and of one more person after it (from the
operator's own metrics), and the event-loop time of 200 interleaved user and Secret events at
10,000 users in the intake.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import kubernetes.client

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.operator.cluster import ClusterThread  # noqa: E402

from kube_audit.constants import CONTROL_PLANE_LABEL  # noqa: E402

USERS = int(os.environ.get("BENCH_USERS", "10000"))
DEBOUNCE = 2.0


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory now (``VmRSS``) or its high-water mark since start (``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def counters(port: int) -> dict[str, float]:
    """The operator's status patch and Event counters, as Prometheus scrapes them."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for name in ("kube_audit_status_patches_total", "kube_audit_events_total"):
        found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
        out[name] = float(found.group(1)) if found else float("nan")
    return out


def settled_counters(port: int, quiet: float = 5.0, limit: float = 900.0) -> dict[str, float]:
    """The counters once they stopped moving for ``quiet`` seconds: every status write and
    Event a change causes has been made."""
    last, since, deadline = counters(port), time.time(), time.time() + limit
    while time.time() < deadline:
        time.sleep(1.0)
        now = counters(port)
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet:
            break
    return last


def intake_events(users: int, events: int = 200) -> float:
    """Event-loop seconds for ``events`` interleaved user and Secret events at ``users``."""
    from kube_audit.controller.clock import SystemClock  # noqa: PLC0415
    from kube_audit.controller.config import OperatorConfig  # noqa: PLC0415
    from kube_audit.controller.intake import Intake  # noqa: PLC0415

    intake = Intake(OperatorConfig(node_name="bench-cp"), None, SystemClock())  # type: ignore[arg-type]
    for i in range(users):
        intake.observe("auditusers", "ADDED", {"metadata": {"name": f"user-{i:05d}"}, "spec": {}})
    intake.observe_secret("ADDED", {"metadata": {"namespace": "kube-audit", "name": "warm-up"}})
    start = time.perf_counter()
    for i in range(events // 2):
        user = {"metadata": {"name": f"user-{i:05d}"}, "spec": {"groups": [f"g{i}"]}}
        intake.observe("auditusers", "MODIFIED", user)
        secret = {"metadata": {"namespace": "elsewhere", "name": f"s-{i}"}}
        intake.observe_secret("ADDED", secret)
    return time.perf_counter() - start


def main() -> int:
    cluster = ClusterThread().start()
    tmp = Path(tempfile.mkdtemp())
    host = tmp / "host"
    shutil.copytree(REPO / "examples/demo/host", host)
    kubeconfig = cluster.write_kubeconfig(tmp / "kubeconfig")
    client = kubernetes.client.ApiClient(cluster.configuration())
    core = kubernetes.client.CoreV1Api(client)
    custom = kubernetes.client.CustomObjectsApi(client)
    core.create_node({"metadata": {"name": "bench-cp", "labels": {CONTROL_PLANE_LABEL: ""}}})
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    metrics_port = free_port()

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                *os.environ.get("BENCH_OPERATOR_CMD", str(REPO / ".venv/bin/kube-audit")).split(),
                "operator",
                "--host-root",
                str(host),
                "--node-name",
                "bench-cp",
                "--no-wait",
                "--debounce",
                str(DEBOUNCE),
                "--metrics-port",
                str(metrics_port),
                "--liveness",
                "",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def create_user(name: str) -> None:
        user = {"apiVersion": "kube-audit.io/v1alpha1", "kind": "AuditUser",
                "metadata": {"name": name}, "spec": {"groups": ["developer"]}}  # fmt: skip
        custom.create_cluster_custom_object("kube-audit.io", "v1alpha1", "auditusers", user)

    def wait_ready(name: str, limit: float = 900) -> None:
        deadline = time.time() + limit
        while time.time() < deadline:
            got = custom.get_cluster_custom_object("kube-audit.io", "v1alpha1", "auditusers", name)
            if any(c["type"] == "Ready" and c["status"] == "True"
                   for c in (got.get("status") or {}).get("conditions") or []):  # fmt: skip
                return
            time.sleep(0.2)

    process = start()
    manifest = host / "etc/kubernetes/manifests/kube-apiserver.yaml"
    try:
        time.sleep(3)
        custom.create_cluster_custom_object(
            "kube-audit.io",
            "v1alpha1",
            "auditpolicies",
            {
                "apiVersion": "kube-audit.io/v1alpha1",
                "kind": "AuditPolicy",
                "metadata": {"name": "dev"},
                "spec": {"rules": [{"level": "Metadata"}]},
            },
        )
        before = manifest.stat().st_mtime_ns
        for i in range(USERS):
            create_user(f"user-{i:05d}")
        last_change = time.time()
        deadline = last_change + 900
        while time.time() < deadline:
            text = manifest.read_text() if manifest.stat().st_mtime_ns != before else ""
            if "token-auth-file" in text:
                tokens = next((host / "etc/kubernetes/kube-audit").iterdir()) / "tokens.csv"
                if tokens.exists() and tokens.read_bytes().count(b"\n") == USERS:
                    break
            time.sleep(0.05)
        applied_after = manifest.stat().st_mtime - last_change
        time.sleep(5)
        memory = rss_mb(process.pid)
        peak = rss_mb(process.pid, "VmHWM")
        wait_ready(f"user-{USERS - 1:05d}")  # the burst's status is written to the last one
        burst = settled_counters(metrics_port)
        create_user("one-more")
        wait_ready("one-more")
        one_more = settled_counters(metrics_port)
        stopping = time.time()
        process.terminate()
        process.wait(120)
        stopped_in = time.time() - stopping
        process = start()
        time.sleep(20 + USERS / 500)
        steady = rss_mb(process.pid)
        steady_peak = rss_mb(process.pid, "VmHWM")
    finally:
        process.terminate()
        process.wait(120)
        cluster.stop()
    print(
        f"operator: last change of a burst of {USERS} creates -> agent apply "
        f"{applied_after:6.2f} s (debounce {DEBOUNCE:.0f} s)"
    )
    verdict = "ok" if peak < 150 else "OVER TARGET"
    print(
        f"operator: RSS with {USERS} AuditUsers after the burst  {memory:6.1f} MB, "
        f"peak {peak:6.1f} MB (target 150 MB)  {verdict}"
    )
    verdict = "ok" if steady_peak < 150 else "OVER TARGET"
    print(
        f"operator: RSS with {USERS} AuditUsers after a restart  {steady:6.1f} MB, "
        f"peak {steady_peak:6.1f} MB (target 150 MB)  {verdict}"
    )
    print(f"operator: stopped {stopped_in:5.1f} s after SIGTERM, in the middle of status writes")
    patches, events = "kube_audit_status_patches_total", "kube_audit_events_total"
    print(
        f"operator: the burst of {USERS} (and one policy) on one node: {burst[patches]:.0f} "
        f"status writes, {burst[events]:.0f} Events (per-object Events capped, the rest "
        "counted on the Node)"
    )
    print(
        f"operator: one more person at {USERS}: "
        f"{one_more[patches] - burst[patches]:.0f} status writes, "
        f"{one_more[events] - burst[events]:.0f} Events"
    )
    seconds = intake_events(USERS)
    print(f"operator: intake of 200 interleaved user and Secret events at {USERS} users: "
          f"{seconds:6.3f} s of event loop")  # fmt: skip
    return 0 if max(peak, steady_peak) < 150 else 1


if __name__ == "__main__":
    sys.exit(main())
