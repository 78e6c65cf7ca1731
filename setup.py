"""Only to record the commit a wheel is built from, so ``kube-audit --version`` can name it;
everything else is declared in pyproject.toml."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def source_commit() -> str:
    """$KUBE_AUDIT_COMMIT (a build without .git: Docker, CI), else git's HEAD, else nothing."""
    given = os.environ.get("KUBE_AUDIT_COMMIT", "").strip()
    if given:
        return given
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


class BuildPyWithCommit(build_py):
    def run(self) -> None:
        super().run()
        commit = source_commit()
        if commit and not self.dry_run:
            (Path(self.build_lib) / "kube_audit" / "COMMIT").write_text(commit + "\n")


setup(cmdclass={"build_py": BuildPyWithCommit})
