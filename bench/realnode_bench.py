"""On a node made by ``kubeadm init`` and run by the real kubelet through containerd, kube-audit
installed from its image as users install it (tests/realnode): the image's size, operator pod
start -> Ready, ``kubectl apply`` of an AuditUser -> its token works (through the pod), how long
kube-apiserver is unavailable per restart, and the operator container's memory at rest and with
10,000 AuditUsers (BENCH_USERS; goal < 150 MB, the container's limit is 384 MiB). Reported,
not asserted; skipped with the reason where the tier cannot run.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from controlplane_bench import spread, time_apply_to_token  # noqa: E402
from tests.controlplane.cluster import wait_for  # noqa: E402
from tests.controlplane.test_job import USERS, is_ready  # noqa: E402
from tests.realnode.cluster import Real, real_node  # noqa: E402
from tests.realnode.node import operator_archive, why_unavailable  # noqa: E402

ROUNDS = 5
MANY = int(os.environ.get("BENCH_USERS", "10000"))
CHUNK = 500


def container_memory(real: Real) -> tuple[float, float]:
    """(RSS of the operator's process, the container cgroup's peak) in MB."""
    pod = real.operator_pod()
    container = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    tasks = real.node.ctr("tasks", "ls").stdout.splitlines()[1:]
    pid = next(line.split()[1] for line in tasks if line.split()[0] == container)
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
    spec = json.loads(real.node.ctr("containers", "info", container).stdout)["Spec"]
    peak = Path("/sys/fs/cgroup/memory", spec["linux"]["cgroupsPath"].lstrip("/"))
    peak_bytes = int((peak / "memory.max_usage_in_bytes").read_text())
    return rss_kb / 1024, peak_bytes / 1e6


def image_size() -> None:
    archive = operator_archive()
    print(f"real node: image {archive.name}: {archive.stat().st_size / 1e6:.0f} MB uncompressed")


def pod_start_to_ready(real: Real) -> None:
    old = real.operator_pod()["metadata"]["name"]
    start = time.monotonic()
    real.cp.kubectl("-n", "kube-audit", "delete", "pod", old, "--wait=false")

    def successor_ready() -> bool:
        pods = real.cp.kubectl_json("get", "pods", "-n", "kube-audit")["items"]
        return any(
            p["metadata"]["name"] != old
            and any(c["type"] == "Ready" and c["status"] == "True"
                    for c in p["status"].get("conditions", []))
            for p in pods
        )  # fmt: skip

    wait_for("its successor Ready", successor_ready, 300, 0.2)
    print(
        f"real node: operator pod deleted -> its successor Ready: {time.monotonic() - start:.1f} s "
        "(image on the node: start-up, first reconcile, readiness probe every 5 s)"
    )


def apply_to_token(real: Real) -> None:
    to_token, gaps = time_apply_to_token(real.cp, real.node, ROUNDS)
    print(f"real node: kubectl apply of one AuditUser -> its token works, through the pod: "
          f"{spread(to_token)}")  # fmt: skip
    if gaps:
        print(f"real node: kube-apiserver unavailable per restart (/readyz not 200): "
              f"{spread(gaps)}")  # fmt: skip


def many_users(real: Real) -> None:
    cp, node = real.cp, real.node
    start = time.monotonic()
    for first in range(0, MANY, CHUNK):
        items = [
            {"apiVersion": USERS, "kind": "AuditUser", "metadata": {"name": f"user-{i:05d}"},
             "spec": {"groups": ["developer", f"team-{i % 50}"]}}
            for i in range(first, first + CHUNK)
        ]  # fmt: skip
        body = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        cp.kubectl("create", "-f", "-", stdin=body, timeout=600)

    def token_lines() -> int:
        files = list((node.tree / "etc/kubernetes/kube-audit").glob("*/tokens.csv"))
        newest = max(files, key=lambda p: p.stat().st_mtime) if files else None
        return len(newest.read_text().splitlines()) if newest else 0

    wait_for(f"{MANY:,} identities in the token file", lambda: token_lines() >= MANY, 1800, 5)
    wait_for("the last user Ready", lambda: is_ready(cp, "auditusers", f"user-{MANY - 1:05d}"),
             1800, 5)  # fmt: skip
    took = time.monotonic() - start
    rss, peak = container_memory(real)
    print(
        f"real node: {MANY:,} AuditUsers created -> all in the token file and the last Ready: "
        f"{took:.0f} s; operator container then: RSS {rss:.0f} MB, peak {peak:.0f} MB "
        "(goal < 150 MB, limit 384 MiB)"
    )


def main() -> int:
    problem = why_unavailable()
    if problem is not None:
        print(f"real node: skipped: {problem[0]}")
        return 1 if problem[1] else 0
    image_size()
    with tempfile.TemporaryDirectory() as tmp, real_node(Path(tmp)) as real:
        rss, peak = container_memory(real)
        print(f"real node: operator container at rest: RSS {rss:.0f} MB, peak {peak:.0f} MB")
        pod_start_to_ready(real)
        apply_to_token(real)
        many_users(real)
    return 0


if __name__ == "__main__":
    sys.exit(main())
