"""The real node tier: one node made by ``kubeadm init``, run by the real kubelet through
containerd, with kube-audit installed as users install it (the image, the DaemonSet's pod)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from tests.controlplane.cluster import require_tier
from tests.realnode.cluster import NAMESPACE, Real, real_node
from tests.realnode.node import why_unavailable

# What kubelet logs when it removes images or evicts pods for want of room.
PRESSURE_WORDS = ("garbage", "Evict", "evict", "DiskPressure", "MemoryPressure", "RemoveImage")


@pytest.fixture(scope="package")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Real]:
    require_tier(why_unavailable)
    with real_node(tmp_path_factory.mktemp("realnode")) as plane:
        yield plane


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None]:
    """A failing test's report says what the node looked like then: the agent's record, the
    operator's log as kubelet wrote it (readable while the API is down) and the pods, so a
    failure in CI, where the node is gone after the run, can be explained."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    plane = getattr(item, "funcargs", {}).get("real")
    if report.when == "call" and report.failed and isinstance(plane, Real):
        report.sections.append(("the real node when the test failed", _node_at_failure(plane)))


def _node_at_failure(plane: Real) -> str:
    tree = plane.node.tree
    parts: list[str] = []
    state = tree / "var/lib/kube-audit/state.json"
    parts.append(f"state.json: {state.read_text() if state.is_file() else '(none)'}")
    logs = sorted(
        (tree / "var/log/pods").glob("kube-audit_*/operator/*.log"), key=lambda p: p.stat().st_mtime
    )
    for log in logs[-2:]:
        ours = [
            line for line in log.read_text(errors="replace").splitlines() if " kube_audit." in line
        ]
        parts.append(
            f"--- {log.relative_to(tree)}, kube_audit's last lines\n" + "\n".join(ours[-40:])
        )
    parts.extend(_control_plane_at_failure(plane))
    try:
        pods = plane.cp.kubectl("get", "pods", "-A", "-o", "wide", check=False, timeout=20)
        parts.append("--- kubectl get pods -A\n" + (pods.stdout or pods.stderr))
        namespace = plane.cp.kubectl("get", "namespace", NAMESPACE, "-o", "jsonpath={.status}",
                                     check=False, timeout=20)  # fmt: skip
        parts.append(f"--- namespace {NAMESPACE} status: {namespace.stdout or namespace.stderr}")
    except subprocess.TimeoutExpired:
        parts.append("--- the API did not answer within 20 s")
    return "\n".join(parts)


def _control_plane_at_failure(plane: Real) -> list[str]:
    """What kubelet and containerd did with the static pods: with the API down (a restart that
    never came back), only the node can say whether the apiserver crashed, was never started, or
    is still the old one."""
    tree = plane.node.tree
    parts: list[str] = []
    for pod in ("kube-apiserver", "etcd"):
        logs = sorted(
            (tree / "var/log/pods").glob(f"kube-system_{pod}-*/{pod}/*.log"),
            key=lambda p: p.stat().st_mtime,
        )
        for log in logs[-2:]:
            lines = log.read_text(errors="replace").splitlines()
            parts.append(f"--- {log.relative_to(tree)}, last lines\n" + "\n".join(lines[-15:]))
    kubelet_log = plane.node.work / "logs" / "kubelet.log"
    if kubelet_log.is_file():
        lines = kubelet_log.read_text(errors="replace").splitlines()
        about = [line for line in lines if "kube-apiserver" in line or "static pod" in line.lower()]
        parts.append("--- kubelet's last lines about kube-apiserver\n" + "\n".join(about[-30:]))
        pressure = [line for line in lines if any(w in line for w in PRESSURE_WORDS)]
        parts.append("--- kubelet on images and eviction\n" + "\n".join(pressure[-15:]))
        parts.append("--- kubelet's last lines\n" + "\n".join(lines[-15:]))
    disk = shutil.disk_usage(tree)
    parts.append(
        f"--- the node's disk: {disk.free / 2**30:.1f} GiB free of {disk.total / 2**30:.1f}"
    )
    tasks = plane.node.ctr("tasks", "ls", check=False)
    parts.append("--- containerd's tasks\n" + (tasks.stdout or tasks.stderr))
    return parts
