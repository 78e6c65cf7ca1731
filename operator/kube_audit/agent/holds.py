"""Why a node does not apply a content now, and what it takes away meanwhile: an earlier
failure of that content, an admin's rollback, another writer's manifest kubelet does not run
yet. Each reads only; ``core.retry`` and ``core.plan`` decide."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kube_audit import hostfs
from kube_audit.agent.current import Current, read_current
from kube_audit.agent.health import Expectation, HealthCheck
from kube_audit.agent.layout import HostLayout
from kube_audit.agent.records import failures_of, read_state
from kube_audit.agent.webhook_files import on_this_node
from kube_audit.core.manifest import WEBHOOK_CONFIG_FLAG, Manifest, config_hash_of, flag_value
from kube_audit.core.plan import (
    DesiredState,
    plan_manifest,
    plan_revocation,
    removes_identities_only,
)
from kube_audit.core.retry import Hold, plan_hold

# kubeadm waits this long (5 minutes) for kubelet to run a manifest it wrote, then restores its
# backup; a little more, so a rewrite kubelet never runs does not hold us back for ever.
WRITER_WAIT = 330.0


# Why the node's authn-webhook cannot take over identities yet (None: it can).
WebhookProbe = Callable[[HostLayout], "str | None"]
# How soon a switch to webhook mode held for a webhook that does not answer is looked at again.
WEBHOOK_RETRY = 10.0


def revokes_only(current: Current, desired: DesiredState) -> bool:
    running = config_hash_of(current.manifest) or ""
    return removes_identities_only(current.manifest, current.files, running, desired)


def hold_for(
    state: dict[str, Any], current: Current, desired: DesiredState, now: float
) -> Hold | None:
    target = desired.config_hash
    return plan_hold(
        target,
        failures_of(state).get(target),
        admin_rollback=bool(target) and state.get("adminRollback") == target,
        revocation=revokes_only(current, desired),
        now=now,
        webhook=desired.webhook_mode,
    )


def webhook_not_ready(
    layout: HostLayout, current: Manifest, new: Manifest, probe: WebhookProbe | None
) -> str | None:
    """Why a manifest that switches the apiserver to webhook mode must not be written yet (None:
    it may): the node's webhook does not answer, and every person would be refused from the
    restart on."""
    if probe is None or flag_value(new, WEBHOOK_CONFIG_FLAG) is None:
        return None
    if flag_value(current, WEBHOOK_CONFIG_FLAG) == flag_value(new, WEBHOOK_CONFIG_FLAG):
        return None
    why = probe(layout)
    if why is None:
        return None
    return (
        f"kube-apiserver is not switched to webhook mode yet: this node's authn-webhook does "
        f"not answer ({why}), and every person's token would be refused from the restart on. "
        "Is the DaemonSet's authn-webhook container running? Retried; the node keeps its token "
        "file meanwhile, and people deleted, disabled or expired since are refused here"
    )


def hold_of(
    layout: HostLayout, desired: DesiredState, now: float, probe: WebhookProbe | None = None
) -> Hold | None:
    """Why the operator must not apply ``desired`` on this node now (None: it may); reads only.
    A switch to webhook mode its webhook cannot take yet is held too (``waiting``, looked at
    again soon), so the identities it takes away go meanwhile, as for any other hold."""
    desired = on_this_node(layout, desired)
    state, current = read_state(layout), read_current(layout)
    held = hold_for(state, current, desired, now)
    if held is not None:
        return held
    why = webhook_not_ready(
        layout, current.manifest, plan_manifest(current.manifest, desired), probe
    )
    return None if why is None else Hold(why, now + WEBHOOK_RETRY, waiting=True)


def revocation_of(layout: HostLayout, desired: DesiredState, now: float) -> DesiredState | None:
    """What the operator applies while ``desired`` is held (here, or by a crash on another
    node, or by an admin's rollback): the running config without the identities ``desired``
    takes away (see ``plan_revocation``). None if there is none, or if that step failed here
    itself and is not due for its retry. An admin's rollback does not stand in its way: what a
    rollback restores is a state of the node, never a person deleted since. Reads only."""
    desired = on_this_node(layout, desired)
    state, current = read_state(layout), read_current(layout)
    running = config_hash_of(current.manifest) or ""
    step = plan_revocation(current.manifest, current.files, running, desired)
    if step is None:
        return None
    held = hold_for(state, current, step, now)
    return step if held is None or held.by_admin else None


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
    running = config_hash_of(read_current(layout).manifest) or ""
    verdict, how = health.instance(Expectation(running, written))
    if verdict is not False:
        return None
    return (
        f"waiting for kubelet to run the kube-apiserver manifest written {age:.0f}s ago by "
        f"another writer (kubeadm upgrade?): {how}; kube-audit applies once it runs (at most "
        f"{WRITER_WAIT:.0f}s after the write), so that writer sees its own restart"
    )
