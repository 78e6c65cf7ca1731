"""Shared fixtures: object builders and the kubeadm manifests of distant Kubernetes versions."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
KUBEADM_VERSIONS = sorted(p.name for p in (FIXTURES / "kubeadm").iterdir())


def audit_user(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kube-audit.io/v1alpha1",
        "kind": "AuditUser",
        "metadata": {"name": name},
        "spec": spec,
    }


def audit_policy(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kube-audit.io/v1alpha1",
        "kind": "AuditPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def long_token(token: str) -> str:
    """A short, readable test token padded to the 32 characters tokens need."""
    return token.ljust(32, "0")


def token_secret(
    name: str,
    token: str,
    namespace: str = "kube-audit",
    key: str = "token",
    token_for: str | None = None,
) -> dict[str, Any]:
    """A token Secret; ``token_for`` labels it for that AuditUser (needed outside kube-audit)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if token_for is not None:
        meta["labels"] = {"kube-audit.io/token-for": token_for}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "stringData": {key: token}}


def kubeadm_manifest_text(version: str) -> str:
    return (FIXTURES / "kubeadm" / version / "kube-apiserver.yaml").read_text()


@pytest.fixture(params=KUBEADM_VERSIONS)
def kubeadm_version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# `make test` runs two workers (pytest-xdist): the real node tier's files are one work unit, sent
# first, and the rest runs meanwhile on the other worker a module at a time (most modules boot
# their cluster once, in a module fixture). Those tiers spend most of their time waiting for
# restarts, so on two cores the run takes about half as long as on one worker.
REAL_NODE_TIER = "tests/realnode/"


def _work_unit(nodeid: str) -> str:
    """The real node tier (two real tiers at once would share the host's cgroups), else the
    test's module."""
    return REAL_NODE_TIER if nodeid.startswith(REAL_NODE_TIER) else nodeid.split("::", 1)[0]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's scope scheduling with our work units (its ``xdist_group`` marks do not reach
    the node IDs of pytest 9.2, which keeps them elsewhere)."""
    from xdist.scheduler import LoadScopeScheduling  # noqa: PLC0415 - only under xdist

    class TierScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    return TierScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real node tier first: its work unit is the longest, so it starts at once."""
    items.sort(key=lambda item: not _work_unit(item.nodeid).startswith(REAL_NODE_TIER))


@pytest.fixture
def open_files() -> Iterator[None]:
    """Thousands of sockets in this process (a crowd of clients): the soft open-files limit
    raised to 4,096."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(f"the open-files hard limit {hard} is under the {wanted} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
