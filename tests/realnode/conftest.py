"""The real node tier: one node made by ``kubeadm init``, run by the real kubelet through
containerd, with kube-audit installed as users install it (the image, the DaemonSet's pod)."""

from __future__ import annotations

import subprocess
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from tests.controlplane.cluster import require_tier
from tests.realnode.cluster import NAMESPACE, Real, real_node
from tests.realnode.node import why_unavailable


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
    try:
        pods = plane.cp.kubectl("get", "pods", "-A", "-o", "wide", check=False, timeout=20)
        parts.append("--- kubectl get pods -A\n" + (pods.stdout or pods.stderr))
        namespace = plane.cp.kubectl("get", "namespace", NAMESPACE, "-o", "jsonpath={.status}",
                                     check=False, timeout=20)  # fmt: skip
        parts.append(f"--- namespace {NAMESPACE} status: {namespace.stdout or namespace.stderr}")
    except subprocess.TimeoutExpired:
        parts.append("--- the API did not answer within 20 s")
    return "\n".join(parts)
