"""The control-plane tier: one real node shared by the package's tests (booting one takes ~10 s)."""

from __future__ import annotations

import subprocess
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from kube_audit.constants import ROLLOUT_LEASE
from tests.controlplane.cluster import (
    BIN,
    TOKEN_NAMESPACE,
    ControlPlane,
    boot_single_node,
    control_plane,
    require_tier,
)


@pytest.fixture(scope="package")
def standin() -> Path:
    """The kubelet stand-in binary (its decoders need no cluster)."""
    require_tier()
    return BIN / "kubelet-standin"


@pytest.fixture(scope="package")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    require_tier()
    with control_plane(tmp_path_factory.mktemp("controlplane")) as plane:
        boot_single_node(plane)
        yield plane


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None]:
    """A failing test's report shows each node's operator log (kube_audit's lines) and the
    rollout Lease: the tier's folders are gone after a CI run, and a rollout that stalls one
    run in five cannot be explained afterwards without them."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        plane = getattr(value, "cp", value)
        if isinstance(plane, ControlPlane):
            report.sections.append((f"operators of fixture {name!r}", operators_at_failure(plane)))
            return


def operators_at_failure(plane: ControlPlane, lines: int = 40) -> str:
    parts = []
    for node in plane.nodes:
        log = node.work / "operator.log"
        if log.is_file():
            ours = [x for x in log.read_text(errors="replace").splitlines() if " kube_audit." in x]
            parts.append(f"--- {node.name}: kube_audit's last lines\n" + "\n".join(ours[-lines:]))
    try:
        lease = plane.kubectl("-n", TOKEN_NAMESPACE, "get", "lease", ROLLOUT_LEASE, "-o", "yaml",
                              check=False, timeout=20)  # fmt: skip
        parts.append(f"--- Lease {ROLLOUT_LEASE}\n{lease.stdout or lease.stderr}")
    except subprocess.TimeoutExpired:
        parts.append("--- the API did not answer within 20 s")
    return "\n".join(parts)
