"""``kube-audit node uninstall``: the manifest as kubeadm wrote it, kube-audit's files gone,
audit logs kept."""

from __future__ import annotations

import time

from kube_audit import hostfs
from kube_audit.agent.apply import resume_pending
from kube_audit.agent.current import cleanup_temporaries, read_current, write_backup, write_manifest
from kube_audit.agent.health import Expectation, HealthCheck
from kube_audit.agent.layout import HostLayout
from kube_audit.agent.records import NodeResult, utc_now
from kube_audit.agent.webhook_files import remove_identities
from kube_audit.core.manifest import render_manifest, unpatch_manifest
from kube_audit.errors import RolledBack


def uninstall_node(layout: HostLayout, health: HealthCheck | None) -> NodeResult:
    """Put back the manifest as it was before kube-audit; remove our files, keep audit logs.
    A node kube-audit never changed is left exactly as it is (not even a lock file made)."""
    if not layout.state_dir.exists() and not layout.config_dir.exists():
        current = read_current(layout)
        if unpatch_manifest(current.manifest) == current.manifest:
            return NodeResult(
                "unchanged",
                "",
                f"nothing to uninstall: kube-audit never changed this node ({layout.manifest} "
                "has no kube-audit flags and there are no kube-audit files)",
            )
    with hostfs.host_lock(layout.lock_file):
        cleanup_temporaries(layout)
        resume_pending(layout, health, now=utc_now)
        current = read_current(layout)
        original = unpatch_manifest(current.manifest)
        restarted = original != current.manifest
        if restarted:
            write_backup(layout, current)
            since = time.time()
            write_manifest(layout, render_manifest(original), current.mode)
            if health is not None:
                outcome = health.wait_ready(require_restart=True, expect=Expectation("", since))
                if not outcome.ready:
                    raise RolledBack(
                        f"unpatched manifest written but kube-apiserver is not ready: "
                        f"{outcome.reason}; `kube-audit node rollback` restores the last state",
                        "",
                    )
        hostfs.remove_tree(layout.config_dir)
        hostfs.remove_tree(layout.state_file)
        remove_identities(layout)
        kept = "".join(
            f"; {what} kept in {folder}"
            for what, folder in (("audit logs", layout.log_dir), ("backups", layout.backups))
            if folder.is_dir()
        )
        restored = "manifest restored" if restarted else "manifest already had no kube-audit flags"
        message = f"uninstalled: kube-apiserver {restored}{kept}"
        return NodeResult("uninstalled", "", message, restarted)
