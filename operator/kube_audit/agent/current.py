"""What a node runs (the manifest and the files it names) and the backups of it: read, written,
restored and collected, each by atomic rename through ``hostfs``."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

from kube_audit import hostfs
from kube_audit.agent.layout import MANIFEST_NAME, HostLayout
from kube_audit.core.manifest import (
    Manifest,
    apiserver_container,
    config_hash_of,
    flag_value,
    parse_manifest,
)
from kube_audit.core.plan import POLICY_FILE, TOKEN_FILE
from kube_audit.errors import HostError, ManifestError

KEEP_BACKUPS = 10
FILE_FLAGS = {"--token-auth-file": TOKEN_FILE, "--audit-policy-file": POLICY_FILE}


@dataclass(frozen=True)
class Current:
    text: str
    manifest: Manifest
    files: dict[str, bytes]
    mode: int


def _referenced_files(layout: HostLayout, manifest: Manifest) -> dict[str, bytes]:
    files = {}
    for flag, name in FILE_FLAGS.items():
        path = flag_value(manifest, flag)
        if path and path.startswith(layout.settings.config_dir + "/"):
            data = hostfs.read_optional(layout.host(path))
            if data is not None:
                files[name] = data
    return files


def read_current(layout: HostLayout) -> Current:
    if not layout.static_pod_dir.is_dir():
        raise HostError(f"static pod folder {layout.static_pod_dir} does not exist")
    path = layout.manifest
    raw = hostfs.read_optional(path)
    if raw is None:
        raise ManifestError(f"{path} does not exist; is this a kubeadm control-plane node?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text; refusing to change it") from None
    manifest = parse_manifest(text, str(path))
    return Current(text, manifest, _referenced_files(layout, manifest), path.stat().st_mode & 0o777)


def subdir_of(layout: HostLayout, manifest: Manifest) -> str | None:
    for flag in FILE_FLAGS:
        path = flag_value(manifest, flag)
        if path and path.startswith(layout.settings.config_dir + "/"):
            return posixpath.dirname(path)
    return None


def cleanup_temporaries(layout: HostLayout) -> None:
    for folder in (layout.static_pod_dir, layout.config_dir, layout.state_dir, layout.backups):
        hostfs.remove_stale_temporaries(folder)


def write_backup(layout: HostLayout, current: Current) -> None:
    """Keep the current manifest and files outside the static pod folder: the last ten, and
    always the oldest unpatched one (the manifest as it was before kube-audit first touched it)."""
    existing = hostfs.list_dirs(layout.backups)
    wanted = {MANIFEST_NAME: current.text.encode(), **current.files}
    if existing and hostfs.read_folder(existing[-1]) == wanted:
        return
    seq = int(existing[-1].name.split("-", 1)[0]) + 1 if existing else 1
    tag = (config_hash_of(current.manifest) or "unpatched")[:16]
    hostfs.ensure_dir(layout.backups)
    hostfs.write_folder_atomic(layout.backups / f"{seq:06d}-{tag}", wanted)
    backups = hostfs.list_dirs(layout.backups)
    original = next((b for b in backups if b.name.endswith("-unpatched")), None)
    for old in backups[:-KEEP_BACKUPS]:
        if old != original:
            hostfs.remove_tree(old)


def write_config(layout: HostLayout, subdir: str | None, files: dict[str, bytes]) -> None:
    """Make ``subdir`` hold exactly ``files``; a folder already complete is not rewritten."""
    if subdir is None or not files:
        return
    hostfs.ensure_dir(layout.config_dir, 0o700)
    target = layout.host(subdir)
    if hostfs.read_folder(target) != files:
        hostfs.write_folder_atomic(target, files)


def write_manifest(layout: HostLayout, text: str, mode: int) -> None:
    hostfs.write_atomic(layout.manifest, text.encode(), mode=mode or 0o600)


def collect_garbage(layout: HostLayout, manifest: Manifest) -> None:
    """Remove content folders neither ``manifest`` (the running one) nor a backup refers to.

    A backup folder is named ``<seq>-<hash16>``, the name of the content folder it needs.
    """
    keep = {posixpath.basename(s) for s in [subdir_of(layout, manifest)] if s}
    keep |= {b.name.split("-", 1)[1] for b in hostfs.list_dirs(layout.backups) if "-" in b.name}
    for folder in hostfs.list_dirs(layout.config_dir):
        if folder.name not in keep:
            hostfs.remove_tree(folder)


def remove_clear_tokens(layout: HostLayout, current: Current) -> list[str]:
    """Backups that hold a token file go, and with them every content folder nothing else
    refers to: called once the node runs webhook mode, verified, so that no file on it holds a
    token in clear. Such a backup could only take the node back to tokens of people who may
    have left since; the way back to the token file is the identity-mode setting. Returns the
    backups removed."""
    removed = [
        backup
        for backup in hostfs.list_dirs(layout.backups)
        if hostfs.file_signature(backup / TOKEN_FILE) is not None
    ]
    for backup in removed:
        hostfs.remove_tree(backup)
    collect_garbage(layout, current.manifest)
    return [backup.name for backup in removed]


def restore_backup(layout: HostLayout, backup: Path, mode: int) -> str:
    files = hostfs.read_folder(backup) or {}
    text = files.pop(MANIFEST_NAME).decode()
    manifest = parse_manifest(text, str(backup / MANIFEST_NAME))
    write_config(layout, subdir_of(layout, manifest), files)
    write_manifest(layout, text, mode)
    return config_hash_of(manifest) or ""


def backup_hash(backup: Path) -> str:
    """The config hash of a backup's manifest ("" for an unpatched one)."""
    text = hostfs.read_bytes(backup / MANIFEST_NAME).decode()
    return config_hash_of(parse_manifest(text, str(backup / MANIFEST_NAME))) or ""


def image_of(manifest: Manifest) -> str:
    return str(apiserver_container(manifest).get("image") or "?")
