"""The CLI behaves as kubectl users expect: help without arguments, environment fallbacks
for every operator flag, one clear error (never a traceback) for a malformed variable."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kube_audit.cli import COMMANDS, build_parser, main


def test_no_arguments_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kube-audit") and "operator" in out and "who" in out


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KUBE_AUDIT_TIMEOUT", "3m"),
        ("KUBE_AUDIT_METRICS_PORT", "http"),
        ("KUBE_AUDIT_NO_WAIT", "maybe"),
        ("KUBE_AUDIT_LOG_MAXAGE", "30d"),
    ],
)
def test_a_malformed_variable_is_one_error_naming_it(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(name, value)
    assert main(["--version"]) == 1
    err = capsys.readouterr().err
    assert f"environment: {name}: {value!r} is not" in err and "Traceback" not in err


def test_every_command_imports_only_its_own_module() -> None:
    """A command missing from COMMANDS still works, but imports every module (kopf and the
    Kubernetes client for ``rotate``): each one the full parser knows is mapped, and its own
    module alone defines it."""
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
    for command in COMMANDS:
        (own,) = (a for a in build_parser(command)._actions
                  if isinstance(a, argparse._SubParsersAction))  # fmt: skip
        assert command in own.choices, command


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("yes", True), ("true", True),
                                                 ("TRUE", True), ("0", False), ("no", False)])  # fmt: skip
def test_booleans_as_people_write_them(
    value: str, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBE_AUDIT_NO_WAIT", value)
    args = build_parser().parse_args(["operator"])
    assert args.no_wait is expected


def test_every_operator_flag_falls_back_to_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "NODE_NAME": "cp-9",
        "POD_NAMESPACE": "audit",
        "KUBE_AUDIT_HOST_ROOT": "/host",
        "KUBE_AUDIT_KUBELET_CONFIG": "/etc/kubelet.yaml",
        "KUBE_AUDIT_DEBOUNCE": "7",
        "KUBE_AUDIT_MAX_DEBOUNCE": "70",
        "KUBE_AUDIT_MIN_READY": "30",
        "KUBE_AUDIT_RESYNC": "600",
        "KUBE_AUDIT_TIMEOUT": "240",
        "KUBE_AUDIT_HEALTH_URL": "https://10.0.0.1:6443/readyz",
        "KUBE_AUDIT_NO_WAIT": "yes",
        "KUBE_AUDIT_METRICS_PORT": "9999",
        "KUBE_AUDIT_METRICS_ADDRESS": "10.0.0.1",
        "KUBE_AUDIT_LIVENESS": "http://127.0.0.1:1/healthz",
        "KUBE_AUDIT_READINESS": "http://127.0.0.1:2/readyz",
        "KUBE_AUDIT_LOG_MAXAGE": "7",
        "KUBE_AUDIT_LOG_MAXBACKUP": "3",
        "KUBE_AUDIT_LOG_MAXSIZE": "50",
        "KUBE_AUDIT_ALLOW_SYSTEM_GROUPS": "system:monitoring,system:x",
        "KUBE_AUDIT_ALLOW_SYSTEM_USERS": "system:ci",
        "KUBE_AUDIT_IDENTITY_DEBOUNCE": "0.25",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["operator"])
    assert (args.node_name, args.namespace, args.host_root) == ("cp-9", "audit", "/host")
    assert args.kubelet_config == "/etc/kubelet.yaml"
    assert (args.debounce, args.max_debounce, args.min_ready) == (7, 70, 30)
    assert args.identity_debounce == 0.25
    assert (args.resync, args.timeout) == (600, 240)
    assert args.health_url == "https://10.0.0.1:6443/readyz" and args.no_wait is True
    assert (args.metrics_port, args.metrics_address) == (9999, "10.0.0.1")
    assert args.liveness.endswith(":1/healthz") and args.readiness.endswith(":2/readyz")
    assert (args.audit_log_maxage, args.audit_log_maxbackup, args.audit_log_maxsize) == (7, 3, 50)
    assert args.allow_system_group == ["system:monitoring", "system:x"]
    assert args.allow_system_user == ["system:ci"]


def test_every_operator_flag_names_its_default_and_variable() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    operator = sub.choices["operator"]  # type: ignore[attr-defined]
    for action in operator._actions:
        if action.dest in ("help", "kubeconfig", "context"):
            continue
        assert action.help and "default" in action.help, action.dest
        assert "$" in action.help, f"{action.dest}: no environment variable named"


def test_a_broken_kubeconfig_is_one_line_exit_6(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text("apiVersion: v1\nclusters: [unclosed\n")
    assert main(["status", "--kubeconfig", str(config)]) == 6
    err = capsys.readouterr().err
    assert str(config) in err and "not valid YAML" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_standby_ends_at_once_on_sigterm() -> None:
    """The who container's PID 1: a SIGTERM it ignored would hold the pod for its whole grace
    period (420 s). Sent once the process waits (its blocked-signal mask shows it)."""
    kube_audit = str(Path(sys.executable).parent / "kube-audit")
    process = subprocess.Popen([kube_audit, "standby"])
    try:
        term = 1 << (signal.SIGTERM - 1)
        status = Path(f"/proc/{process.pid}/status")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            blocked = next(
                (int(line.split()[1], 16) for line in status.read_text().splitlines()
                 if line.startswith("SigBlk:")), 0,
            )  # fmt: skip
            if blocked & term:
                break
            assert process.poll() is None, process.returncode
            os.sched_yield()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["who", "--store", "ftp://logs"], "who: --store: 'ftp://logs': give http(s)://HOST:PORT"),
        (["who", "--store", "http://logs:9428", "--store-token-file", "/nonexistent/token"],
         "who: --store-token-file: cannot read /nonexistent/token"),
        (["who", "--store", "http://logs:9428", "--store-token-file", "EMPTY"],
         "who: --store-token-file: EMPTY is empty"),
        (["who", "--store", "http://logs:9428", "--cluster"], "who: --store: asks the store alone"),
        (["ship", "--node", "cp-1"], "ship: --store: required"),
        (["ship", "--store", "http://logs:9428", "--node", "cp-1", "--cluster-name", "a,b"],
         "ship: --cluster-name: 'a,b': no commas"),
        (["ship", "--store", "http://logs:9428", "--node", "cp-1", "--keep-after", "0s"],
         "ship: --keep-after: '0s': must be more than 0"),
        (["ship", "--store", "http://logs:9428", "--node", "cp-1", "--store-user", "u",
          "--store-token-file", "t"], "ship: --store-user: give either"),
    ],
)  # fmt: skip
def test_store_flags_refused_name_the_command_and_flag(
    argv: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    for name in ("KUBE_AUDIT_STORE", "NODE_NAME"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "token"
    empty.write_text("\n")
    argv = [str(empty) if a == "EMPTY" else a for a in argv]
    named = named.replace("EMPTY", str(empty))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
