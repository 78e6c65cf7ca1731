"""``kube-audit kubeconfig`` and ``kube-audit status`` against the in-process API."""

from __future__ import annotations

import json
import socket
import stat
from pathlib import Path

import pytest
import yaml

from kube_audit.cli import main
from tests.operator.cluster import ADMIN_TOKEN
from tests.operator.conftest import Harness, eventually
from tests.operator.test_operator import _ready, _records, _token


def _admin_kubeconfig(harness: Harness, tmp_path: Path) -> str:
    path = tmp_path / "admin.kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "admin@test",
                "clusters": [
                    {
                        "name": "test",
                        "cluster": {
                            "server": harness.cluster.url,
                            "certificate-authority-data": "Q0EK",
                        },
                    }
                ],
                "users": [{"name": "admin", "user": {"token": ADMIN_TOKEN}}],
                "contexts": [
                    {"name": "admin@test", "context": {"cluster": "test", "user": "admin"}}
                ],
            }
        )
    )
    return str(path)


def test_kubeconfig_for_a_ready_user(
    harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    harness.add_control_plane("cp-1")
    harness.start("cp-1")
    harness.apply_user("alice", groups=["developer"])
    eventually(lambda: _ready(harness, "auditusers", "alice"))
    admin = _admin_kubeconfig(harness, tmp_path)
    out = tmp_path / "alice.kubeconfig"
    assert (
        main(
            [
                "kubeconfig",
                "alice",
                "--kubeconfig",
                admin,
                "-o",
                str(out),
                "--server",
                "https://api.example:6443",
            ]
        )
        == 0
    )
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    config = yaml.safe_load(out.read_text())
    assert config["current-context"] == "alice@test"
    assert config["clusters"][0]["cluster"] == {
        "server": "https://api.example:6443",
        "certificate-authority-data": "Q0EK",
    }
    assert config["users"] == [{"name": "alice", "user": {"token": _token(harness, "alice")}}]
    assert _token(harness, "alice") not in capsys.readouterr().out


def test_kubeconfig_refuses_disabled_and_unready(
    harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = _admin_kubeconfig(harness, tmp_path)
    harness.apply_user("bob", disabled=True)
    assert main(["kubeconfig", "bob", "--kubeconfig", admin, "-o", str(tmp_path / "b")]) == 1
    assert "AuditUser/bob: spec.disabled: the user is disabled" in capsys.readouterr().err
    harness.apply_user("carol")
    assert main(["kubeconfig", "carol", "--kubeconfig", admin, "-o", str(tmp_path / "c")]) == 1
    assert "AuditUser/carol: status: not Ready" in capsys.readouterr().err
    assert main(["kubeconfig", "nobody", "--kubeconfig", admin]) == 1
    assert "AuditUser/nobody" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_status_table(harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    harness.add_control_plane("cp-1")
    harness.start("cp-1")
    harness.apply_user("alice")
    harness.apply_user("mallory", groups=["system:masters"])
    harness.apply_policy("dev", rules=[{"level": "Metadata"}])
    eventually(
        lambda: _ready(harness, "auditusers", "alice") and _ready(harness, "auditpolicies", "dev")
    )
    eventually(
        lambda: (
            (harness.condition("auditusers", "mallory", "Stalled") or {}).get("status") == "True"
        )
    )
    assert main(["status", "--kubeconfig", _admin_kubeconfig(harness, tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "True" in lines["AuditUser/alice"] and "1/1 (cp-1)" in lines["AuditUser/alice"]
    assert "False" in lines["AuditUser/mallory"] and "system:masters" in lines["AuditUser/mallory"]
    assert "AuditPolicy/dev" in lines
    assert lines["cp-1"].split()[1] != "-", "the node's applied config hash"


def test_kubeconfig_to_stdout_and_never_over_a_file_without_force(
    harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    harness.add_control_plane("cp-1")
    harness.start("cp-1")
    harness.apply_user("alice")
    eventually(lambda: _ready(harness, "auditusers", "alice"))
    admin = _admin_kubeconfig(harness, tmp_path)
    assert main(["kubeconfig", "alice", "--kubeconfig", admin, "-o", "-"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["users"] == [{"name": "alice", "user": {"token": _token(harness, "alice")}}]
    taken = tmp_path / "alice.kubeconfig"
    taken.write_text("mine")
    assert main(["kubeconfig", "alice", "--kubeconfig", admin, "-o", str(taken)]) == 1
    assert "exists" in capsys.readouterr().err and taken.read_text() == "mine"
    assert main(["kubeconfig", "alice", "--kubeconfig", admin, "-o", str(taken), "--force"]) == 0
    assert yaml.safe_load(taken.read_text())["current-context"] == "alice@test"


def test_status_as_json_and_yaml(
    harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    harness.add_control_plane("cp-1")
    harness.start("cp-1")
    harness.apply_user("alice")
    eventually(lambda: _ready(harness, "auditusers", "alice"))
    admin = _admin_kubeconfig(harness, tmp_path)
    assert main(["status", "--kubeconfig", admin, "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["objects"][0]["object"] == "AuditUser/alice"
    assert report["objects"][0]["ready"] == "True"
    assert report["nodes"][0]["node"] == "cp-1" and report["nodes"][0]["outcome"] == "Applied"
    assert main(["status", "--kubeconfig", admin, "-o", "yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == report


def test_cluster_errors_exit_6_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "kubeconfig"
    config.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "gone",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "gone", "context": {"cluster": "c", "user": "u"}}],
            }
        )
    )
    assert main(["status", "--kubeconfig", str(config)]) == 6
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "unreachable" in err and "HTTPConnectionPool" not in err and "Traceback" not in err
    assert main(["status", "--kubeconfig", str(config), "--context", "other"]) == 6
    assert "other" in capsys.readouterr().err


def test_rotate_gives_a_new_token_live_everywhere(
    harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``kube-audit rotate alice --wait``: a new token in her Secret, served by the node, the
    old one gone from it; a token in a Secret of one's own is refused with the field named."""
    harness.add_control_plane("cp-1")
    node = harness.start("cp-1")
    harness.apply_user("alice", groups=["developer"])
    eventually(lambda: _ready(harness, "auditusers", "alice"))
    old = _token(harness, "alice")
    admin = _admin_kubeconfig(harness, tmp_path)
    assert main(["rotate", "alice", "--kubeconfig", admin, "--wait", "--timeout", "60"]) == 0
    out = capsys.readouterr().out
    assert "the new token is live on every control-plane node" in out, out
    assert "kube-audit kubeconfig alice --force" in out
    new = _token(harness, "alice")
    assert new != old and old not in out and new not in out
    served = _records(node)
    assert served["alice"][0] == new
    harness.apply_user("bob", tokenSecretRef={"namespace": "kube-audit", "name": "bobs"})
    assert main(["rotate", "bob", "--kubeconfig", admin]) == 1
    assert "AuditUser/bob: spec.tokenSecretRef: the token is kept in Secret kube-audit/bobs" in (
        capsys.readouterr().err
    )
    assert main(["rotate", "nobody", "--kubeconfig", admin]) == 1
