"""kstatus-style status for AuditUser and AuditPolicy, computed from per-node results.

Each node writes only ``status.nodes.<node>``; one owner turns them into ``observedGeneration`` and
the ``Ready``/``Reconciling``/``Stalled`` conditions, so pods never overwrite each other and
Argo CD and Flux read health the way they read any kstatus-compliant object.

An entry holds what changes only with the object or the node's outcome (generation, outcome,
message), never the node's config hash: that changes with every user added, and would make
each change rewrite the status of every object. The hash lives in the node's own record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kube_audit.constants import (
    NODE_APPLIED_ANNOTATION,
    NODE_CONFIG_ANNOTATION,
    NODE_CONFIRMED_ANNOTATION,
    NODE_OUTCOME_ANNOTATION,
    NODE_ROLLBACK_ANNOTATION,
)
from kube_audit.core.models import parse_rfc3339

APPLIED = "Applied"
INVALID = "Invalid"
PENDING = "Pending"
ROLLED_BACK = "RolledBack"
BLOCKED = "Blocked"
# An AuditUser past its spec.expiresAt: not Ready, and nothing to wait for or fix (kstatus
# Current, Argo CD Healthy): the object does what it says.
EXPIRED = "Expired"
# Webhook mode: a node whose operator has not confirmed its identity snapshot for longer than
# the bound. Its webhook may still answer for people deleted, disabled or changed since.
STALE = "SnapshotStale"


LEGACY_ENTRY_KEYS = ("configHash",)


def node_entry(
    *, generation: int, outcome: str, message: str, time: str, token: str | None = None
) -> dict[str, Any]:
    """``token`` (AuditUsers only): the fingerprint of the token this node serves for the
    person (a rotation changes no generation: without it a failed rotation read Ready)."""
    entry: dict[str, Any] = {
        "observedGeneration": generation,
        "outcome": outcome,
        "message": message,
        "time": time,
    }
    if token is not None:
        entry["token"] = token
    return entry


def entry_differs(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether a node's entry needs writing (the time alone is not a change; a key that
    entries no longer carry is, once)."""
    if old is None:
        return True
    if any(k in old for k in LEGACY_ENTRY_KEYS):
        return True
    return any(old.get(k) != new.get(k) for k in new if k != "time")


def entry_patch(old: Mapping[str, Any] | None, entry: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch of one entry: a merge patch keeps keys it does not name, so keys that
    entries no longer carry are removed by name."""
    gone = {k: None for k in LEGACY_ENTRY_KEYS if old and k in old}
    return {**entry, **gone}


def _condition(kind: str, true: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if true else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def _expired_at(obj: Mapping[str, Any], now: str) -> str | None:
    """``spec.expiresAt`` when it is not after ``now`` (both RFC 3339), else None."""
    value = (obj.get("spec") or {}).get("expiresAt")
    if not isinstance(value, str):
        return None
    try:
        return value if parse_rfc3339(value) <= parse_rfc3339(now) else None
    except ValueError:
        return None


def stale_snapshots(
    records: Mapping[str, Mapping[str, str]],
    control_plane: Sequence[str],
    now: str,
    bound: float,
) -> dict[str, str]:
    """Control-plane node -> why its identity snapshot is stale: its record says its operator
    last confirmed the snapshot more than ``bound`` seconds before ``now``. Judged from the
    record, not by the node itself, so a node whose operator is stuck or cut off from the API
    is seen by the others. Nodes whose record names no confirmation (token-file mode) are not
    judged."""
    stale: dict[str, str] = {}
    for node in control_plane:
        at = (records.get(node) or {}).get(NODE_CONFIRMED_ANNOTATION)
        if not at:
            continue
        try:
            age = (parse_rfc3339(now) - parse_rfc3339(at)).total_seconds()
        except ValueError:
            age, at = float("inf"), f"an unreadable time ({at!r})"
        if age > bound:
            stale[node] = (
                f"node {node}: its identity snapshot was last confirmed current at {at}, more "
                f"than {bound:.0f} s ago: people deleted, disabled or changed since may still "
                "be answered there as before (see that node's operator container)"
            )
    return stale


def compute_conditions(
    obj: Mapping[str, Any],
    control_plane: Sequence[str],
    now: str,
    token: str | None = None,
    stale: Mapping[str, str] | None = None,
    *,
    extra: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """``observedGeneration`` and conditions from the node entries of the current generation.
    ``token``: the fingerprint of the person's current token; a node is live for them only
    where it serves that one. ``stale`` (AuditUsers in webhook mode): nodes whose snapshot is
    stale, with why; they are live for nobody. ``extra``: conditions judged elsewhere, kept
    in the list (a merge patch replaces it whole)."""
    stale = stale or {}
    generation = int((obj.get("metadata") or {}).get("generation") or 0)
    status = obj.get("status") or {}
    nodes: Mapping[str, Any] = status.get("nodes") or {}
    current = {n: e for n, e in nodes.items() if e.get("observedGeneration") == generation}
    invalid = [e for e in current.values() if e.get("outcome") == INVALID]
    failed = {n: e for n, e in current.items() if e.get("outcome") in (ROLLED_BACK, BLOCKED)}
    pending = [e for e in current.values() if e.get("outcome") == PENDING]
    live = [
        n
        for n in control_plane
        if (current.get(n) or {}).get("outcome") == APPLIED
        and (token is None or (current.get(n) or {}).get("token") == token)
        and n not in stale
    ]
    total = len(control_plane)
    if invalid:
        message = str(invalid[0].get("message") or "invalid")
        conditions = [
            _condition("Ready", False, INVALID, message, generation),
            _condition("Reconciling", False, INVALID, "", generation),
            _condition("Stalled", True, INVALID, message, generation),
        ]
    elif (expired_at := _expired_at(obj, now)) is not None:
        gone = [n for n in control_plane if (current.get(n) or {}).get("outcome") == APPLIED
                and not (current.get(n) or {}).get("token")]  # fmt: skip
        message = (
            f"expired at {expired_at}: its token is refused; gone from {len(gone)} of "
            f"{len(control_plane)} control-plane node(s)"
        )
        conditions = [
            _condition("Ready", False, EXPIRED, message, generation),
            _condition("Reconciling", False, EXPIRED, "", generation),
            _condition("Stalled", False, EXPIRED, "", generation),
        ]
    elif failed:
        # The node that failed, not one that stopped because of it, names the reason.
        node, entry = min(
            failed.items(), key=lambda item: (item[1].get("outcome") != ROLLED_BACK, item[0])
        )
        message = f"node {node}: {entry.get('message') or entry.get('outcome')}"
        reason = str(entry.get("outcome"))
        conditions = [
            _condition("Ready", False, reason, message, generation),
            _condition("Reconciling", False, reason, "", generation),
            _condition("Stalled", True, reason, message, generation),
        ]
    elif stale:
        message = stale[min(stale)]
        conditions = [
            _condition("Ready", False, STALE, message, generation),
            _condition("Reconciling", False, STALE, "", generation),
            _condition("Stalled", True, STALE, message, generation),
        ]
    elif total and len(live) == total:
        message = f"live on all {total} control-plane node(s)"
        if ((obj.get("spec") or {}).get("disabled")) is True:
            message = f"disabled: no token on any of the {total} control-plane node(s)"
        conditions = [
            _condition("Ready", True, APPLIED, message, generation),
            _condition("Reconciling", False, APPLIED, "", generation),
            _condition("Stalled", False, APPLIED, "", generation),
        ]
    else:
        message = f"live on {len(live)} of {total} control-plane node(s)"
        if not current and total:
            message = (
                f"generation {generation} seen, not yet applied on any of the {total} "
                "control-plane node(s)"
            )
        behind = sorted(
            n
            for n in control_plane
            if (current.get(n) or {}).get("outcome") == APPLIED and n not in live
        )
        if behind:
            message += f"; {', '.join(behind)} still serve(s) the previous token"
        if pending:
            message += f"; {pending[0].get('message') or 'waiting'}"
        conditions = [
            _condition("Ready", False, "Progressing", message, generation),
            _condition("Reconciling", True, "Progressing", message, generation),
            _condition("Stalled", False, "Progressing", "", generation),
        ]
    conditions += [dict(c) for c in extra]  # judged elsewhere: the Shipping condition
    with_transition_times(conditions, status, now)
    return {"observedGeneration": generation, "conditions": conditions}


def with_transition_times(
    conditions: list[dict[str, Any]], status: Mapping[str, Any], now: str
) -> list[dict[str, Any]]:
    """Each condition's lastTransitionTime: kept from ``status`` while its status is the same,
    else ``now`` (set in place; returned for convenience)."""
    previous = {c.get("type"): c for c in status.get("conditions") or []}
    for condition in conditions:
        old = previous.get(condition["type"])
        same = old is not None and old.get("status") == condition["status"]
        condition["lastTransitionTime"] = (
            old.get("lastTransitionTime", now) if same and old else now
        )
    return conditions


def conditions_differ(status: Mapping[str, Any], patch: Mapping[str, Any]) -> bool:
    """Whether the owner needs to write: any change but the transition times."""
    if any(status.get(k) != v for k, v in patch.items() if k != "conditions"):
        return True
    old = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"}
        for c in status.get("conditions") or []
    ]
    new = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in patch["conditions"]]
    return old != new


def summarize(
    objects: Sequence[tuple[str, Mapping[str, Any]]],
    control_plane: Sequence[str],
    records: Mapping[str, Mapping[str, str]],
) -> tuple[list[list[str]], list[list[str]]]:
    """Rows for ``kube-audit status``: one per object, one per control-plane node.

    ``objects`` are (kind, object) pairs as the API returns them; ``records`` each node's
    record (the annotations of its node Lease).
    """
    object_rows = []
    for kind, obj in sorted(objects, key=lambda ko: (ko[0], ko[1]["metadata"]["name"])):
        generation = int(obj["metadata"].get("generation") or 0)
        status = obj.get("status") or {}
        nodes = status.get("nodes") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        live = sorted(
            n
            for n, e in nodes.items()
            if e.get("observedGeneration") == generation and e.get("outcome") == APPLIED
        )
        stalled = conditions.get("Stalled") or {}
        error = str(stalled.get("message") or "") if stalled.get("status") == "True" else ""
        object_rows.append(
            [
                f"{kind}/{obj['metadata']['name']}",
                str((conditions.get("Ready") or {}).get("status") or "Unknown"),
                f"{len(live)}/{len(control_plane)}" + (f" ({','.join(live)})" if live else ""),
                error,
            ]
        )
    node_rows = []
    for node in sorted({*control_plane, *records}):
        record = records.get(node) or {}
        outcome = record.get(NODE_OUTCOME_ANNOTATION) or "-"
        if node not in control_plane:
            outcome += " (not a control-plane node now)"
        node_rows.append(
            [
                node,
                (record.get(NODE_CONFIG_ANNOTATION) or "")[:16] or "-",
                outcome,
                record.get(NODE_APPLIED_ANNOTATION) or "-",
                record.get(NODE_ROLLBACK_ANNOTATION) or "-",
                record.get(NODE_CONFIRMED_ANNOTATION) or "-",
            ]
        )
    return object_rows, node_rows
