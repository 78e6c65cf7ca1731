"""What `pip install kube-audit-operator` gives an admin's laptop: the wheel built from the
committed sources, installed into a fresh venv without test extras, run under both names
(`kube-audit`, and `kubectl audit` through kubectl's plugin discovery), completion in a real
bash. Needs PyPI for the dependencies: skips with one line where it is not reachable."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from kube_audit import __version__

REPO = Path(__file__).resolve().parents[2]


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _pypi_reachable(), reason="PyPI is not reachable: the wheel is not installed and run"
)


def _run(*cmd: str | Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], check=False, capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, f"{cmd}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _head() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the wheel and its runtime dependencies. The wheel is built
    from a copy of the files git knows (as a clean clone has them), with no .git: the commit
    comes from $KUBE_AUDIT_COMMIT, as in the Dockerfile and the release workflow."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    listed = _run("git", "-C", REPO, "ls-files", "-co", "--exclude-standard", "-z")
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    env = {**os.environ, "KUBE_AUDIT_COMMIT": _head() or "unknown"}
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", base / "dist",
         source, env=env)  # fmt: skip
    venv = base / "venv"
    _run(sys.executable, "-m", "venv", venv)
    (wheel,) = (base / "dist").glob("kube_audit_operator-*.whl")
    _run(venv / "bin/python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         wheel)  # fmt: skip
    return venv


def _env(venv: Path) -> dict[str, str]:
    """A PATH with the venv's scripts first, as after `pipx install` or an activated venv."""
    return {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}


def test_the_wheel_holds_the_package_the_license_and_the_commit(installed: Path) -> None:
    (wheel,) = (installed.parent / "dist").glob("*.whl")
    assert wheel.name == f"kube_audit_operator-{__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert "kube_audit/py.typed" in names and "kube_audit/COMMIT" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
    assert not [n for n in names if n.startswith("tests/")], "no tests in the wheel"
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(f"kube_audit_operator-{__version__}.dist-info/entry_points.txt")
        .decode()
    )
    assert "kube-audit = kube_audit.cli:main" in entry_points
    assert "kubectl-audit = kube_audit.cli:kubectl_plugin" in entry_points


def test_installed_without_test_extras(installed: Path) -> None:
    listed = _run(installed / "bin/python", "-m", "pip", "list", "--format=freeze")
    names = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert {"kopf", "kubernetes", "pydantic", "argcomplete"} <= names
    assert not names & {"pytest", "hypothesis", "kmock", "ruff", "mypy"}, names


def test_version_names_the_release_and_the_commit(installed: Path) -> None:
    out = _run("kube-audit", "--version", env=_env(installed)).strip()
    assert out == f"kube-audit {__version__} (commit {(_head() or 'unknown')[:12]})"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_finds_the_plugin(installed: Path) -> None:
    env = _env(installed)
    listed = _run("kubectl", "plugin", "list", env=env)
    assert str(installed / "bin/kubectl-audit") in listed
    help_text = _run("kubectl", "audit", "--help", env=env)
    assert help_text.startswith("usage: kubectl audit ")
    who = _run("kubectl", "audit", "who", "--help", env=env)
    assert who.startswith("usage: kubectl audit who ")


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_completes_commands_and_flags(installed: Path) -> None:
    """The script `kube-audit completion bash` prints, sourced in bash, asked as bash asks."""

    def complete(line: str) -> list[str]:
        script = (
            'source <(kube-audit completion bash) && read -ra COMP_WORDS <<< "$LINE" && '
            '{ [ "${LINE: -1}" = " " ] && COMP_WORDS+=(""); true; } && '
            "COMP_CWORD=$((${#COMP_WORDS[@]} - 1)) COMP_LINE=$LINE COMP_POINT=${#LINE} && "
            '_python_argcomplete kube-audit && printf "%s\\n" "${COMPREPLY[@]}"'
        )
        out = _run("bash", "-c", script, env={**_env(installed), "LINE": line})
        words = sorted(w.strip() for w in out.splitlines() if w.strip())
        typed = line.rsplit(" ", 1)[-1]
        # On an empty word argcomplete offers the flags too (-h, --help): compare the rest.
        return words if typed.startswith("-") else [w for w in words if not w.startswith("-")]

    assert complete("kube-audit no") == ["node"]
    assert complete("kube-audit node ") == ["apply", "plan", "rollback", "uninstall"]
    assert complete("kube-audit render --o") == ["--only", "--out"]
    assert complete("kube-audit completion ") == ["bash", "zsh"]


def test_zsh_completion_script(installed: Path) -> None:
    script = _run("kube-audit", "completion", "zsh", env=_env(installed))
    assert script.startswith("#compdef kube-audit")
    if shutil.which("zsh"):
        _run("zsh", "-n", "-c", script)


def test_crds_pipe_into_kubectl(installed: Path) -> None:
    """`kube-audit crds | kubectl apply -f -`: with no cluster here, the stream is parsed as
    kubectl would read it (kubectl apply's server dry run is in the control-plane tier)."""
    out = _run("kube-audit", "crds", env=_env(installed))
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("CustomResourceDefinition", "auditusers.kube-audit.io"),
        ("CustomResourceDefinition", "auditpolicies.kube-audit.io"),
    ]
