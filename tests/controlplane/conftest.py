"""The control-plane tier: one real node shared by the package's tests (booting one takes ~10 s)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controlplane.cluster import (
    BIN,
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
