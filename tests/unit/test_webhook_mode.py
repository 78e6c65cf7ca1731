"""Webhook mode in the pure core: the manifest names the webhook, never a token file; an identity
change leaves the content hash (so the manifest, so the apiserver) as it was."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from kube_audit.cli import build_parser
from kube_audit.cli.common import settings_from_args
from kube_audit.core.identities import parse_identity_snapshot, render_webhook_kubeconfig
from kube_audit.core.manifest import flag_value, parse_manifest, patch_manifest, unpatch_manifest
from kube_audit.core.plan import (
    POLICY_FILE,
    TOKEN_FILE,
    DesiredState,
    collect_inputs,
    plan_desired,
    plan_manifest,
)
from kube_audit.core.settings import Settings
from kube_audit.errors import ManifestError
from tests.conftest import audit_policy, audit_user, kubeadm_manifest_text, long_token, token_secret

WEBHOOK = Settings(identity_mode="webhook")


def _desired(
    settings: Settings, *names: str, policy: bool = True, groups: str = "dev"
) -> DesiredState:
    objs: list[Any] = []
    for name in names:
        objs += [
            audit_user(name, groups=[groups]),
            token_secret(f"audituser-{name}", long_token(f"tok-{name}")),
        ]
    if policy:
        objs.append(audit_policy("all", rules=[{"level": "Metadata"}]))
    return plan_desired(collect_inputs([(f"t#{i}", o) for i, o in enumerate(objs)]), settings)


def _manifest() -> dict[str, Any]:
    return parse_manifest(kubeadm_manifest_text("v1.31"))


def test_webhook_mode_names_the_webhook_and_no_token_file() -> None:
    desired = _desired(WEBHOOK, "alice", "bob")
    assert TOKEN_FILE not in desired.files and POLICY_FILE in desired.files
    patched = plan_manifest(_manifest(), desired)
    assert flag_value(patched, "--token-auth-file") is None
    assert (
        flag_value(patched, "--authentication-token-webhook-config-file")
        == "/etc/kubernetes/kube-audit/authn-webhook.kubeconfig"
    )
    assert flag_value(patched, "--authentication-token-webhook-version") == "v1"
    assert flag_value(patched, "--authentication-token-webhook-cache-ttl") == "10s"
    assert unpatch_manifest(patched) == _manifest()
    people = parse_identity_snapshot(desired.identities)
    assert sorted(i.username for i in people.values()) == ["alice", "bob"]


def test_an_identity_change_keeps_the_content_hash_in_webhook_mode() -> None:
    """A person added, removed or given other groups: the same hash, the same manifest, no
    restart; only the snapshot differs. In token-file mode each is a new hash."""
    base = _desired(WEBHOOK, "alice")
    for changed in (
        _desired(WEBHOOK, "alice", "bob"),
        _desired(WEBHOOK),
        _desired(WEBHOOK, "alice", groups="ops"),
    ):
        assert changed.config_hash == base.config_hash
        assert plan_manifest(_manifest(), changed) == plan_manifest(_manifest(), base)
        assert changed.identities != base.identities
    token_file = Settings()
    assert _desired(token_file, "alice").config_hash != _desired(token_file, "bob").config_hash


def test_webhook_mode_is_managed_with_nobody_and_no_policy() -> None:
    """The flags are set with no objects at all: the first person needs no restart."""
    empty = _desired(WEBHOOK, policy=False)
    assert empty.files == {} and empty.config_hash
    patched = plan_manifest(_manifest(), empty)
    assert flag_value(patched, "--authentication-token-webhook-config-file")
    assert flag_value(patched, "--audit-policy-file") is None
    assert _desired(Settings(), policy=False).config_hash == ""


def test_mode_and_ttl_are_part_of_the_content_hash() -> None:
    token_file = _desired(Settings(), "alice")
    webhook = _desired(WEBHOOK, "alice")
    slower = _desired(replace(WEBHOOK, webhook_cache_ttl="30s"), "alice")
    assert len({token_file.config_hash, webhook.config_hash, slower.config_hash}) == 3
    patched = plan_manifest(_manifest(), slower)
    assert flag_value(patched, "--authentication-token-webhook-cache-ttl") == "30s"


def test_a_webhook_kube_audit_does_not_own_is_refused() -> None:
    manifest = _manifest()
    command = manifest["spec"]["containers"][0]["command"]
    command.append("--authentication-token-webhook-config-file=/etc/guard/webhook.yaml")
    with pytest.raises(ManifestError, match="a file kube-audit does not own"):
        patch_manifest(manifest, _desired(WEBHOOK, "alice").manifest_config())


def test_the_webhook_kubeconfig_trusts_only_our_ca() -> None:
    text = render_webhook_kubeconfig(b"CA-PEM", 6441, "/pki/client.crt", "/pki/client.key")
    config = json.loads(text)
    cluster = config["clusters"][0]["cluster"]
    assert cluster["server"] == "https://127.0.0.1:6441/authenticate"
    assert cluster["certificate-authority-data"] == "Q0EtUEVN"
    assert config["users"][0]["user"] == {
        "client-certificate": "/pki/client.crt",
        "client-key": "/pki/client.key",
    }
    assert "insecure-skip-tls-verify" not in cluster


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, ("token-file", "10s")),
        (["--identity-mode", "webhook", "--webhook-cache-ttl", "1m30s"], {}, ("webhook", "1m30s")),
        ([], {"KUBE_AUDIT_IDENTITY_MODE": "webhook", "KUBE_AUDIT_WEBHOOK_CACHE_TTL": "5s"},
         ("webhook", "5s")),
    ],
)  # fmt: skip
def test_operator_identity_flags(
    argv: list[str], env: dict[str, str], expected: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["operator", "--node-name", "n1", *argv])
    settings = settings_from_args(args)
    assert (settings.identity_mode, settings.webhook_cache_ttl) == expected


@pytest.mark.parametrize(
    ("env", "argv", "said"),
    [
        ({"KUBE_AUDIT_IDENTITY_MODE": "webhooks"}, [], "'webhooks' is not an identity mode"),
        ({}, ["--webhook-cache-ttl", "10"], "'10' is not a Go duration"),
        ({"KUBE_AUDIT_WEBHOOK_CACHE_TTL": "ten seconds"}, [], "not a Go duration"),
    ],
)
def test_a_bad_identity_setting_is_named(
    env: dict[str, str],
    argv: list[str],
    said: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["operator", "--node-name", "n1", *argv])
    assert exit_.value.code == 2
    assert said in capsys.readouterr().err
