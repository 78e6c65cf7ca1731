"""One version, written once (``kube_audit.__version__``); the release workflow's own scripts
(notes from CHANGELOG.md, install.yaml pinned by digest) run here as the workflow runs them."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from kube_audit import __version__
from kube_audit.cli import main

REPO = Path(__file__).resolve().parents[2]
IMAGE = "ghcr.io/kube-audit/kube-audit-operator"
DIGEST = "sha256:" + "0123456789abcdef" * 4
needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not installed"
)


def test_the_version_is_written_once() -> None:
    """pyproject reads it from the package; every image tag and archive name repeats it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kube_audit.__version__"}
    kustomization = yaml.safe_load((REPO / "deploy/kustomization.yaml").read_text())
    assert [i["newTag"] for i in kustomization["images"]] == [__version__]
    assert f"ARG VERSION={__version__}\n" in (REPO / "Dockerfile").read_text()
    # Every way a page names what to install: an image or archive, a release asset, the PyPI
    # package, what --version prints. The CHANGELOG alone names earlier versions.
    mentions = re.compile(
        r"kube-audit-operator(?:[:-]|==)(\d+\.\d+\.\d+)|releases/download/v(\d+\.\d+\.\d+)/"
        r"|kube-audit (\d+\.\d+\.\d+) \(commit"
    )
    pages = [REPO / "README.md", REPO / "Dockerfile", REPO / "CONTRIBUTING.md"]
    pages += [*sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "examples").rglob("*.y*ml"))]
    named = 0
    for path in pages:
        for groups in mentions.findall(path.read_text()):
            found = next(g for g in groups if g)
            named += 1
            assert found == __version__, f"{path.name} names version {found}, not {__version__}"
    assert named >= 10, "the pattern still finds the install steps"


def test_version_names_the_commit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    out = capsys.readouterr().out.strip()
    assert out == f"kube-audit {__version__} (commit {head[:12] or 'unknown'})"


def test_the_changelog_has_this_version_and_the_notes_script_finds_it() -> None:
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert "keepachangelog.com" in changelog and "## [Unreleased]" in changelog
    assert f"## [{__version__}] - " in changelog
    notes = subprocess.run(
        [REPO / "release/notes.sh", __version__], capture_output=True, text=True, check=True
    ).stdout
    assert "### Added" in notes and "## [" not in notes, "only this version's section"
    missing = subprocess.run(
        [REPO / "release/notes.sh", "99.0.0"], capture_output=True, text=True, check=False
    )
    assert missing.returncode == 1 and "no section ## [99.0.0]" in missing.stderr


def test_license_is_the_apache_license() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}


def _containers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        container
        for obj in objects
        if obj.get("kind") == "DaemonSet"
        for kind in ("initContainers", "containers")
        for container in obj["spec"]["template"]["spec"].get(kind, [])
    ]


@needs_kubectl
def test_install_yaml_pins_the_image_by_digest(tmp_path: Path) -> None:
    """The release asset: deploy/ as `kubectl apply -k` installs it, the image by digest."""
    out = tmp_path / "install.yaml"
    subprocess.run(
        [REPO / "release/install-yaml.sh", f"{IMAGE}@{DIGEST}", out], check=True, cwd=tmp_path
    )
    installed = [d for d in yaml.safe_load_all(out.read_text()) if d]
    base = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "deploy")], check=True, capture_output=True, text=True
    ).stdout
    expected = [d for d in yaml.safe_load_all(base) if d]
    assert [(o["kind"], o["metadata"]["name"]) for o in installed] == [
        (o["kind"], o["metadata"]["name"]) for o in expected
    ]
    images = {c["image"] for c in _containers(installed)}
    assert images == {f"{IMAGE}@{DIGEST}"}
    assert not list((REPO / "build").glob(".install-yaml.*")), "no overlay left behind"
    refused = subprocess.run(
        [REPO / "release/install-yaml.sh", f"{IMAGE}:{__version__}", tmp_path / "x.yaml"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 2 and "is not IMAGE@sha256:" in refused.stderr


def test_the_release_workflow_publishes_what_the_readme_installs() -> None:
    """actionlint (in `make lint`) checks the syntax; this checks what the workflow does."""
    workflow = yaml.safe_load((REPO / ".github/workflows/release.yaml").read_text())
    assert workflow[True]["push"]["tags"] == ["v*.*.*"]  # PyYAML reads the key `on` as True
    jobs = workflow["jobs"]
    assert jobs["test"]["uses"] == "./.github/workflows/test.yaml"
    steps = {s.get("uses", "").split("@")[0]: s for s in jobs["image"]["steps"]}
    build = steps["docker/build-push-action"]["with"]
    assert build["platforms"] == "linux/amd64,linux/arm64" and build["push"] is True
    runs = "\n".join(s.get("run", "") for job in jobs.values() for s in job.get("steps", []))
    assert 'cosign sign --yes "$REF"' in runs and "--type spdxjson" in runs
    assert jobs["image"]["permissions"]["id-token"] == "write"
    assert jobs["pypi"]["permissions"] == {"id-token": "write"}
    assert "pypa/gh-action-pypi-publish@release/v1" in str(jobs["pypi"]["steps"])
    assert 'release/install-yaml.sh "$IMAGE@$DIGEST" install.yaml' in runs
    assert "release/notes.sh" in runs and "gh release create" in runs
    for asset in ("admission", "exec-guard"):
        assert f"kubectl kustomize deploy/{asset} > {asset}.yaml" in runs
        assert f" {asset}.yaml " in runs.split("gh release create")[1]
    assert workflow["env"]["IMAGE"] == IMAGE
    test_workflow = yaml.safe_load((REPO / ".github/workflows/test.yaml").read_text())
    assert "workflow_call" in test_workflow[True]


def test_the_test_workflow_runs_the_real_node_tier() -> None:
    """The real node tier runs only as root and with Go 1.26+ (else it skips with one line):
    the workflow that gates a release gives it both, within CI's 90 minutes."""
    workflow = yaml.safe_load((REPO / ".github/workflows/test.yaml").read_text())
    (job,) = workflow["jobs"].values()
    assert job["timeout-minutes"] <= 90
    steps = {s.get("uses", "").split("@")[0]: s for s in job["steps"]}
    go = str(steps["actions/setup-go"]["with"]["go-version"])
    assert tuple(int(p) for p in go.split(".")[:2]) >= (1, 26), go
    assert steps["actions/setup-python"]["with"]["python-version"] == "3.11"
    (run,) = [s["run"] for s in job["steps"] if "run" in s]
    assert run.startswith("sudo ") and run.endswith(" make test"), run
    assert '"PATH=$PATH"' in run, "root runs the Go and Python the steps above installed"
