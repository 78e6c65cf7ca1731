"""Applying to a host root: what is written where, and what is never touched."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from kube_audit import hostfs
from kube_audit.agent.apply import apply_node, plan_node
from kube_audit.agent.layout import HostLayout
from kube_audit.agent.records import read_state
from kube_audit.agent.rollback import rollback_node
from kube_audit.agent.uninstall import uninstall_node
from kube_audit.core.manifest import config_hash_of, flag_value, parse_manifest, render_manifest
from kube_audit.core.settings import Settings
from kube_audit.core.tokens import parse_token_file
from kube_audit.errors import HostError, ManifestError, NodeConfigError
from tests.agent.conftest import OTHER_PODS, desired, make_host, snapshot
from tests.conftest import kubeadm_manifest_text


@pytest.mark.parametrize("static_pod_path", [None, "/srv/kubelet/static-pods"])
def test_apply_patches_manifest_and_writes_files(
    tmp_path: Path, kubeadm_version: str, static_pod_path: str | None
) -> None:
    root = make_host(tmp_path / "host", kubeadm_version, static_pod_path)
    layout = HostLayout.discover(root, Settings())
    pods = layout.static_pod_dir
    assert pods == root / (static_pod_path or "/etc/kubernetes/manifests").lstrip("/")
    others = {name: (pods / name).read_bytes() for name in OTHER_PODS}
    want = desired("alice", "bob")

    result = apply_node(layout, want, None)

    assert result.outcome == "applied" and result.restarted
    manifest = parse_manifest(layout.manifest.read_text())
    assert config_hash_of(manifest) == want.config_hash
    token_path = flag_value(manifest, "--token-auth-file")
    assert token_path is not None
    token_file = layout.host(token_path)
    assert token_file.read_bytes() == want.files["tokens.csv"]
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert [r.username for r in parse_token_file(token_file.read_bytes())] == ["alice", "bob"]
    assert layout.host(flag_value(manifest, "--audit-policy-file") or "").is_file()
    assert layout.log_dir.is_dir()
    assert stat.S_IMODE(layout.manifest.stat().st_mode) == 0o600
    assert sorted(p.name for p in pods.iterdir()) == sorted([*OTHER_PODS, "kube-apiserver.yaml"])
    assert {name: (pods / name).read_bytes() for name in OTHER_PODS} == others
    (backup,) = list(layout.backups.iterdir())
    assert backup.name == "000001-unpatched"
    assert (backup / "kube-apiserver.yaml").read_text() == kubeadm_manifest_text(kubeadm_version)
    assert read_state(layout)["lastGood"] == want.config_hash


def test_unchanged_state_writes_nothing(layout: HostLayout) -> None:
    apply_node(layout, desired("alice"), None)
    before = layout.manifest.stat()
    files_before = snapshot(layout.root)
    result = apply_node(layout, desired("alice"), None)
    after = layout.manifest.stat()
    assert result.outcome == "unchanged" and not result.restarted
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert snapshot(layout.root) == files_before


def test_changed_token_switches_content_folder_and_collects_old_ones(layout: HostLayout) -> None:
    apply_node(layout, desired("alice"), None)
    for marker in ("-2", "-3", "-4"):
        apply_node(layout, desired("alice", marker=marker), None)
    current = parse_manifest(layout.manifest.read_text())
    subdir = Path(flag_value(current, "--token-auth-file") or "").parent.name
    kept = {p.name for p in layout.config_dir.iterdir()}
    backups = {b.name.split("-", 1)[1] for b in layout.backups.iterdir()}
    assert subdir in kept
    assert kept <= backups | {subdir}, "only folders a manifest or backup refers to remain"


def test_backups_keep_the_last_ten_and_the_original(layout: HostLayout) -> None:
    original = layout.manifest.read_bytes()
    for i in range(14):
        apply_node(layout, desired("alice", marker=f"-{i}"), None)
    names = sorted(p.name for p in layout.backups.iterdir())
    assert len(names) == 11
    assert names[0] == "000001-unpatched", "the manifest before kube-audit is never pruned"
    assert (layout.backups / names[0] / "kube-apiserver.yaml").read_bytes() == original
    assert names[1].startswith("000005-") and names[-1].startswith("000014-")


def test_drift_is_repaired(layout: HostLayout) -> None:
    want = desired("alice")
    apply_node(layout, want, None)
    layout.manifest.write_text(kubeadm_manifest_text("v1.31"))
    result = apply_node(layout, want, None)
    assert result.outcome == "applied"
    assert config_hash_of(parse_manifest(layout.manifest.read_text())) == want.config_hash


def test_deleted_content_folder_is_restored_without_restart(layout: HostLayout) -> None:
    want = desired("alice")
    apply_node(layout, want, None)
    before = layout.manifest.stat().st_mtime_ns
    for folder in layout.config_dir.iterdir():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    result = apply_node(layout, want, None)
    assert result.outcome == "applied" and not result.restarted
    assert layout.manifest.stat().st_mtime_ns == before
    token = flag_value(parse_manifest(layout.manifest.read_text()), "--token-auth-file") or ""
    assert layout.host(token).read_bytes() == want.files["tokens.csv"]


def test_no_policy_means_no_audit_flags(layout: HostLayout) -> None:
    apply_node(layout, desired("alice", policy=False), None)
    manifest = parse_manifest(layout.manifest.read_text())
    assert flag_value(manifest, "--token-auth-file")
    assert flag_value(manifest, "--audit-policy-file") is None


def test_no_objects_returns_to_kubeadm_manifest(layout: HostLayout) -> None:
    apply_node(layout, desired("alice"), None)
    apply_node(layout, desired(policy=False), None)
    assert layout.manifest.read_text() == kubeadm_manifest_text("v1.31")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("apiVersion: v1\nkind: Pod\nspec: [unclosed\n", "not valid YAML"),
        ("apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - name: etcd\n", "no container named"),
    ],
)
def test_bad_manifest_refused_and_untouched(layout: HostLayout, text: str, fragment: str) -> None:
    layout.manifest.write_text(text)
    with pytest.raises(ManifestError, match=fragment):
        apply_node(layout, desired("alice"), None)
    assert layout.manifest.read_text() == text
    assert not layout.config_dir.exists()


def test_foreign_token_file_refused_and_untouched(layout: HostLayout) -> None:
    text = layout.manifest.read_text().replace(
        "    - --tls-private-key-file",
        "    - --token-auth-file=/etc/kubernetes/tokens.csv\n    - --tls-private-key-file",
    )
    layout.manifest.write_text(text)
    with pytest.raises(ManifestError, match="does not own"):
        apply_node(layout, desired("alice"), None)
    assert layout.manifest.read_text() == text


def test_missing_static_pod_folder(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    layout = HostLayout.discover(root, Settings())
    with pytest.raises(HostError, match=r"static pod folder .* does not exist"):
        apply_node(layout, desired("alice"), None)


def test_plan_shows_fingerprints_never_tokens(layout: HostLayout) -> None:
    text = plan_node(layout, desired("alice"))
    assert "+    - --token-auth-file=/etc/kubernetes/kube-audit/" in text
    assert "sha256:" in text and "alice" in text
    assert "tok-alice" not in text
    apply_node(layout, desired("alice"), None)
    assert plan_node(layout, desired("alice")) == ""


def test_rollback_and_uninstall(layout: HostLayout) -> None:
    original = layout.manifest.read_text()
    first, second = desired("alice"), desired("alice", "bob")
    apply_node(layout, first, None)
    apply_node(layout, second, None)
    result = rollback_node(layout, None)
    assert result.outcome == "rolled-back"
    assert config_hash_of(parse_manifest(layout.manifest.read_text())) == first.config_hash
    (layout.log_dir / "audit.log").write_text('{"kind":"Event"}\n')
    result = uninstall_node(layout, None)
    assert result.outcome == "uninstalled"
    assert layout.manifest.read_text() == original
    assert not layout.config_dir.exists()
    assert (layout.log_dir / "audit.log").exists(), "audit logs are kept"
    assert uninstall_node(layout, None).restarted is False


def test_rollback_without_backup(layout: HostLayout) -> None:
    with pytest.raises(HostError, match="no earlier good backup"):
        rollback_node(layout, None)


def test_state_file_is_json(layout: HostLayout) -> None:
    apply_node(layout, desired("alice"), None, now=lambda: "2026-01-01T00:00:00Z")
    state = json.loads(layout.state_file.read_text())
    assert state["lastApplied"] == "2026-01-01T00:00:00Z" and state["pending"] is None


def test_a_rootless_apiserver_can_read_its_files(layout: HostLayout) -> None:
    """kubeadm's RootlessControlPlane runs kube-apiserver as a non-root user: the token file,
    the policy and the log folder are given to that user, or it cannot start."""
    manifest = parse_manifest(layout.manifest.read_text())
    manifest["spec"]["securityContext"].update(runAsUser=2000, runAsGroup=2001)
    layout.manifest.write_text(render_manifest(manifest))
    want = desired("alice")
    apply_node(layout, want, None)
    path = flag_value(parse_manifest(layout.manifest.read_text()), "--token-auth-file")
    assert path is not None
    for owned in (layout.host(path), layout.host(path).parent, layout.config_dir, layout.log_dir):
        info = owned.stat()
        assert (info.st_uid, info.st_gid) == (2000, 2001), owned


def test_a_rootless_apiserver_is_refused_where_files_cannot_be_given(
    layout: HostLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DaemonSet's container has no CAP_CHOWN: it says so before writing anything, rather
    than writing the files and failing on the chown (it did, on every reconcile)."""
    manifest = parse_manifest(layout.manifest.read_text())
    manifest["spec"]["securityContext"].update(runAsUser=2000, runAsGroup=2001)
    layout.manifest.write_text(render_manifest(manifest))
    before = layout.manifest.read_bytes()
    monkeypatch.setattr(hostfs, "can_give_files", lambda: False)
    with pytest.raises(NodeConfigError) as refused:
        apply_node(layout, desired("alice"), None)
    assert "runs as uid 2000, gid 2001" in str(refused.value)
    assert "CAP_CHOWN" in str(refused.value) and "nothing was changed" in str(refused.value)
    assert layout.manifest.read_bytes() == before
    assert not layout.config_dir.exists() and not layout.backups.exists()


def test_this_process_may_give_files_as_root_with_its_capabilities() -> None:
    """Read from /proc/self/status: the tests run as root with CAP_CHOWN (the real pod's
    answer, False, is checked in tests/realnode)."""
    status = Path("/proc/self/status").read_text()
    effective = int(next(x for x in status.splitlines() if x.startswith("CapEff:")).split()[1], 16)
    assert hostfs.can_give_files() == bool(effective & 1)
