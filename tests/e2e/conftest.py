"""The kind end-to-end suite needs Docker and kind; without them it skips, saying why."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def _missing() -> str | None:
    for tool in ("docker", "kind", "kubectl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        subprocess.run(["docker", "info"], check=True, capture_output=True, timeout=20)
    except (subprocess.SubprocessError, OSError):
        return "no Docker engine is running (docker info failed)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    for item in items:
        if "e2e" in item.keywords:
            reason = reason or _missing()
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"kind end-to-end suite skipped: {reason}"))
