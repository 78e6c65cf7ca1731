"""The real node tier: one node made by ``kubeadm init``, run by the real kubelet through
containerd, with kube-audit installed as users install it (the image, the DaemonSet's pod)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.controlplane.cluster import require_tier
from tests.realnode.cluster import Real, real_node
from tests.realnode.node import why_unavailable


@pytest.fixture(scope="package")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Real]:
    require_tier(why_unavailable)
    with real_node(tmp_path_factory.mktemp("realnode")) as plane:
        yield plane
