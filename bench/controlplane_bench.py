"""On a real kubeadm node (tests/controlplane): how long from ``kubectl apply`` of one new
AuditUser to a working token, how long kube-apiserver is down per restart, and what the starter
policy costs in audit log bytes: per 1,000 writes, Secret reads and other reads of a person,
and per minute of the cluster's own idle work. Reported, not asserted; skipped with the reason
where the control-plane tier cannot run (no Go, not root).
"""

from __future__ import annotations

import json
import ssl
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.controlplane.cluster import (  # noqa: E402
    ROOT,
    ControlPlane,
    Downtime,
    Node,
    OperatorProcess,
    Probed,
    boot_single_node,
    control_plane,
    install_operator,
    wait_for,
    why_unavailable,
)
from tests.controlplane.test_job import USERS, is_ready, token_of, whoami  # noqa: E402

ROUNDS = 3
REQUESTS = 1000
IDLE_SECONDS = 60


def time_apply_to_token(
    cp: ControlPlane, node: Probed, rounds: int, prefix: str = "bench"
) -> tuple[list[float], list[float]]:
    """Seconds from ``kubectl apply`` of a new AuditUser to its working token, per round, and
    each stretch of /readyz without a 200 meanwhile (a restart's unavailability)."""
    to_token = []
    with Downtime([node], interval=0.1) as downtime:
        for i in range(rounds):
            name = f"{prefix}-{i}"
            start = time.monotonic()
            cp.apply([{"apiVersion": USERS, "kind": "AuditUser", "metadata": {"name": name}}])
            wait_for(
                f"{name}'s token to work",
                lambda n=name: isinstance(whoami(cp, token_of(cp, n)), dict),
                timeout=300,
                interval=0.2,
            )
            to_token.append(time.monotonic() - start)
            wait_for(f"{name} Ready", lambda n=name: is_ready(cp, "auditusers", n), 120, 0.5)
    return to_token, downtime.gaps(node.name)


def spread(values: list[float]) -> str:
    each = ", ".join(f"{v:.1f}" for v in values)
    return f"median {statistics.median(values):.1f} s over {len(values)} (each: {each})"


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
        to_token, gaps = time_apply_to_token(cp, node, ROUNDS)
        print(f"control plane: kubectl apply of one AuditUser -> working token: {spread(to_token)}")
        if gaps:
            print(
                f"control plane: kube-apiserver down per restart: {spread(gaps)}; kubelet stops "
                "the old one first and it takes up to its 30 s grace"
            )
        log_volume(cp, node)
    return 0


def log_volume(cp: ControlPlane, node: Node) -> None:
    """The starter policy live, then 1,000 requests of each kind by a person (a ServiceAccount
    outside kube-system, as a CI job or Argo CD would be) and a quiet minute, each measured as
    bytes added to audit.log (the log backend writes before it answers)."""
    cp.kubectl("apply", "-f", str(ROOT / "examples/auditpolicy-starter.yaml"))
    wait_for(
        "the starter policy live",
        lambda: is_ready(cp, "auditpolicies", "developers"),
        timeout=300,
        interval=1,
    )
    cp.kubectl("create", "serviceaccount", "person", "-n", "default")
    cp.kubectl(
        "create", "rolebinding", "person", "--clusterrole=edit", "--serviceaccount=default:person"
    )
    cp.kubectl("create", "secret", "generic", "app", "--from-literal=k=v", "-n", "default")
    token = cp.kubectl("create", "token", "person", "-n", "default").stdout.strip()
    context = ssl.create_default_context(cafile=str(node.ca))
    log = node.audit_log_dir / "audit.log"

    def call(method: str, path: str, body: dict[str, object] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(node.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {token}")
        kind = "application/merge-patch+json" if method == "PATCH" else "application/json"
        request.add_header("Content-Type", kind)
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            response.read()

    def grown(run: Callable[[], None]) -> int:
        before = log.stat().st_size
        run()
        return log.stat().st_size - before

    base = "/api/v1/namespaces/default/configmaps"

    def writes() -> None:
        for i in range(REQUESTS // 4):  # create, patch, patch, delete: 4 writes each
            call("POST", base, {"metadata": {"name": f"vol-{i}"}, "data": {"i": "0"}})
            call("PATCH", f"{base}/vol-{i}", {"data": {"i": "1"}})
            call("PATCH", f"{base}/vol-{i}", {"data": {"i": "2"}})
            call("DELETE", f"{base}/vol-{i}")

    figures = {
        "writes (ConfigMap create/patch/delete)": grown(writes),
        "Secret reads": grown(
            lambda: [call("GET", "/api/v1/namespaces/default/secrets/app") for _ in range(REQUESTS)]
        ),
        "other reads (list Pods)": grown(
            lambda: [call("GET", "/api/v1/namespaces/default/pods") for _ in range(REQUESTS)]
        ),
    }
    for what, size in figures.items():
        print(f"audit log, starter policy: {REQUESTS:,} {what}: {size / 1024:.0f} KiB")
    idle = grown(lambda: time.sleep(IDLE_SECONDS))
    print(
        f"audit log, starter policy: the cluster's own work (kubelet, controllers, kube-audit), "
        f"{IDLE_SECONDS} s idle: {idle / 1024:.1f} KiB"
    )


if __name__ == "__main__":
    sys.exit(main())
