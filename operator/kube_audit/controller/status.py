"""Status: what one reconcile tells the users, and only what changed.

Each node writes its record (a Lease of its own: config hash, outcome, times) and its entry
``status.nodes.<node>`` on the objects whose entry changed, with one Event for each. The pod
that holds the status Lease turns entries into kstatus conditions and prunes the entries of
nodes that left the control plane. One new user on three nodes: a few patches and Events,
not one per object.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from kube_audit.constants import (
    AUDIT_USER,
    NODE_APPLIED_ANNOTATION,
    NODE_CONFIG_ANNOTATION,
    NODE_CONFIRMED_ANNOTATION,
    NODE_MESSAGE_ANNOTATION,
    NODE_OUTCOME_ANNOTATION,
    NODE_ROLLBACK_ANNOTATION,
    PLURALS,
    STATUS_LEASE,
)
from kube_audit.controller.aio import run_bounded
from kube_audit.controller.clock import Clock, micro_time, rfc3339
from kube_audit.controller.config import OperatorConfig
from kube_audit.controller.lease import LeaseLock
from kube_audit.controller.metrics import Metrics
from kube_audit.controller.rollout import NodeReport
from kube_audit.controller.store import ObjectStore
from kube_audit.core.status import (
    APPLIED,
    BLOCKED,
    EXPIRED,
    INVALID,
    PENDING,
    ROLLED_BACK,
    STALE,
    compute_conditions,
    conditions_differ,
    entry_differs,
    entry_patch,
    node_entry,
    stale_snapshots,
)
from kube_audit.errors import KubeAuditError, NotFound
from kube_audit.kube import KubeApi

log = logging.getLogger("kube_audit.operator")
EVENT_REASONS = {
    APPLIED: "Applied",
    INVALID: "Refused",
    PENDING: "Pending",
    ROLLED_BACK: "RolledBack",
    BLOCKED: "Blocked",
    EXPIRED: "Expired",
    STALE: "SnapshotStale",
}
STATUS_LEASE_SECONDS = 60
# Per-object Events one reconcile posts on one node; the rest are counted into one Event per
# outcome on the Node (10,000 people on three nodes would otherwise be 30,000 Events at once).
EVENTS_PER_RECONCILE = 20


class StatusWriter:
    def __init__(
        self,
        config: OperatorConfig,
        api: KubeApi,
        clock: Clock,
        *,
        store: ObjectStore,
        metrics: Metrics,
        on_gone: Callable[[], None],
    ) -> None:
        self.config = config
        self.api = api
        self.clock = clock
        self.store = store
        self.metrics = metrics
        self.on_gone = on_gone
        self.owner = LeaseLock(
            api,
            clock,
            namespace=config.namespace,
            name=STATUS_LEASE,
            holder=config.node_name,
            duration=STATUS_LEASE_SECONDS,
        )
        self._record: tuple[str, str, str, str | None] | None = None
        # Conditions are written by the reconcile and, while it waits on a rollout, by the
        # status task: one at a time, so an older computation never lands after a newer one.
        self._conditions_lock = asyncio.Lock()
        # The last plan's token fingerprints: conditions call a person Ready only where a node
        # serves the current one.
        self._tokens: Mapping[str, str] = {}
        self._events_left = EVENTS_PER_RECONCILE
        self._events_over: dict[str, int] = {}
        # Nodes the owner has posted a stale-snapshot Event for (one per episode).
        self._stale_shown: set[str] = set()
        # The owner's last Shipping condition for every AuditPolicy (controller.shipping).
        self.shipping: dict[str, str] | None = None

    async def write_node(self, report: NodeReport, stop: asyncio.Event) -> list[KubeAuditError]:
        """This node's record, then its entry on every object whose entry changed."""
        errors: list[KubeAuditError] = []
        try:
            await self._write_record(report)
        except KubeAuditError as error:
            log.warning("node record: %s", error)
            errors.append(error)
        problems: dict[str, list[str]] = {}
        waiting: set[str] = set()
        for problem in report.problems:
            problems.setdefault(problem.obj, []).append(
                f"{problem.field}: {problem.message}" if problem.field else problem.message
            )
            if problem.pending:
                waiting.add(problem.obj)
        waiting -= {p.obj for p in report.problems if not p.pending}
        now = rfc3339(self.clock.now())
        node = self.config.node_name
        self._tokens = report.tokens
        self._events_left, self._events_over = EVENTS_PER_RECONCILE, {}

        def jobs() -> Iterator[Callable[[], Awaitable[None]]]:
            for kind, plural in PLURALS.items():
                for name, body in self.store.items(plural):
                    ref = f"{kind}/{name}"
                    generation = report.generations.get(ref)
                    if generation is None:
                        continue  # arrived after the plan: the next plan reports it
                    old = ((body.get("status") or {}).get("nodes") or {}).get(node)
                    # What this node serves for a person: the plan's token once applied, the
                    # one it had until then.
                    served = (old or {}).get("token") if kind == AUDIT_USER else None
                    if ref in problems:
                        outcome = PENDING if ref in waiting else INVALID
                        text = "; ".join(problems[ref])
                    elif report.outcome == APPLIED:
                        outcome, text = APPLIED, "live"
                        served = report.tokens.get(ref) if kind == AUDIT_USER else None
                    elif (
                        old
                        and old.get("outcome") == APPLIED
                        and old.get("observedGeneration") == generation
                        and served == report.tokens.get(ref)
                    ):
                        continue  # still live here: the failed change was another object's
                    else:
                        outcome, text = report.outcome, report.message
                    entry = node_entry(
                        generation=generation,
                        outcome=outcome,
                        message=text,
                        time=now,
                        token=served,
                    )
                    if entry_differs(old, entry):
                        uid = str((body.get("metadata") or {}).get("uid") or "")
                        patch = {"nodes": {node: entry_patch(old, entry)}}
                        yield functools.partial(self._write_entry, kind, name, uid, patch, entry)

        errors += await run_bounded(jobs(), stop, "status")
        self.metrics.invalid.set(len(problems))
        await self._post_counted_events()
        return errors

    async def _post_counted_events(self) -> None:
        """One Event per outcome on this Node for the entries past the per-object budget."""
        node = self.config.node_name
        for outcome, count in sorted(self._events_over.items()):
            message = (
                f"node {node}: {count} more AuditUser/AuditPolicy object(s) {outcome} (each "
                f"object's status.nodes.{node} says so; per-object Events are limited to "
                f"{EVENTS_PER_RECONCILE} per reconcile)"
            )
            await self._post_event(
                {"metadata": {"name": node}}, "Node", outcome, message, api_version="v1"
            )
        self._events_over = {}

    async def _write_record(self, report: NodeReport) -> None:
        """The node's Lease: what it runs, its last outcome and, in webhook mode, when it last
        confirmed its snapshot (written when they change: each resync at the least there)."""
        record = (report.config_hash, report.outcome, report.message, report.confirmed)
        if record == self._record:
            return
        now = rfc3339(self.clock.now())
        notes: dict[str, str | None] = {
            NODE_OUTCOME_ANNOTATION: report.outcome,
            NODE_MESSAGE_ANNOTATION: report.message[:1024],
            # A merge patch: None removes it (the node left webhook mode).
            NODE_CONFIRMED_ANNOTATION: report.confirmed,
        }
        if report.outcome == APPLIED:
            notes[NODE_CONFIG_ANNOTATION] = report.config_hash
        if report.changed_node:
            notes[
                NODE_APPLIED_ANNOTATION if report.outcome == APPLIED else NODE_ROLLBACK_ANNOTATION
            ] = now
        await asyncio.to_thread(
            self.api.write_node_record,
            self.config.namespace,
            self.config.node_name,
            notes,
            micro_time(self.clock.now()),
        )
        self._record = record

    async def _write_entry(
        self, kind: str, name: str, uid: str, patch: dict[str, Any], entry: Mapping[str, Any]
    ) -> None:
        """Write one node entry and the Event that goes with it (best effort: an Event the
        API refuses never stops the status writes)."""
        if not await self.patch_status(kind, name, patch):
            return
        outcome = str(entry["outcome"])
        if self._events_left <= 0:
            self._events_over[outcome] = self._events_over.get(outcome, 0) + 1
            return
        self._events_left -= 1
        message = f"node {self.config.node_name}: {entry['message']}"
        await self._post_event({"metadata": {"name": name, "uid": uid}}, kind, outcome, message)

    async def _post_event(
        self,
        obj: Mapping[str, Any],
        kind: str,
        outcome: str,
        message: str,
        *,
        api_version: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Best effort: an Event the API refuses never stops the status writes."""
        extra = {"api_version": api_version} if api_version else {}
        try:
            await asyncio.to_thread(
                self.api.create_event,
                obj,
                kind,
                "Normal" if outcome in (APPLIED, PENDING) else "Warning",
                reason or EVENT_REASONS.get(outcome, outcome),
                message,
                **extra,
            )
        except KubeAuditError as error:
            log.debug("Event on %s/%s not posted: %s", kind, obj["metadata"]["name"], error)
        else:
            self.metrics.events.inc()

    async def post_node_event(
        self, node: str, reason: str, message: str, *, warning: bool = False
    ) -> None:
        outcome = STALE if warning else APPLIED
        await self._post_event(
            {"metadata": {"name": node}}, "Node", outcome, message, reason=reason, api_version="v1"
        )

    async def patch_status(self, kind: str, name: str, patch: dict[str, Any]) -> bool:
        """Patch status; False when the object is gone (then it is forgotten: its delete may
        never have reached our watch)."""
        plural = PLURALS[kind]
        try:
            await asyncio.to_thread(self.api.patch_status, plural, name, patch)
        except NotFound:
            if self.store.forget(plural, name):
                self.on_gone()
            return False
        self.metrics.status_patches.inc()
        self.store.merge_status(plural, name, patch)
        return True

    async def update_conditions(self, stop: asyncio.Event) -> list[KubeAuditError]:
        """If this pod owns status: conditions from the node entries, and the entries of nodes
        that are no longer control-plane nodes removed."""
        async with self._conditions_lock:
            return await self._update_conditions(stop)

    async def _update_conditions(self, stop: asyncio.Event) -> list[KubeAuditError]:
        owner = await asyncio.to_thread(self.owner.try_acquire)
        if not owner:
            return []
        nodes = await asyncio.to_thread(self.api.control_plane_nodes)
        now = rfc3339(self.clock.now())
        stale = await self._stale_snapshots(nodes, now)

        # Prune only from a list that holds this very node: never from an empty or odd answer.
        prune = self.config.node_name in nodes

        def jobs() -> Iterator[Callable[[], Awaitable[None]]]:
            for kind, plural in PLURALS.items():
                for name, body in self.store.items(plural):
                    status = body.get("status") or {}
                    entries = status.get("nodes") or {}
                    gone = {n: None for n in entries if prune and n not in nodes}
                    kept = {**status, "nodes": {n: e for n, e in entries.items() if n not in gone}}
                    token = self._tokens.get(f"{kind}/{name}") if kind == AUDIT_USER else None
                    judged = stale if kind == AUDIT_USER else None
                    extra = [self.shipping] if self.shipping and kind != AUDIT_USER else []
                    patch = {
                        **compute_conditions(
                            {**body, "status": kept}, nodes, now, token, judged, extra=extra
                        ),
                        **_columns(kind, body),
                    }
                    if gone or conditions_differ(status, patch):
                        if gone:
                            patch["nodes"] = gone
                        expired = _ready_reason(patch) == EXPIRED != _ready_reason(status)
                        yield functools.partial(
                            self._write_conditions, kind, name, patch, body if expired else None
                        )

        return await run_bounded(jobs(), stop, "status")

    async def _stale_snapshots(self, nodes: list[str], now: str) -> dict[str, str]:
        """Webhook mode: the nodes whose snapshot their operator has not confirmed within the
        bound, from the node records; a Warning Event on the Node when one becomes stale, a
        Normal one when it is confirmed again."""
        if self.config.settings.identity_mode != "webhook":
            self._stale_shown = set()
            return {}
        try:
            records = await asyncio.to_thread(self.api.node_records, self.config.namespace)
        except KubeAuditError as error:
            # Best effort: conditions are written whatever this says (and the webhook's own
            # metric still tells the snapshot's age).
            log.warning("node records not read, snapshot staleness not judged: %s", error)
            return {}
        stale = stale_snapshots(records, nodes, now, self.config.snapshot_stale_after)
        self.metrics.stale_snapshots.set(len(stale))
        for node in sorted(stale.keys() - self._stale_shown):
            log.warning("%s", stale[node])
            await self._post_event(
                {"metadata": {"name": node}}, "Node", STALE, stale[node], api_version="v1"
            )
        for node in sorted(self._stale_shown - stale.keys()):
            await self._post_event(
                {"metadata": {"name": node}},
                "Node",
                APPLIED,
                f"node {node}: its identity snapshot is confirmed current again",
                reason="SnapshotConfirmed",
                api_version="v1",
            )
        self._stale_shown = set(stale)
        return stale

    async def _write_conditions(
        self, kind: str, name: str, patch: dict[str, Any], expired: Mapping[str, Any] | None
    ) -> None:
        """The conditions; a person who just expired gets an Event too (once, by the owner)."""
        if await self.patch_status(kind, name, patch) and expired is not None:
            message = next(c["message"] for c in patch["conditions"] if c["type"] == "Ready")
            await self._post_event(expired, kind, EXPIRED, message)


def _ready_reason(status: Mapping[str, Any]) -> str | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready":
            return str(condition.get("reason"))
    return None


def _columns(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """Status fields behind the printer columns that JSONPath cannot compute."""
    spec = body.get("spec") or {}
    if kind == AUDIT_USER:
        return {"username": spec.get("username") or (body.get("metadata") or {}).get("name")}
    rules = spec.get("rules")
    return {"ruleCount": len(rules) if isinstance(rules, list) else 0}
