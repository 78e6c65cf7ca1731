"""``kube-audit node ...``: messages a person can act on, exit codes, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from kube_audit.cli import main
from tests.agent.conftest import REPO, FakeNode, make_host

EXAMPLES = ["-f", str(REPO / "examples"), "-f", str(REPO / "examples/demo")]


def test_plan_apply_unchanged_uninstall(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(make_host(tmp_path / "h"))
    assert main(["node", "plan", "--host-root", root, *EXAMPLES]) == 1, (
        "changes: 1, as kubectl diff"
    )
    out = capsys.readouterr().out
    assert "+    - --token-auth-file=" in out and "demo-alice" not in out
    assert main(["node", "apply", "--host-root", root, "--no-wait", *EXAMPLES]) == 0
    assert "applied config" in capsys.readouterr().out
    assert main(["node", "apply", "--host-root", root, "--no-wait", *EXAMPLES]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert main(["node", "plan", "--host-root", root, *EXAMPLES]) == 0, "no changes: 0"
    assert "no changes" in capsys.readouterr().out
    assert main(["node", "uninstall", "--host-root", root, "--no-wait"]) == 0
    assert "uninstalled" in capsys.readouterr().out


def test_invalid_inputs_exit_1_and_touch_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_host(tmp_path / "h")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: kube-audit.io/v1alpha1\nkind: AuditUser\nmetadata: {name: eve}\n"
        "spec: {groups: [system:masters]}\n"
    )
    before = (root / "etc/kubernetes/manifests/kube-apiserver.yaml").read_bytes()
    assert main(["node", "apply", "--host-root", str(root), "--no-wait", "-f", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "AuditUser/eve: spec.groups[0]" in err and "Traceback" not in err
    assert (root / "etc/kubernetes/manifests/kube-apiserver.yaml").read_bytes() == before
    assert not (root / "var/lib/kube-audit").exists()


def test_broken_manifest_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_host(tmp_path / "h")
    (root / "etc/kubernetes/manifests/kube-apiserver.yaml").write_text("kind: [")
    assert main(["node", "apply", "--host-root", str(root), "--no-wait", *EXAMPLES]) == 3
    assert "not valid YAML" in capsys.readouterr().err


def test_rollback_exit_5_with_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake_node: tuple[FakeNode, str], host: Path
) -> None:
    node, url = fake_node
    node.healthy = lambda manifest: False
    code = main(
        [
            "node",
            "apply",
            "--host-root",
            str(host),
            "--health-url",
            url,
            "--timeout",
            "0.5",
            *EXAMPLES,
        ]
    )
    assert code == 5
    err = capsys.readouterr().err
    assert "never became ready" in err and "restored backup" in err and "Traceback" not in err


def test_missing_host_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "rollback", "--host-root", str(tmp_path / "nope"), "--no-wait"]) == 4
    assert "is not a folder" in capsys.readouterr().err


def test_plan_exits_like_kubectl_diff_on_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1 means changes there, so an invalid input is 2, and other errors keep their codes."""
    root = str(make_host(tmp_path / "h"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: kube-audit.io/v1alpha1\nkind: AuditUser\nmetadata: {name: e}\n"
                   "spec: {groups: [system:masters]}\n")  # fmt: skip
    assert main(["node", "plan", "--host-root", root, "-f", str(bad)]) == 2
    assert "invalid input" in capsys.readouterr().err
    assert main(["node", "plan", "--host-root", str(tmp_path / "none"), *EXAMPLES]) == 4


def test_uninstall_on_a_node_kube_audit_never_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Says so, changes nothing, creates nothing, and names no folder that does not exist."""
    root = make_host(tmp_path / "h")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    manifest = (root / "etc/kubernetes/manifests/kube-apiserver.yaml").read_bytes()
    assert main(["node", "uninstall", "--host-root", str(root), "--no-wait"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("nothing to uninstall: kube-audit never changed this node")
    assert "audit logs kept" not in out and "backups kept" not in out
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert (root / "etc/kubernetes/manifests/kube-apiserver.yaml").read_bytes() == manifest


def test_audit_log_compression_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(make_host(tmp_path / "h"))
    args = ["node", "apply", "--host-root", root, "--no-wait", "--audit-log-compress", *EXAMPLES]
    assert main(args) == 0
    manifest = (Path(root) / "etc/kubernetes/manifests/kube-apiserver.yaml").read_text()
    assert "- --audit-log-compress=true\n" in manifest
    assert main(["node", "uninstall", "--host-root", root, "--no-wait"]) == 0
    assert (
        "--audit-log-compress"
        not in (Path(root) / "etc/kubernetes/manifests/kube-apiserver.yaml").read_text()
    )
