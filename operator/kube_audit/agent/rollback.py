"""``kube-audit node rollback``: an admin goes back to the last good state before the running
one."""

from __future__ import annotations

import time

from kube_audit import hostfs
from kube_audit.agent.apply import resume_pending
from kube_audit.agent.current import (
    backup_hash,
    cleanup_temporaries,
    image_of,
    read_current,
    restore_backup,
    write_backup,
)
from kube_audit.agent.health import Expectation, HealthCheck
from kube_audit.agent.layout import MANIFEST_NAME, HostLayout
from kube_audit.agent.records import (
    NodeResult,
    failures_of,
    read_state,
    record,
    utc_now,
    write_state,
)
from kube_audit.constants import KEEP_FAILED
from kube_audit.core.manifest import config_hash_of, parse_manifest
from kube_audit.errors import HostError, ManifestError, RolledBack


def rollback_node(
    layout: HostLayout, health: HealthCheck | None, *, allow_image_change: bool = False
) -> NodeResult:
    """Go back to the last good state before the running one.

    Not a toggle: backups of configs that failed, or that a rollback left, are passed over, so
    a second rollback goes further back rather than returning to what the first one left. A
    backup with another kube-apiserver image (taken before a kubeadm upgrade) is never
    restored silently: that would downgrade the apiserver.
    """
    with hostfs.host_lock(layout.lock_file):
        cleanup_temporaries(layout)
        resume_pending(layout, health, now=utc_now)
        current = read_current(layout)
        state = read_state(layout)
        skip = {*failures_of(state), *state.get("rolledBackFrom", [])}
        running = config_hash_of(current.manifest) or ""
        wanted_now = {MANIFEST_NAME: current.text.encode(), **current.files}
        for backup in reversed(hostfs.list_dirs(layout.backups)):
            files = hostfs.read_folder(backup) or {}
            if files == wanted_now or backup_hash(backup) in skip - {""}:
                continue
            if backup_hash(backup) == running and running:
                continue
            text = files[MANIFEST_NAME].decode()
            theirs = image_of(parse_manifest(text, str(backup / MANIFEST_NAME)))
            if theirs != image_of(current.manifest) and not allow_image_change:
                raise ManifestError(
                    f"the last good backup {backup.name} runs kube-apiserver image {theirs}, "
                    f"the node runs {image_of(current.manifest)} (a kubeadm upgrade since?); "
                    "restoring it would change the apiserver version: refusing (use "
                    "--allow-image-change if that is really meant)"
                )
            write_backup(layout, current)
            since = time.time()
            rolled_from = [*state.get("rolledBackFrom", []), running][-KEEP_FAILED:]
            restored = backup_hash(backup)
            state = record(
                state,
                pending=restored,
                pendingSince=since,
                rolledBackFrom=rolled_from,
                adminRollback=running or None,
            )
            write_state(layout, state)
            restore_backup(layout, backup, current.mode)
            if health is not None:
                outcome = health.wait_ready(
                    require_restart=True, expect=Expectation(restored, since)
                )
                if not outcome.ready:
                    write_state(layout, record(state, pending=None, pendingSince=None))
                    raise RolledBack(
                        f"restored {backup.name} but kube-apiserver is not ready: {outcome.reason}",
                        restored,
                    )
            write_state(layout, record(state, pending=None, pendingSince=None, lastGood=restored))
            return NodeResult(
                "rolled-back", restored, f"rolled back: restored backup {backup.name}", True
            )
        raise HostError(f"no earlier good backup in {layout.backups} to go back to")
