"""``kube-audit render``: validates everything, writes both files or nothing."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from kube_audit.cli import main
from kube_audit.core.tokens import parse_token_file
from tests.conftest import audit_policy, audit_user, long_token, token_secret

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, *objs: object) -> Path:
    path.write_text(yaml.safe_dump_all(objs))
    return path


def test_renders_the_examples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "render",
            "-f",
            str(REPO / "examples"),
            "-f",
            str(REPO / "examples/demo"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    tokens = out / "tokens.csv"
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    records = parse_token_file(tokens.read_bytes())
    assert [r.username for r in records] == ["alice", "bob", "ci:deployer"]
    assert yaml.safe_load((out / "audit-policy.yaml").read_text())["kind"] == "Policy"
    printed = capsys.readouterr()
    assert "demo-alice" not in printed.out + printed.err, "tokens are never printed"


def test_invalid_input_lists_every_error_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _write(
        tmp_path / "in.yaml",
        audit_user("bob", groups=["system:masters"]),
        audit_user("carol"),
        audit_policy("p", rules=[{"level": "Metadata", "nonResourceURLs": ["healthz"]}]),
        token_secret("audituser-bob", long_token("secret-bob-token")),
    )
    out = tmp_path / "out"
    code = main(["render", "-f", str(src), "--out", str(out)])
    assert code == 1
    assert not out.exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "AuditUser/bob: spec.groups[0]:" in err
    assert "AuditUser/carol: spec: Secret kube-audit/audituser-carol does not exist" in err
    assert "AuditPolicy/p: spec.rules[0].nonResourceURLs[0]:" in err
    assert "secret-bob-token" not in err


def test_bad_yaml_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [oops")
    assert (
        main(
            [
                "render",
                "-f",
                str(bad),
                "-f",
                str(tmp_path / "nope.yaml"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "bad.yaml: not valid YAML" in err and "nope.yaml: no such file" in err


def test_without_policy_writes_only_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _write(
        tmp_path / "in.yaml", audit_user("a"), token_secret("audituser-a", long_token("t"))
    )
    assert main(["render", "-f", str(src), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o/tokens.csv").read_bytes() == long_token("t").encode() + b",a,a\n"
    assert not (tmp_path / "o/audit-policy.yaml").exists()
    assert "0 rules would stop" in capsys.readouterr().out


def test_allow_system_group_flag(tmp_path: Path) -> None:
    src = _write(
        tmp_path / "in.yaml",
        audit_user("m", groups=["system:monitoring"]),
        token_secret("audituser-m", long_token("t")),
    )
    assert main(["render", "-f", str(src), "--out", str(tmp_path / "o")]) == 1
    assert (
        main(
            [
                "render",
                "-f",
                str(src),
                "--out",
                str(tmp_path / "o"),
                "--allow-system-group",
                "system:monitoring",
            ]
        )
        == 0
    )


def test_negative_rotation_setting_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kube-apiserver refuses to start with a negative --audit-log-maxage: never write one."""
    host = tmp_path / "host"
    code = main(
        [
            "node",
            "plan",
            "--host-root",
            str(host),
            "-f",
            str(REPO / "examples"),
            "--audit-log-maxage",
            "-1",
        ]
    )
    assert code == 2, "node plan: 1 means changes, so an invalid input is 2"
    err = capsys.readouterr().err
    assert "--audit-log-maxage (KUBE_AUDIT_LOG_MAXAGE): -1 is negative" in err
    assert not host.exists()


@pytest.mark.parametrize("command", ["render", "node-apply"])
def test_input_with_nothing_to_manage_is_refused(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty folder, or one with only Secrets, must not wipe every token from the node."""
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "secrets.yaml", token_secret("audituser-a", long_token("t")))
    host = tmp_path / "host"
    if command == "render":
        argv = ["render", "-f", str(folder), "--out", str(tmp_path / "o")]
    else:
        argv = ["node", "apply", "--no-wait", "--host-root", str(host), "-f", str(folder)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "holds no AuditUser or AuditPolicy" in err and "node uninstall" in err
    assert not (tmp_path / "o").exists() and not host.exists()


@pytest.mark.parametrize("flags", [[], ["--out", "-"]])
def test_crds_go_to_stdout_for_kubectl_apply(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``kube-audit crds | kubectl apply -f -``."""
    assert main(["crds", *flags]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == ["CustomResourceDefinition"] * 2
    assert sorted(d["metadata"]["name"] for d in docs) == [
        "auditpolicies.kube-audit.io",
        "auditusers.kube-audit.io",
    ]


def test_crds_out_that_is_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "crds.yaml"
    target.write_text("mine")
    assert main(["crds", "--out", str(target)]) == 1
    assert "--out: exists and is not a folder" in capsys.readouterr().err
    assert target.read_text() == "mine"
