"""``KubeApi`` against the in-process API: raw requests, paging, and errors that say what failed."""

from __future__ import annotations

import socket

import kubernetes.client
import pytest

from kube_audit.errors import ClusterError, NotFound
from kube_audit.kube import KubeApi
from tests.operator.conftest import Harness


def test_lists_page_through_every_object(harness: Harness) -> None:
    for i in range(1203):
        harness.apply_user(f"user-{i:04d}", groups=["developer"])
    names = set(harness.api.list_uids("auditusers"))
    assert len(names) == 1203
    assert "user-1202" in names
    assert len(harness.api.list_objects("auditusers")) == 1203


def test_errors_name_the_request_and_keep_the_status(harness: Harness) -> None:
    with pytest.raises(NotFound, match=r"get auditusers.kube-audit.io/nobody: HTTP 404"):
        harness.api.get_object("auditusers", "nobody")
    assert harness.api.read_secret("kube-audit", "missing") is None
    owner = {"apiVersion": "kube-audit.io/v1alpha1", "kind": "AuditUser", "name": "a", "uid": "1"}
    assert harness.api.create_token_secret("kube-audit", "audituser-a", "t" * 43, owner)
    assert harness.api.create_token_secret("kube-audit", "audituser-a", "u" * 43, owner) is None
    lease = {"metadata": {"name": "l", "namespace": "kube-audit"}, "spec": {}}
    assert harness.api.create_lease("kube-audit", lease)
    assert not harness.api.create_lease("kube-audit", lease)


def test_unreachable_api_is_a_cluster_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = kubernetes.client.Configuration(host=f"http://127.0.0.1:{port}")
    config.retries = 0
    api = KubeApi(kubernetes.client.ApiClient(config))
    with pytest.raises(ClusterError, match=r"list control-plane Nodes: Kubernetes API unreachable"):
        api.control_plane_nodes()


def test_a_silent_api_times_out() -> None:
    """An apiserver stopping mid-restart can accept a connection and never answer: without a
    timeout the reconcile would hang there, its pod alive and doing nothing."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        config = kubernetes.client.Configuration(
            host=f"http://{sock.getsockname()[0]}:{sock.getsockname()[1]}"
        )
        config.retries = 0
        api = KubeApi(kubernetes.client.ApiClient(config), timeout=0.5)
        with pytest.raises(ClusterError, match=r"list control-plane Nodes: .*timed out"):
            api.control_plane_nodes()  # without the timeout this would never return
