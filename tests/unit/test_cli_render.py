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
    bad.write_text("kind: AuditUser\n  name: x\n")
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
    assert f"  {bad}:2:7: not valid YAML: mapping values are not allowed" in err, (
        "file, line and column, as a linter says it"
    )
    assert "nope.yaml: no such file" in err
    assert "<unicode string>" not in err and len(err.splitlines()) == 3, "one line per problem"


def test_problems_in_yaml_authors_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No pydantic or Python wording reaches the user."""
    objs = _write(
        tmp_path / "in.yaml",
        audit_policy("p", rules=[]),
        audit_user("u", username=5, groups="dev", disabled="maybe"),
    )
    assert main(["render", "-f", str(objs), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "kube-audit: 4 invalid input(s), nothing written:" in err
    assert "AuditPolicy/p: spec.rules: needs at least 1 item(s), has 0" in err
    assert "AuditUser/u: spec.username: must be a string, not the number 5" in err
    assert "AuditUser/u: spec.groups: must be a list, not the string 'dev'" in err
    assert "AuditUser/u: spec.disabled: must be true or false, not the string 'maybe'" in err
    for pydantic_words in ("Input should", "should have", "after validation", "Value error"):
        assert pydantic_words not in err


def test_read_only_commands_never_say_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    objs = _write(tmp_path / "in.yaml", audit_policy("p", rules=[]))
    root = tmp_path / "host"
    assert main(["node", "plan", "--host-root", str(root), "-f", str(objs)]) == 2
    err = capsys.readouterr().err
    assert "kube-audit: 1 invalid input(s):" in err and "nothing written" not in err


def test_render_prints_one_file_on_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out -`` gives the same bytes ``--out DIR`` writes, one file at a time."""
    policy_only = _write(tmp_path / "p.yaml", audit_policy("p", rules=[{"level": "Metadata"}]))
    assert main(["render", "-f", str(policy_only), "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    assert main(["render", "-f", str(policy_only), "--out", "-"]) == 0
    assert capsys.readouterr().out == (tmp_path / "o/audit-policy.yaml").read_text()

    both = _write(
        tmp_path / "both.yaml",
        audit_user("bob"),
        token_secret("audituser-bob", long_token("b")),
        audit_policy("p", rules=[{"level": "Metadata"}]),
    )
    assert main(["render", "-f", str(both), "--out", "-"]) == 1
    err = capsys.readouterr().err
    assert "--out -: --only: prints one file" in err and "--only tokens or --only policy" in err
    assert main(["render", "-f", str(both), "--out", "-", "--only", "tokens"]) == 0
    out = capsys.readouterr().out
    assert [r.username for r in parse_token_file(out.encode())] == ["bob"]
    assert not out.startswith("wrote"), "only the file's bytes on stdout"


def test_render_only_one_file_into_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    both = _write(
        tmp_path / "both.yaml",
        audit_user("bob"),
        token_secret("audituser-bob", long_token("b")),
        audit_policy("p", rules=[{"level": "Metadata"}]),
    )
    assert main(["render", "-f", str(both), "--out", str(tmp_path / "o"), "--only", "policy"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["audit-policy.yaml"]


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


def test_grant_secrets_prints_one_role_and_binding_per_namespace(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["grant-secrets", "team-a", "vault", "team-a", "--install-namespace", "ops"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [(d["kind"], d["metadata"]["namespace"]) for d in docs] == [
        ("Role", "team-a"), ("RoleBinding", "team-a"), ("Role", "vault"), ("RoleBinding", "vault"),
    ]  # fmt: skip
    assert {s["namespace"] for d in docs[1::2] for s in d["subjects"]} == {"ops"}
    assert main(["grant-secrets", "Team_A"]) == 1
    err = capsys.readouterr().err
    assert "grant-secrets: NAMESPACE: 'Team_A' is not a namespace name (RFC 1123 label)" in err
    assert "Traceback" not in err
    assert main(["grant-secrets", "team-a", "--install-namespace", "Ops"]) == 1
    assert "grant-secrets: --install-namespace: 'Ops' is not" in capsys.readouterr().err
