"""The API contract on the real kube-apiserver (the emulator passes the same checks)."""

from __future__ import annotations

import kubernetes.client
import kubernetes.config

from kube_audit.kube import KubeApi
from tests.contract import check_api_contract
from tests.controlplane.cluster import ControlPlane


def test_the_real_apiserver_keeps_the_api_contract(cp: ControlPlane) -> None:
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(
        config_file=str(cp.first.admin_kubeconfig), client_configuration=configuration
    )
    check_api_contract(KubeApi(kubernetes.client.ApiClient(configuration)))
