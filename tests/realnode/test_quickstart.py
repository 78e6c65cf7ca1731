"""docs/quickstart.md as a new user runs it, on the real node: every ``sh`` block of the page, in
order, as written, with three substitutions for what this machine cannot fetch (each must be
found on the page, so none can go stale unnoticed):

- ``pipx install kube-audit-operator==X``: the CLI is the one built here, whose version the page
  must name;
- the release's ``install.yaml``: ``kubectl apply -k`` of deploy/ naming the image built here
  (tests/unit/test_release.py proves install.yaml is deploy/ with the image by digest);
- the examples at the release's tag on GitHub: this checkout's examples/.

In the tier's order this runs after the uninstall test, on a node given back to kubeadm: a
first install."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

from kube_audit import __version__
from tests.controlplane.cluster import KUBE_AUDIT, ROOT, wait_for
from tests.realnode.cluster import Real

PAGE = ROOT / "docs/quickstart.md"
RELEASE = "https://github.com/kube-audit/kube-audit-operator/releases/download"
EXAMPLES = "https://raw.githubusercontent.com/kube-audit/kube-audit-operator"
CONFIG_HASH = re.compile(rb"kube-audit\.io/config-hash:\s*['\"]?([0-9a-f]+)")


def page_blocks(text: str) -> list[str]:
    """The page's ``sh`` code blocks, in order."""
    return re.findall(r"^```sh\n(.*?)^```$", text, flags=re.M | re.S)


def localized(block: str, overlay: Path) -> tuple[str, set[str]]:
    """The block with the three substitutions, and which of them it used."""
    used: set[str] = set()
    pin = re.compile(r"^pipx install kube-audit-operator==(\S+).*$", re.M)
    for version in pin.findall(block):
        assert version == __version__, f"the quickstart installs {version}, not {__version__}"
        used.add("cli")
    block = pin.sub(":", block)
    install = re.compile(
        rf"kubectl apply -f {re.escape(RELEASE)}/v{re.escape(__version__)}/install\.yaml"
    )
    if install.search(block):
        used.add("install")
        block = install.sub(f"kubectl apply -k {overlay}", block)
    examples = f"{EXAMPLES}/v{__version__}/examples"
    if examples in block:
        used.add("examples")
        block = block.replace(examples, str(ROOT / "examples"))
    assert RELEASE not in block and EXAMPLES not in block, f"a URL of another version:\n{block}"
    return block, used


class ManifestChanges(threading.Thread):
    """The config hashes the node's kube-apiserver manifest names, in order: each change is one
    restart. Read from the node's disk, so an apiserver that is down does not hide one."""

    def __init__(self, manifest: Path) -> None:
        super().__init__(daemon=True)
        self.manifest = manifest
        self.hashes: list[bytes | None] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            found = CONFIG_HASH.search(self.manifest.read_bytes())
            value = found.group(1) if found else None
            if not self.hashes or self.hashes[-1] != value:
                self.hashes.append(value)
            self.done.wait(0.2)


def _found(env: dict[str, str]) -> bool:
    asked = subprocess.run(
        ["kube-audit", "who", "--cluster", "--user", "alice", "--resource", "configmaps",
         "--name", "hello", "--since", "15m", "-o", "json"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return asked.returncode == 0 and '"hello"' in asked.stdout


def test_the_quickstart_as_written(real: Real, tmp_path: Path) -> None:
    blocks = page_blocks(PAGE.read_text())
    assert len(blocks) >= 5, "the quickstart lost its steps"
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    path = [str(KUBE_AUDIT.parent), str(Path(kubectl).parent), os.environ.get("PATH", "")]
    env = {
        **os.environ,
        "PATH": os.pathsep.join(path),
        "KUBECONFIG": str(real.node.admin_kubeconfig),
        "HOME": str(tmp_path),
    }
    env.pop("VIRTUAL_ENV", None)
    manifest = ManifestChanges(real.node.manifest)
    manifest.start()
    used: set[str] = set()
    outputs: list[str] = []
    timings: list[float] = []
    try:
        for block in blocks:
            script, found = localized(block, real.overlay)
            used |= found
            if "kube-audit who" in script:
                # The page asks right after alice's command. kube-apiserver has logged it by
                # then; the audit store (when the install names one, as here) has it a second
                # or two later. Wait until who --cluster, asking where the page's command asks,
                # finds it, then run the page's block once, as written.
                wait_for("alice's configmap found by who --cluster", lambda: _found(env), 60, 1)
            started = time.monotonic()
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=1200,
                check=False,
            )
            timings.append(time.monotonic() - started)
            assert result.returncode == 0, (
                f"quickstart block failed ({result.returncode}):\n{block}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
            outputs.append(result.stdout)
    finally:
        manifest.done.set()
        manifest.join(5)
    assert used == {"cli", "install", "examples"}, f"substitutions found on the page: {used}"

    text = "\n".join(outputs)
    assert f"kube-audit {__version__} " in text
    whoami = next(o for o, b in zip(outputs, blocks, strict=True) if "auth whoami" in b)
    assert "alice" in whoami and "alice@example.com" in whoami and "developer" in whoami, whoami
    answers = [o for o, b in zip(outputs, blocks, strict=True) if "kube-audit who" in b]
    assert len(answers) == 2, "the admin's question and bob's"
    for answer in answers:
        assert "alice" in answer and "team-a/hello" in answer, answer
    restarts = len(manifest.hashes) - 1
    assert restarts == 1, f"the page promises one restart per node: {manifest.hashes}"
    people = next(t for t, b in zip(timings, blocks, strict=True) if "auditusers.yaml" in b)
    print(f"quickstart: policy, people and RBAC applied -> all Ready: {people:.0f} s, "
          f"{restarts} kube-apiserver restart; whole page {sum(timings):.0f} s")  # fmt: skip
