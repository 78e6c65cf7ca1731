"""Apply on one control-plane node, and finish or roll back an apply a killed agent left.

Crash safety comes from content addressing: each desired content lives in its own folder
``<config_dir>/<hash>/`` that is complete before the manifest names it, and the manifest's atomic
rename is the single commit point. Killed at any step, the host runs the old manifest with the
old files or the new manifest with the new files; the next apply finishes the job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kube_audit import hostfs
from kube_audit.agent.current import (
    backup_hash,
    cleanup_temporaries,
    collect_garbage,
    image_of,
    read_current,
    remove_clear_tokens,
    restore_backup,
    subdir_of,
    write_backup,
    write_config,
    write_manifest,
)
from kube_audit.agent.health import Expectation, HealthCheck, HealthOutcome
from kube_audit.agent.holds import WebhookProbe, hold_for, revokes_only, webhook_not_ready
from kube_audit.agent.layout import HostLayout
from kube_audit.agent.records import (
    NodeResult,
    failures_of,
    read_state,
    record,
    record_failure,
    utc_now,
    with_failures,
    write_state,
)
from kube_audit.agent.webhook_files import (
    node_snapshot,
    on_this_node,
    webhook_answers,
    write_confirmation,
    write_identities,
)
from kube_audit.core.diff import render_plan
from kube_audit.core.manifest import (
    WEBHOOK_CONFIG_FLAG,
    Manifest,
    apiserver_identity,
    config_hash_of,
    flag_value,
    parse_manifest,
    render_manifest,
)
from kube_audit.core.plan import POLICY_FILE, TOKEN_FILE, DesiredState, plan_manifest
from kube_audit.errors import NodeConfigError, RewrittenDuringWait, RolledBack, WebhookNotAnswering


def _wall_datetime(wall: Callable[[], float]) -> datetime:
    return datetime.fromtimestamp(wall(), UTC)


def publish_identities(
    layout: HostLayout, desired: DesiredState, wall: Callable[[], float] = time.time
) -> list[str]:
    """The webhook's snapshot and certificates brought to ``desired`` on their own: in webhook
    mode this is the whole of an identity change, never held back by a failure of a policy.
    The operator calls it on every reconcile, right after listing the cluster: the snapshot
    is confirmed current then (the webhook's staleness bound counts from it)."""
    with hostfs.host_lock(layout.lock_file):
        written = write_identities(layout, desired, _wall_datetime(wall))
        write_confirmation(layout, _wall_datetime(wall))
        removed = _clear_tokens_gone(layout)
        return written + [f"(removed backup {name}: it held tokens in clear)" for name in removed]


def _clear_tokens_gone(layout: HostLayout) -> list[str]:
    """Once the node runs webhook mode and that was verified (nothing pending, the running
    config is the last good one), no file on it holds a token in clear: the backups and
    content folders of its token-file days go. Before that they are the way back (a failed
    switch is rolled back to them). Returns the backups removed."""
    state, current = read_state(layout), read_current(layout)
    running = config_hash_of(current.manifest) or ""
    if flag_value(current.manifest, WEBHOOK_CONFIG_FLAG) is None:
        return []
    if state.get("pending") or state.get("lastGood") != running:
        return []
    return remove_clear_tokens(layout, current)


def needs_change(layout: HostLayout, desired: DesiredState) -> bool:
    """Whether ``apply_node`` would write anything; reads only (the operator's cheap check)."""
    if read_state(layout).get("pending") is not None:
        return True  # a wait that was never finished: verify it (or roll back) first
    desired = on_this_node(layout, desired)
    current = read_current(layout)
    new = plan_manifest(current.manifest, desired)
    subdir = subdir_of(layout, new)
    files_ok = subdir is None or hostfs.read_folder(layout.host(subdir)) == dict(desired.files)
    return new != current.manifest or not files_ok


def plan_node(layout: HostLayout, desired: DesiredState) -> str:
    """The diff ``apply`` would make; reads only."""
    desired = on_this_node(layout, desired)
    current = read_current(layout)
    new_text = render_manifest(plan_manifest(current.manifest, desired))
    new_text = current.text if parse_manifest(new_text) == current.manifest else new_text
    return render_plan(
        manifest_old=current.text,
        manifest_new=new_text,
        policy_old=current.files.get(POLICY_FILE),
        policy_new=desired.files.get(POLICY_FILE),
        tokens_old=current.files.get(TOKEN_FILE),
        tokens_new=desired.files.get(TOKEN_FILE),
        identities_old=hostfs.read_optional(layout.identity_snapshot)
        if desired.webhook_mode
        else None,
        identities_new=(node_snapshot(layout, desired.identities) or desired.identities)
        if desired.webhook_mode
        else None,
    )


def _refuse_rootless_without_chown(manifest: Manifest) -> None:
    """Before anything is written: a non-root kube-apiserver must be given its files, and a
    process without CAP_CHOWN cannot (the DaemonSet's container drops every capability)."""
    owner = apiserver_identity(manifest)
    if owner is None or hostfs.can_give_files():
        return
    uid, gid = owner
    raise NodeConfigError(
        f"kube-apiserver runs as uid {uid}, gid {gid} (kubeadm's RootlessControlPlane): its "
        "token file, audit policy and log folder must be given to that user, which needs "
        "CAP_CHOWN, and kube-audit's pod runs without capabilities. Rootless control planes "
        "are not managed by the DaemonSet: run `kube-audit node apply` as root on the node "
        "instead; nothing was changed"
    )


def apply_node(
    layout: HostLayout,
    desired: DesiredState,
    health: HealthCheck | None,
    *,
    retry_failed: bool = True,
    now: Callable[[], str] = utc_now,
    wall: Callable[[], float] = time.time,
    webhook_probe: WebhookProbe | None = webhook_answers,
) -> NodeResult:
    """Bring the node to ``desired``; roll back if the new apiserver never gets ready.

    ``retry_failed`` False (the operator): content held by an earlier failure or by an admin's
    rollback is not tried (see ``core.retry``); True (an admin by hand): it is.
    ``webhook_probe`` None: a switch to webhook mode does not wait for the webhook."""
    with hostfs.host_lock(layout.lock_file):
        cleanup_temporaries(layout)
        write_identities(layout, desired, _wall_datetime(wall))
        desired = on_this_node(layout, desired)  # after the CA is made, if it had to be
        resumed = resume_pending(layout, health, now=now, wall=wall)
        current = read_current(layout)
        state = read_state(layout)
        new = plan_manifest(current.manifest, desired)
        target_hash = desired.config_hash
        held_by_admin = state.get("adminRollback")
        revocation_only = revokes_only(current, desired)
        if held_by_admin is not None and (
            retry_failed or (held_by_admin != target_hash and not revocation_only)
        ):
            # The objects changed since, or an admin applies it; a revocation on the rolled
            # back state keeps the admin's hold.
            state = {k: v for k, v in state.items() if k != "adminRollback"}
            write_state(layout, state)
        subdir = subdir_of(layout, new)
        files_ok = subdir is None or hostfs.read_folder(layout.host(subdir)) == dict(desired.files)
        if new == current.manifest and files_ok:
            if resumed is not None and resumed.config_hash == target_hash:
                return resumed
            short = target_hash[:16] or "unpatched (nothing to manage)"
            return NodeResult("unchanged", target_hash, f"unchanged: the node runs config {short}")
        hold = None if retry_failed else hold_for(state, current, desired, wall())
        if hold is not None and not (hold.by_admin and revocation_only):
            return NodeResult("held", target_hash, hold.message)
        _refuse_rootless_without_chown(new)
        why = webhook_not_ready(layout, current.manifest, new, webhook_probe)
        if why is not None:
            raise WebhookNotAnswering(why)
        write_backup(layout, current)
        write_config(layout, subdir, dict(desired.files))
        if desired.files.get(POLICY_FILE) is not None:
            hostfs.ensure_dir(layout.log_dir, 0o700)
        owner = apiserver_identity(new)
        if owner is not None and subdir is not None:
            hostfs.give_to([layout.config_dir, layout.host(subdir), layout.log_dir], owner)
        changed = new != current.manifest
        if not changed:
            return _finish(
                layout,
                state,
                target_hash=target_hash,
                health=None,
                restarted=False,
                now=now,
                wall=wall,
            )
        written = render_manifest(new)
        state = record(
            state,
            pending=target_hash if health is not None else None,
            pendingSince=wall() if health is not None else None,
        )
        write_state(layout, state)
        write_manifest(layout, written, current.mode)
        return _finish(
            layout,
            state,
            target_hash=target_hash,
            health=health,
            restarted=True,
            now=now,
            wall=wall,
            written=written,
        )


def _finish(
    layout: HostLayout,
    state: dict[str, Any],
    *,
    target_hash: str,
    health: HealthCheck | None,
    restarted: bool,
    now: Callable[[], str],
    wall: Callable[[], float],
    written: str | None = None,
) -> NodeResult:
    how = ""
    if health is not None:
        since = float(state.get("pendingSince") or 0)
        outcome = health.wait_ready(
            require_restart=restarted, expect=Expectation(target_hash, since)
        )
        if not outcome.ready:
            return roll_back_failed(
                layout,
                state,
                failed_hash=target_hash,
                health=health,
                outcome=outcome,
                now=now,
                wall=wall,
                written=written,
            )
        how = outcome.reason
    collect_garbage(layout, read_current(layout).manifest)
    failures = failures_of(state)
    failures.pop(target_hash, None)
    write_state(
        layout,
        record(
            with_failures(state, failures),
            pending=None,
            pendingSince=None,
            lastGood=target_hash,
            lastApplied=now(),
        ),
    )
    _clear_tokens_gone(layout)
    short = target_hash[:16] or "unpatched (nothing to manage)"
    if health is not None:
        how = f"the new apiserver is {how}"
    elif not restarted:
        how = "files repaired, apiserver not restarted"
    else:
        how = "not waiting for the apiserver (--no-wait)"
    return NodeResult("applied", target_hash, f"applied config {short}; {how}", restarted)


def resume_pending(
    layout: HostLayout,
    health: HealthCheck | None,
    *,
    now: Callable[[], str],
    wall: Callable[[], float] = time.time,
) -> NodeResult | None:
    """Finish a wait a killed agent left behind: verify the instance, or roll back.

    Every entry point calls this first, so no config is ever reported live unverified. If the
    manifest no longer is the one we were waiting for (someone else rewrote it meanwhile), the
    wait is moot and only the record is cleared.
    """
    state = read_state(layout)
    pending = state.get("pending")
    if pending is None or health is None:
        return None
    running = config_hash_of(read_current(layout).manifest) or ""
    if running != pending:
        write_state(layout, record(state, pending=None, pendingSince=None))
        return None
    return _finish(
        layout, state, target_hash=pending, health=health, restarted=False, now=now, wall=wall
    )


def resume_node(layout: HostLayout, health: HealthCheck | None) -> NodeResult | None:
    """Finish a health wait that a killed agent left (verify, or roll back); None if none."""
    with hostfs.host_lock(layout.lock_file):
        cleanup_temporaries(layout)
        return resume_pending(layout, health, now=utc_now)


def roll_back_failed(
    layout: HostLayout,
    state: dict[str, Any],
    *,
    failed_hash: str,
    health: HealthCheck,
    outcome: HealthOutcome,
    now: Callable[[], str],
    wall: Callable[[], float],
    written: str | None = None,
) -> NodeResult:
    """Restore the newest backup, but only over the manifest we wrote.

    The failure is recorded first (with the restore as the new pending wait), so an agent
    killed during the rollback's own wait neither re-applies the failed config nor reports the
    restored one unverified.
    """
    reason, crashed = outcome.reason, outcome.crashed
    current = read_current(layout)
    ours = (
        current.text == written
        if written is not None
        else (config_hash_of(current.manifest) or "") == failed_hash
    )
    if not ours:
        # Their write cut our instance short: no failure of our config is known, none recorded.
        write_state(layout, record(state, pending=None, pendingSince=None))
        raise RewrittenDuringWait(
            f"new kube-apiserver for config {failed_hash[:16]} was not ready ({reason}), but "
            f"{layout.manifest} was rewritten by someone else during the wait (a kubeadm "
            f"upgrade?; image now {image_of(current.manifest)}): not rolling back over it. The "
            f"previous manifest stays in {layout.backups}; the config is applied again on the "
            "new one once kubelet runs it"
        )
    state = record(
        record_failure(state, failed_hash, crashed=crashed, reason=reason, at=wall()),
        lastRollback=now(),
    )
    backups = hostfs.list_dirs(layout.backups)
    if not backups:
        write_state(layout, record(state, pending=None, pendingSince=None))
        raise RolledBack(
            f"new kube-apiserver not ready ({reason}) and no backup to restore",
            failed_hash,
            crashed=crashed,
        )
    restored_hash = backup_hash(backups[-1])
    state = record(state, pending=restored_hash, pendingSince=wall())
    write_state(layout, state)
    restored = restore_backup(layout, backups[-1], layout.manifest.stat().st_mode & 0o777)
    back = health.wait_ready(
        require_restart=True, expect=Expectation(restored, float(state["pendingSince"]))
    )
    write_state(layout, record(state, pending=None, pendingSince=None, lastGood=restored))
    tail = (
        "the previous apiserver is ready again"
        if back.ready
        else (
            f"the previous apiserver is not ready either ({back.reason}); "
            "see docs/recovery.md to recover the node by hand"
        )
    )
    raise RolledBack(
        f"new kube-apiserver for config {failed_hash[:16]} never became ready ({reason}); "
        f"restored backup {backups[-1].name}; {tail}",
        failed_hash,
        crashed=crashed,
    )
