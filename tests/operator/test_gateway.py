"""``KubeApi`` against the in-process API: raw requests, paging, and errors that say what failed."""

from __future__ import annotations

import socket
from pathlib import Path

import kubernetes.client
import pytest
from kubernetes.config.incluster_config import InClusterConfigLoader

from kube_audit.controller.main import connection_info
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


def _in_cluster_api(tmp_path: Path, token: str) -> KubeApi:
    """A gateway configured by the client's own in-cluster loader, as inside a pod."""
    (tmp_path / "token").write_text(token)
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    configuration = kubernetes.client.Configuration()
    InClusterConfigLoader(
        token_filename=str(tmp_path / "token"),
        cert_filename=str(tmp_path / "ca.crt"),
        environ={"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
    ).load_and_set(configuration)
    return KubeApi(kubernetes.client.ApiClient(configuration))


def test_kopf_gets_the_in_cluster_token_without_a_second_scheme(tmp_path: Path) -> None:
    """The in-cluster loader keeps ``"bearer " + token`` (lower case): kopf must send
    ``Authorization: Bearer <token>``, never ``Bearer bearer <token>`` (401 from every
    apiserver, and the DaemonSet crash-loops)."""
    info = connection_info(_in_cluster_api(tmp_path, "sa-token-1"))
    assert (info.scheme, info.token) == ("Bearer", "sa-token-1")
    assert info.server == "https://10.96.0.1:443"
    assert info.ca_path == str(tmp_path / "ca.crt")


def test_kopf_gets_the_refreshed_service_account_token(tmp_path: Path) -> None:
    """kubelet rotates the projected token; kopf logs in again after a 401 and must then get
    the token the file holds now, through the loader's refresh hook."""
    api = _in_cluster_api(tmp_path, "sa-token-1")
    (tmp_path / "token").write_text("sa-token-2")
    loader_hook = api.client.configuration.refresh_api_key_hook
    assert loader_hook is not None

    def expire_then_refresh(configuration: kubernetes.client.Configuration) -> None:
        configuration.api_key["BearerToken"] = "bearer " + (tmp_path / "token").read_text()

    api.client.configuration.refresh_api_key_hook = expire_then_refresh
    assert connection_info(api).token == "sa-token-2"


@pytest.mark.parametrize(
    ("api_key", "prefix", "expected"),
    [
        ({"BearerToken": "Bearer abc"}, {}, ("Bearer", "abc")),
        ({"BearerToken": "abc"}, {"BearerToken": "Bearer"}, ("Bearer", "abc")),
        ({"authorization": "bearer abc"}, {}, ("Bearer", "abc")),
        ({}, {}, (None, None)),
    ],
)
def test_kopf_gets_one_scheme_whatever_the_loader_stored(
    api_key: dict[str, str], prefix: dict[str, str], expected: tuple[str | None, str | None]
) -> None:
    configuration = kubernetes.client.Configuration(host="https://127.0.0.1:6443")
    configuration.api_key = api_key
    configuration.api_key_prefix = prefix
    info = connection_info(KubeApi(kubernetes.client.ApiClient(configuration)))
    assert (info.scheme, info.token) == expected
