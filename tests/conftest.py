"""Shared fixtures: object builders and the kubeadm manifests of distant Kubernetes versions."""

from __future__ import annotations

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
