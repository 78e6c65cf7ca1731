"""Apply, roll back and uninstall on one control-plane node.

Crash safety comes from content addressing: each desired content lives in its own folder
``<config_dir>/<hash>/`` that is complete before the manifest names it, and the manifest's atomic
rename is the single commit point. Killed at any step, the host runs the old manifest with the
old files or the new manifest with the new files; the next apply finishes the job.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from kube_audit import hostfs
from kube_audit.agent.health import Expectation, HealthCheck, HealthOutcome
from kube_audit.agent.layout import MANIFEST_NAME, HostLayout
from kube_audit.agent.webhook_files import remove_identities, webhook_answers, write_identities
from kube_audit.constants import KEEP_FAILED
from kube_audit.core.diff import render_plan
from kube_audit.core.manifest import (
    WEBHOOK_CONFIG_FLAG,
    Manifest,
    apiserver_container,
    apiserver_identity,
    config_hash_of,
    flag_value,
    parse_manifest,
    render_manifest,
    unpatch_manifest,
)
from kube_audit.core.plan import (
    POLICY_FILE,
    TOKEN_FILE,
    DesiredState,
    plan_manifest,
    plan_revocation,
    removes_identities_only,
)
from kube_audit.core.retry import Failure, Hold, plan_hold
from kube_audit.errors import (
    HostError,
    ManifestError,
    NodeConfigError,
    RewrittenDuringWait,
    RolledBack,
    WebhookNotAnswering,
)

KEEP_BACKUPS = 10
# kubeadm waits this long (5 minutes) for kubelet to run a manifest it wrote, then restores its
# backup; a little more, so a rewrite kubelet never runs does not hold us back for ever.
WRITER_WAIT = 330.0
FILE_FLAGS = {"--token-auth-file": TOKEN_FILE, "--audit-policy-file": POLICY_FILE}

Outcome = Literal["unchanged", "applied", "rolled-back", "held", "uninstalled"]
# Why the node's authn-webhook cannot take over identities yet (None: it can).
WebhookProbe = Callable[[HostLayout], "str | None"]


@dataclass(frozen=True)
class NodeResult:
    outcome: Outcome
    config_hash: str
    message: str
    restarted: bool = False


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class _Current:
    text: str
    manifest: Manifest
    files: dict[str, bytes]
    mode: int


def read_state(layout: HostLayout) -> dict[str, Any]:
    """The agent's record of this node: last good hash, pending change, failed hashes."""
    data = hostfs.read_optional(layout.state_file)
    if data is None:
        return {}
    try:
        state = json.loads(data)
    except json.JSONDecodeError:
        return {}
    return state if isinstance(state, dict) else {}


def failures_of(state: dict[str, Any]) -> dict[str, Failure]:
    """Failed config hash -> its failures, oldest first. A plain ``failed`` list (written by
    0.1.0) counts as crashes: held until the inputs change, as that version did."""
    found: dict[str, Failure] = {
        h: Failure(1, 0.0, True, "recorded by an earlier version")
        for h in state.get("failed", [])
        if isinstance(h, str)
    }
    records = state.get("failures")
    for config_hash, record in (records if isinstance(records, dict) else {}).items():
        try:
            found[config_hash] = Failure(
                int(record["count"]),
                float(record["at"]),
                bool(record["crashed"]),
                str(record.get("reason", "")),
            )
        except (KeyError, TypeError, ValueError):
            continue
    return found


def _with_failures(state: dict[str, Any], failures: dict[str, Failure]) -> dict[str, Any]:
    kept = list(failures.items())[-KEEP_FAILED:]
    rest = {k: v for k, v in state.items() if k != "failed"}
    return {**rest, "failures": {h: asdict(f) for h, f in kept}}


def _record_failure(
    state: dict[str, Any], config_hash: str, *, crashed: bool, reason: str, at: float
) -> dict[str, Any]:
    failures = failures_of(state)
    earlier = failures.pop(config_hash, None)
    count = (earlier.count if earlier else 0) + 1
    failures[config_hash] = Failure(count, at, crashed, reason)
    return _with_failures(state, failures)


def _revokes_only(current: _Current, desired: DesiredState) -> bool:
    running = config_hash_of(current.manifest) or ""
    return removes_identities_only(current.manifest, current.files, running, desired)


def _hold(
    state: dict[str, Any], current: _Current, desired: DesiredState, now: float
) -> Hold | None:
    target = desired.config_hash
    return plan_hold(
        target,
        failures_of(state).get(target),
        admin_rollback=bool(target) and state.get("adminRollback") == target,
        revocation=_revokes_only(current, desired),
        now=now,
    )


def hold_of(layout: HostLayout, desired: DesiredState, now: float) -> Hold | None:
    """Why the operator must not apply ``desired`` on this node now (None: it may); reads only."""
    return _hold(read_state(layout), _read_current(layout), desired, now)


def revocation_of(layout: HostLayout, desired: DesiredState, now: float) -> DesiredState | None:
    """What the operator applies while ``desired`` is held (here, or by a crash on another
    node): the running config without the identities ``desired`` takes away (see
    ``plan_revocation``). None if there is none, if it is held itself (its own failure,
    retried with back-off), or if an admin's rollback holds ``desired``: that stands whole, the
    revocation could be the very content rolled back from. Reads only."""
    state, current = read_state(layout), _read_current(layout)
    held = _hold(state, current, desired, now)
    if held is not None and held.by_admin:
        return None
    running = config_hash_of(current.manifest) or ""
    step = plan_revocation(current.manifest, current.files, running, desired)
    if step is None or _hold(state, current, step, now) is not None:
        return None
    return step


def _write_state(layout: HostLayout, state: dict[str, Any]) -> None:
    hostfs.ensure_dir(layout.state_dir)
    hostfs.write_atomic(layout.state_file, json.dumps(state, indent=2, sort_keys=True).encode())


def _referenced_files(layout: HostLayout, manifest: Manifest) -> dict[str, bytes]:
    files = {}
    for flag, name in FILE_FLAGS.items():
        path = flag_value(manifest, flag)
        if path and path.startswith(layout.settings.config_dir + "/"):
            data = hostfs.read_optional(layout.host(path))
            if data is not None:
                files[name] = data
    return files


def _read_current(layout: HostLayout) -> _Current:
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
    return _Current(
        text, manifest, _referenced_files(layout, manifest), path.stat().st_mode & 0o777
    )


def _subdir_of(layout: HostLayout, manifest: Manifest) -> str | None:
    for flag in FILE_FLAGS:
        path = flag_value(manifest, flag)
        if path and path.startswith(layout.settings.config_dir + "/"):
            return posixpath.dirname(path)
    return None


def _cleanup_temporaries(layout: HostLayout) -> None:
    for folder in (layout.static_pod_dir, layout.config_dir, layout.state_dir, layout.backups):
        hostfs.remove_stale_temporaries(folder)


def needs_change(layout: HostLayout, desired: DesiredState) -> bool:
    """Whether ``apply_node`` would write anything; reads only (the operator's cheap check)."""
    if read_state(layout).get("pending") is not None:
        return True  # a wait that was never finished: verify it (or roll back) first
    current = _read_current(layout)
    new = plan_manifest(current.manifest, desired)
    subdir = _subdir_of(layout, new)
    files_ok = subdir is None or hostfs.read_folder(layout.host(subdir)) == dict(desired.files)
    return new != current.manifest or not files_ok


def kubelet_behind(layout: HostLayout, health: HealthCheck | None, now: float) -> str | None:
    """Why the manifest must not be rewritten yet (None: it may): someone else wrote it, less
    than ``WRITER_WAIT`` ago, and kubelet does not run it yet.

    ``kubeadm upgrade`` writes its manifest and waits for the mirror pod's config hash to
    change. Writing ours back before kubelet has run kubeadm's gives the mirror pod the hash it
    had before: kubeadm never sees a change, gives up after 5 minutes and fails the upgrade.
    Only the API can tell (the mirror pod); without it, nothing is held. An unfinished wait of
    our own is not someone else's write: the apply resumes it."""
    if health is None or health.instance is None or read_state(layout).get("pending"):
        return None
    signature = hostfs.file_signature(layout.manifest)
    if signature is None:
        return None
    written = signature[1] / 1e9
    age = now - written
    if not 0 <= age <= WRITER_WAIT:
        return None
    running = config_hash_of(_read_current(layout).manifest) or ""
    verdict, how = health.instance(Expectation(running, written))
    if verdict is not False:
        return None
    return (
        f"waiting for kubelet to run the kube-apiserver manifest written {age:.0f}s ago by "
        f"another writer (kubeadm upgrade?): {how}; kube-audit applies once it runs (at most "
        f"{WRITER_WAIT:.0f}s after the write), so that writer sees its own restart"
    )


def plan_node(layout: HostLayout, desired: DesiredState) -> str:
    """The diff ``apply`` would make; reads only."""
    current = _read_current(layout)
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
        identities_new=desired.identities if desired.webhook_mode else None,
    )


def _backup(layout: HostLayout, current: _Current) -> None:
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


def _write_config(layout: HostLayout, subdir: str | None, files: dict[str, bytes]) -> None:
    """Make ``subdir`` hold exactly ``files``; a folder already complete is not rewritten."""
    if subdir is None or not files:
        return
    hostfs.ensure_dir(layout.config_dir, 0o700)
    target = layout.host(subdir)
    if hostfs.read_folder(target) != files:
        hostfs.write_folder_atomic(target, files)


def _write_manifest(layout: HostLayout, text: str, mode: int) -> None:
    hostfs.write_atomic(layout.manifest, text.encode(), mode=mode or 0o600)


def _collect_garbage(layout: HostLayout, keep: set[str]) -> None:
    """Remove content folders neither the running manifest nor a backup refers to.

    A backup folder is named ``<seq>-<hash16>``, the name of the content folder it needs.
    """
    keep |= {b.name.split("-", 1)[1] for b in hostfs.list_dirs(layout.backups) if "-" in b.name}
    for folder in hostfs.list_dirs(layout.config_dir):
        if folder.name not in keep:
            hostfs.remove_tree(folder)


def _restore(layout: HostLayout, backup: Path, mode: int) -> str:
    files = hostfs.read_folder(backup) or {}
    text = files.pop(MANIFEST_NAME).decode()
    manifest = parse_manifest(text, str(backup / MANIFEST_NAME))
    _write_config(layout, _subdir_of(layout, manifest), files)
    _write_manifest(layout, text, mode)
    return config_hash_of(manifest) or ""


def _record(state: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**state, **changes}


def _wall_datetime(wall: Callable[[], float]) -> datetime:
    return datetime.fromtimestamp(wall(), UTC)


def publish_identities(
    layout: HostLayout, desired: DesiredState, wall: Callable[[], float] = time.time
) -> list[str]:
    """The webhook's snapshot and certificates brought to ``desired`` on their own: in webhook
    mode this is the whole of an identity change, never held back by a failure of a policy."""
    with hostfs.host_lock(layout.lock_file):
        return write_identities(layout, desired, _wall_datetime(wall))


def _check_webhook_takes_over(
    layout: HostLayout, current: Manifest, new: Manifest, probe: WebhookProbe | None
) -> None:
    """A manifest that switches the apiserver to webhook mode is written only once the node's
    webhook answers: else every person would be refused from the restart on."""
    if probe is None or flag_value(new, WEBHOOK_CONFIG_FLAG) is None:
        return
    if flag_value(current, WEBHOOK_CONFIG_FLAG) == flag_value(new, WEBHOOK_CONFIG_FLAG):
        return
    why = probe(layout)
    if why is not None:
        raise WebhookNotAnswering(
            f"kube-apiserver is not switched to webhook mode yet: this node's authn-webhook "
            f"does not answer ({why}), and every person's token would be refused from the "
            "restart on. Is the DaemonSet's authn-webhook container running? Retried; the node "
            "keeps its token file meanwhile"
        )


def apply_node(
    layout: HostLayout,
    desired: DesiredState,
    health: HealthCheck | None,
    *,
    retry_failed: bool = True,
    now: Callable[[], str] = _now,
    wall: Callable[[], float] = time.time,
    webhook_probe: WebhookProbe | None = webhook_answers,
) -> NodeResult:
    """Bring the node to ``desired``; roll back if the new apiserver never gets ready.

    ``retry_failed`` False (the operator): content held by an earlier failure or by an admin's
    rollback is not tried (see ``core.retry``); True (an admin by hand): it is.
    ``webhook_probe`` None: a switch to webhook mode does not wait for the webhook."""
    with hostfs.host_lock(layout.lock_file):
        _cleanup_temporaries(layout)
        write_identities(layout, desired, _wall_datetime(wall))
        resumed = _resume_pending(layout, health, now=now, wall=wall)
        current = _read_current(layout)
        state = read_state(layout)
        new = plan_manifest(current.manifest, desired)
        target_hash = desired.config_hash
        held_by_admin = state.get("adminRollback")
        if held_by_admin is not None and (held_by_admin != target_hash or retry_failed):
            state = {k: v for k, v in state.items() if k != "adminRollback"}
            _write_state(layout, state)  # the objects changed since, or an admin applies it
        subdir = _subdir_of(layout, new)
        files_ok = subdir is None or hostfs.read_folder(layout.host(subdir)) == dict(desired.files)
        if new == current.manifest and files_ok:
            if resumed is not None and resumed.config_hash == target_hash:
                return resumed
            short = target_hash[:16] or "unpatched (nothing to manage)"
            return NodeResult("unchanged", target_hash, f"unchanged: the node runs config {short}")
        if not retry_failed and (hold := _hold(state, current, desired, wall())):
            return NodeResult("held", target_hash, hold.message)
        _refuse_rootless_without_chown(new)
        _check_webhook_takes_over(layout, current.manifest, new, webhook_probe)
        _backup(layout, current)
        _write_config(layout, subdir, dict(desired.files))
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
        state = _record(
            state,
            pending=target_hash if health is not None else None,
            pendingSince=wall() if health is not None else None,
        )
        _write_state(layout, state)
        _write_manifest(layout, written, current.mode)
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
            return _roll_back_failed(
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
    keep = {
        posixpath.basename(s) for s in [_subdir_of(layout, _read_current(layout).manifest)] if s
    }
    _collect_garbage(layout, keep)
    failures = failures_of(state)
    failures.pop(target_hash, None)
    _write_state(
        layout,
        _record(
            _with_failures(state, failures),
            pending=None,
            pendingSince=None,
            lastGood=target_hash,
            lastApplied=now(),
        ),
    )
    short = target_hash[:16] or "unpatched (nothing to manage)"
    if health is not None:
        how = f"the new apiserver is {how}"
    elif not restarted:
        how = "files repaired, apiserver not restarted"
    else:
        how = "not waiting for the apiserver (--no-wait)"
    return NodeResult("applied", target_hash, f"applied config {short}; {how}", restarted)


def _resume_pending(
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
    running = config_hash_of(_read_current(layout).manifest) or ""
    if running != pending:
        _write_state(layout, _record(state, pending=None, pendingSince=None))
        return None
    return _finish(
        layout, state, target_hash=pending, health=health, restarted=False, now=now, wall=wall
    )


def resume_node(layout: HostLayout, health: HealthCheck | None) -> NodeResult | None:
    """Finish a health wait that a killed agent left (verify, or roll back); None if none."""
    with hostfs.host_lock(layout.lock_file):
        _cleanup_temporaries(layout)
        return _resume_pending(layout, health, now=_now)


def _image(manifest: Manifest) -> str:
    return str(apiserver_container(manifest).get("image") or "?")


def _roll_back_failed(
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
    current = _read_current(layout)
    ours = (
        current.text == written
        if written is not None
        else (config_hash_of(current.manifest) or "") == failed_hash
    )
    if not ours:
        # Their write cut our instance short: no failure of our config is known, none recorded.
        _write_state(layout, _record(state, pending=None, pendingSince=None))
        raise RewrittenDuringWait(
            f"new kube-apiserver for config {failed_hash[:16]} was not ready ({reason}), but "
            f"{layout.manifest} was rewritten by someone else during the wait (a kubeadm "
            f"upgrade?; image now {_image(current.manifest)}): not rolling back over it. The "
            f"previous manifest stays in {layout.backups}; the config is applied again on the "
            "new one once kubelet runs it"
        )
    state = _record(
        _record_failure(state, failed_hash, crashed=crashed, reason=reason, at=wall()),
        lastRollback=now(),
    )
    backups = hostfs.list_dirs(layout.backups)
    if not backups:
        _write_state(layout, _record(state, pending=None, pendingSince=None))
        raise RolledBack(
            f"new kube-apiserver not ready ({reason}) and no backup to restore",
            failed_hash,
            crashed=crashed,
        )
    restored_hash = _backup_hash(backups[-1])
    state = _record(state, pending=restored_hash, pendingSince=wall())
    _write_state(layout, state)
    restored = _restore(layout, backups[-1], layout.manifest.stat().st_mode & 0o777)
    back = health.wait_ready(
        require_restart=True, expect=Expectation(restored, float(state["pendingSince"]))
    )
    _write_state(layout, _record(state, pending=None, pendingSince=None, lastGood=restored))
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


def _backup_hash(backup: Path) -> str:
    """The config hash of a backup's manifest ("" for an unpatched one)."""
    text = hostfs.read_bytes(backup / MANIFEST_NAME).decode()
    return config_hash_of(parse_manifest(text, str(backup / MANIFEST_NAME))) or ""


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
        _cleanup_temporaries(layout)
        _resume_pending(layout, health, now=_now)
        current = _read_current(layout)
        state = read_state(layout)
        skip = {*failures_of(state), *state.get("rolledBackFrom", [])}
        running = config_hash_of(current.manifest) or ""
        wanted_now = {MANIFEST_NAME: current.text.encode(), **current.files}
        for backup in reversed(hostfs.list_dirs(layout.backups)):
            files = hostfs.read_folder(backup) or {}
            if files == wanted_now or _backup_hash(backup) in skip - {""}:
                continue
            if _backup_hash(backup) == running and running:
                continue
            text = files[MANIFEST_NAME].decode()
            theirs = _image(parse_manifest(text, str(backup / MANIFEST_NAME)))
            if theirs != _image(current.manifest) and not allow_image_change:
                raise ManifestError(
                    f"the last good backup {backup.name} runs kube-apiserver image {theirs}, "
                    f"the node runs {_image(current.manifest)} (a kubeadm upgrade since?); "
                    "restoring it would change the apiserver version: refusing (use "
                    "--allow-image-change if that is really meant)"
                )
            _backup(layout, current)
            since = time.time()
            rolled_from = [*state.get("rolledBackFrom", []), running][-KEEP_FAILED:]
            restored = _backup_hash(backup)
            state = _record(
                state,
                pending=restored,
                pendingSince=since,
                rolledBackFrom=rolled_from,
                adminRollback=running or None,
            )
            _write_state(layout, state)
            _restore(layout, backup, current.mode)
            if health is not None:
                outcome = health.wait_ready(
                    require_restart=True, expect=Expectation(restored, since)
                )
                if not outcome.ready:
                    _write_state(layout, _record(state, pending=None, pendingSince=None))
                    raise RolledBack(
                        f"restored {backup.name} but kube-apiserver is not ready: {outcome.reason}",
                        restored,
                    )
            _write_state(layout, _record(state, pending=None, pendingSince=None, lastGood=restored))
            return NodeResult(
                "rolled-back", restored, f"rolled back: restored backup {backup.name}", True
            )
        raise HostError(f"no earlier good backup in {layout.backups} to go back to")


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


def uninstall_node(layout: HostLayout, health: HealthCheck | None) -> NodeResult:
    """Put back the manifest as it was before kube-audit; remove our files, keep audit logs.
    A node kube-audit never changed is left exactly as it is (not even a lock file made)."""
    if not layout.state_dir.exists() and not layout.config_dir.exists():
        current = _read_current(layout)
        if unpatch_manifest(current.manifest) == current.manifest:
            return NodeResult(
                "unchanged",
                "",
                f"nothing to uninstall: kube-audit never changed this node ({layout.manifest} "
                "has no kube-audit flags and there are no kube-audit files)",
            )
    with hostfs.host_lock(layout.lock_file):
        _cleanup_temporaries(layout)
        _resume_pending(layout, health, now=_now)
        current = _read_current(layout)
        original = unpatch_manifest(current.manifest)
        restarted = original != current.manifest
        if restarted:
            _backup(layout, current)
            since = time.time()
            _write_manifest(layout, render_manifest(original), current.mode)
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


def health_check(
    layout: HostLayout, *, url: str | None, timeout: float, no_wait: bool
) -> HealthCheck | None:
    """The readiness check the options ask for (None: do not wait); one place for CLI and pod."""
    if no_wait:
        return None
    if url:
        return HealthCheck(
            url=url, ca_file=layout.host("/etc/kubernetes/pki/ca.crt"), timeout=timeout
        )
    return default_health_check(layout, timeout)


def default_health_check(layout: HostLayout, timeout: float) -> HealthCheck:
    """The local apiserver's /readyz over HTTPS, trusting the cluster CA on the host."""
    manifest = _read_current(layout).manifest
    address = flag_value(manifest, "--advertise-address") or "127.0.0.1"
    port = flag_value(manifest, "--secure-port") or "6443"
    host = f"[{address}]" if ":" in address else address
    return HealthCheck(
        url=f"https://{host}:{port}/readyz",
        ca_file=layout.host("/etc/kubernetes/pki/ca.crt"),
        timeout=timeout,
    )


@dataclass(frozen=True)
class NodeAgent:
    """What the operator asks of this node's agent, through one typed interface: the agent's
    state file stays the agent's business."""

    layout: HostLayout
    health: HealthCheck | None
    # Wall-clock seconds: when a failure happened and when its retry is due.
    wall: Callable[[], float] = time.time
    webhook_probe: WebhookProbe | None = webhook_answers

    def publish_identities(self, desired: DesiredState) -> list[str]:
        return publish_identities(self.layout, desired, self.wall)

    def needs_change(self, desired: DesiredState) -> bool:
        return needs_change(self.layout, desired)

    def hold(self, desired: DesiredState) -> Hold | None:
        """Why this node does not apply ``desired`` now (an earlier failure of that content,
        not yet due for a retry, or an admin's rollback); None if it may."""
        return hold_of(self.layout, desired, self.wall())

    def revocation(self, desired: DesiredState) -> DesiredState | None:
        """The identities ``desired`` takes away, on their own, while it is held here."""
        return revocation_of(self.layout, desired, self.wall())

    def kubelet_behind(self) -> str | None:
        """Why the manifest must wait for kubelet before it is rewritten (see the function)."""
        return kubelet_behind(self.layout, self.health, self.wall())

    def removes_identities_only(self, desired: DesiredState) -> bool:
        """Going to ``desired`` only takes identities away: no failure elsewhere holds it."""
        return _revokes_only(_read_current(self.layout), desired)

    def pending(self) -> str | None:
        """The config hash an interrupted apply left unverified, if any."""
        value = read_state(self.layout).get("pending")
        return str(value) if value else None

    def apply(self, desired: DesiredState) -> NodeResult:
        return apply_node(
            self.layout,
            desired,
            self.health,
            retry_failed=False,
            wall=self.wall,
            webhook_probe=self.webhook_probe,
        )

    def resume(self) -> NodeResult | None:
        return resume_node(self.layout, self.health)
