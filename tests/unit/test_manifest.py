from __future__ import annotations

import copy
import json

import pytest

from kube_audit.core.manifest import (
    CONFIG_VOLUME,
    FLAGS_ANNOTATION,
    HASH_ANNOTATION,
    LOG_VOLUME,
    ManifestConfig,
    apiserver_container,
    flag_value,
    parse_manifest,
    patch_manifest,
    render_manifest,
    unpatch_manifest,
)
from kube_audit.errors import ManifestError
from tests.conftest import kubeadm_manifest_text

FULL = ManifestConfig(
    config_dir="/etc/kubernetes/kube-audit",
    log_dir="/var/log/kubernetes/audit",
    config_hash="abc123",
    token_file="/etc/kubernetes/kube-audit/abc/tokens.csv",
    policy_file="/etc/kubernetes/kube-audit/abc/audit-policy.yaml",
    log_path="/var/log/kubernetes/audit/audit.log",
    log_maxage=7,
    log_maxbackup=5,
    log_maxsize=50,
)
TOKENS_ONLY = ManifestConfig(
    config_dir=FULL.config_dir,
    log_dir=FULL.log_dir,
    config_hash="def456",
    token_file="/etc/kubernetes/kube-audit/def/tokens.csv",
)


def test_patch_sets_flags_mounts_and_hash(kubeadm_version: str) -> None:
    original = parse_manifest(kubeadm_manifest_text(kubeadm_version))
    patched = patch_manifest(original, FULL)
    assert flag_value(patched, "--token-auth-file") == FULL.token_file
    assert flag_value(patched, "--audit-policy-file") == FULL.policy_file
    assert flag_value(patched, "--audit-log-path") == FULL.log_path
    assert flag_value(patched, "--audit-log-format") == "json"
    assert flag_value(patched, "--audit-log-maxage") == "7"
    assert flag_value(patched, "--audit-log-maxbackup") == "5"
    assert flag_value(patched, "--audit-log-maxsize") == "50"
    container = apiserver_container(patched)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts[CONFIG_VOLUME] == {
        "mountPath": FULL.config_dir,
        "name": CONFIG_VOLUME,
        "readOnly": True,
    }
    assert mounts[LOG_VOLUME]["readOnly"] is False
    volumes = {v["name"]: v for v in patched["spec"]["volumes"]}
    assert volumes[CONFIG_VOLUME]["hostPath"] == {
        "path": FULL.config_dir,
        "type": "DirectoryOrCreate",
    }
    assert volumes[LOG_VOLUME]["hostPath"]["path"] == FULL.log_dir
    assert patched["metadata"]["annotations"][HASH_ANNOTATION] == "abc123"
    assert original == parse_manifest(kubeadm_manifest_text(kubeadm_version)), "input not mutated"


def test_patch_keeps_everything_else(kubeadm_version: str) -> None:
    original = parse_manifest(kubeadm_manifest_text(kubeadm_version))
    patched = patch_manifest(original, FULL)
    old_cmd = apiserver_container(original)["command"]
    new_cmd = apiserver_container(patched)["command"]
    assert new_cmd[: len(old_cmd)] == old_cmd
    assert (
        patched["spec"]["volumes"][: len(original["spec"]["volumes"])]
        == original["spec"]["volumes"]
    )
    for key in ("image", "livenessProbe", "resources"):
        assert apiserver_container(patched)[key] == apiserver_container(original)[key]
    assert patched["spec"]["hostNetwork"] is True
    assert patched["metadata"]["labels"] == original["metadata"]["labels"]


def test_idempotent_and_reversible(kubeadm_version: str) -> None:
    original = parse_manifest(kubeadm_manifest_text(kubeadm_version))
    once = patch_manifest(original, FULL)
    assert patch_manifest(once, FULL) == once
    assert unpatch_manifest(once) == original
    assert unpatch_manifest(original) == original
    switched = patch_manifest(once, TOKENS_ONLY)
    assert flag_value(switched, "--audit-policy-file") is None
    assert LOG_VOLUME not in {v["name"] for v in switched["spec"]["volumes"]}
    assert unpatch_manifest(switched) == original


def test_render_round_trip_is_byte_identical_for_kubeadm_text(kubeadm_version: str) -> None:
    text = kubeadm_manifest_text(kubeadm_version)
    patched_text = render_manifest(patch_manifest(parse_manifest(text), FULL))
    assert render_manifest(unpatch_manifest(parse_manifest(patched_text))) == text


def test_nothing_to_manage_returns_unpatched(kubeadm_version: str) -> None:
    original = parse_manifest(kubeadm_manifest_text(kubeadm_version))
    empty = ManifestConfig(config_dir=FULL.config_dir, log_dir=FULL.log_dir, config_hash="")
    assert patch_manifest(patch_manifest(original, FULL), empty) == original


def test_existing_rotation_flag_is_replaced_and_restored() -> None:
    original = parse_manifest(kubeadm_manifest_text("v1.31"))
    apiserver_container(original)["command"].insert(3, "--audit-log-maxage=99")
    patched = patch_manifest(original, FULL)
    cmd = apiserver_container(patched)["command"]
    assert cmd[3] == "--audit-log-maxage=7"
    assert cmd.count("--audit-log-maxage=7") == 1
    assert (
        json.loads(patched["metadata"]["annotations"][FLAGS_ANNOTATION])["--audit-log-maxage"]
        == "--audit-log-maxage=99"
    )
    assert unpatch_manifest(patched) == original


@pytest.mark.parametrize(
    "foreign",
    [
        "--token-auth-file=/etc/kubernetes/tokens.csv",
        "--audit-policy-file=/etc/kubernetes/audit-policy.yaml",
        "--audit-log-path=/var/log/kubernetes/audit.log",
    ],
)
def test_refuses_to_take_over_a_foreign_file(foreign: str) -> None:
    original = parse_manifest(kubeadm_manifest_text("v1.31"))
    apiserver_container(original)["command"].append(foreign)
    before = copy.deepcopy(original)
    with pytest.raises(ManifestError, match="does not own"):
        patch_manifest(original, FULL)
    assert original == before


def test_refuses_split_form_flag() -> None:
    original = parse_manifest(kubeadm_manifest_text("v1.31"))
    apiserver_container(original)["command"] += ["--token-auth-file", "/x.csv"]
    with pytest.raises(ManifestError, match="separate argument"):
        patch_manifest(original, FULL)


def test_refuses_volume_name_collision() -> None:
    original = parse_manifest(kubeadm_manifest_text("v1.31"))
    original["spec"]["volumes"].append({"name": CONFIG_VOLUME, "emptyDir": {}})
    with pytest.raises(ManifestError, match="already has a volume"):
        patch_manifest(original, FULL)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a: [unclosed", "not valid YAML"),
        ("- just a list", "not a Pod"),
        (
            "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - name: etcd\n",
            "no container named 'kube-apiserver'",
        ),
    ],
)
def test_parse_refuses_what_is_not_an_apiserver_pod(text: str, fragment: str) -> None:
    with pytest.raises(ManifestError, match=fragment):
        parse_manifest(text)


def test_args_only_container_gets_flags_in_args() -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kube-apiserver"},
        "spec": {"containers": [{"name": "kube-apiserver", "args": ["--secure-port=6443"]}]},
    }
    patched = patch_manifest(pod, TOKENS_ONLY)
    assert (
        patched["spec"]["containers"][0]["args"][-1]
        == f"--token-auth-file={TOKENS_ONLY.token_file}"
    )
    assert unpatch_manifest(patched) == pod


@pytest.mark.parametrize(
    "twice",
    [
        ["--audit-log-format=legacy", "--audit-log-format=json"],
        ["--audit-log-maxage=7", "--audit-log-maxage=8"],
    ],
)
def test_refuses_a_managed_flag_given_twice(twice: list[str]) -> None:
    """pflag keeps the last value: replacing only the first would leave the other in force."""
    original = parse_manifest(kubeadm_manifest_text("v1.31"))
    apiserver_container(original)["command"] += twice
    with pytest.raises(ManifestError, match="2 times"):
        patch_manifest(original, FULL)


def test_refuses_to_switch_on_a_foreign_webhook_backend() -> None:
    original = parse_manifest(kubeadm_manifest_text("v1.31"))
    apiserver_container(original)["command"].append("--audit-webhook-config-file=/etc/wh.yaml")
    with pytest.raises(ManifestError, match="audit backend kube-audit does not own"):
        patch_manifest(original, FULL)
    assert patch_manifest(original, ManifestConfig(**{**FULL.__dict__, "policy_file": None}))


def test_document_separators_are_accepted_and_extra_documents_refused() -> None:
    text = kubeadm_manifest_text("v1.31")
    assert parse_manifest("---\n" + text + "---\n") == parse_manifest(text)
    with pytest.raises(ManifestError, match="2 YAML documents"):
        parse_manifest(text + "---\nkind: ConfigMap\n")
