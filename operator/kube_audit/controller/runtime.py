"""One pod's reconciler: coalesce changes, plan, take the rollout lease, apply, report status.

Handlers only record what they see and wake the loop; all decisions happen here, in one task,
so a burst of 1,000 changes becomes one plan and at most one apiserver restart per node.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import secrets as random_tokens
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from kube_audit import hostfs
from kube_audit.agent.health import Expectation, HealthCheck, mirror_pod_verdict
from kube_audit.agent.layout import DEFAULT_KUBELET_CONFIG, HostLayout
from kube_audit.agent.node import (
    NodeResult,
    apply_node,
    health_check,
    needs_change,
    read_state,
    resume_node,
)
from kube_audit.controller import lease
from kube_audit.controller.aio import sleep_unless_stopped
from kube_audit.controller.metrics import Metrics
from kube_audit.controller.store import ROTATE_ANNOTATION, ObjectStore
from kube_audit.core.models import AUDIT_POLICY, AUDIT_USER, AuditUser, parse_audit_user
from kube_audit.core.plan import DesiredState, collect_inputs, plan_desired
from kube_audit.core.settings import Settings
from kube_audit.core.status import (
    APPLIED,
    BLOCKED,
    INVALID,
    PENDING,
    ROLLED_BACK,
    compute_conditions,
    conditions_differ,
    entry_differs,
    node_entry,
)
from kube_audit.core.users import secret_location
from kube_audit.errors import (
    ClusterError,
    InvalidInput,
    KubeAuditError,
    NotFound,
    Problem,
    RolledBack,
)
from kube_audit.kube import ROTATED_FOR, KubeApi

log = logging.getLogger("kube_audit.operator")
ROLLOUT_LEASE = "kube-audit-rollout"
STATUS_LEASE = "kube-audit-status"
PLURALS = {AUDIT_USER: "auditusers", AUDIT_POLICY: "auditpolicies"}
API_CONCURRENCY = 8
SYNC_RELIST = 10.0


@dataclass(frozen=True)
class OperatorConfig:
    node_name: str
    host_root: Path = Path("/")
    kubelet_config: str = DEFAULT_KUBELET_CONFIG
    settings: Settings = field(default_factory=Settings)
    namespace: str = "kube-audit"
    debounce: float = 3.0
    max_debounce: float = 30.0
    resync: float = 300.0
    health_url: str | None = None
    timeout: float = 180.0
    no_wait: bool = False
    lease_poll: float = 2.0
    manifest_poll: float = 2.0
    retry_backoff: float = 5.0
    health_factory: Callable[[HostLayout], HealthCheck | None] | None = None

    @property
    def rollout_lease_seconds(self) -> int:
        return int(2 * self.timeout + 120)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class NodeReport(NamedTuple):
    """What one reconcile tells the objects: the plan's hash and problems, and the outcome."""

    config_hash: str
    problems: tuple[Problem, ...]
    outcome: str
    message: str


class NodeRuntime:
    """The reconciler of one control-plane node."""

    def __init__(self, config: OperatorConfig, api: KubeApi, metrics: Metrics | None = None):
        self.config = config
        self.api = api
        self.metrics = metrics or Metrics()
        self.store = ObjectStore()
        self.applies: deque[NodeResult] = deque(maxlen=100)
        self._plan_wanted = asyncio.Event()
        self._status_wanted = asyncio.Event()
        self._last_change = 0.0
        self._first_change = 0.0
        self._holding_rollout = False
        self._stop = asyncio.Event()
        self._wanted_cache: tuple[int, set[tuple[str, str]]] = (-1, set())
        self._failures = 0
        self._logged_live: str | None = None
        self._secrets_list_started = 0
        self._released_stale_lease = False

    # -- what handlers call ----------------------------------------------------------------

    def observe(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Record a watch event; wake the loop for a new plan or only a status update."""
        if event_type == "DELETED":
            changed = self.store.remove(kind, body)
        else:
            changed = self.store.upsert(kind, body)
        if changed:
            self._wake_plan()
        elif kind != "secrets":
            self._status_wanted.set()

    def observe_secret(
        self, event_type: str, namespace: str | None, body: Mapping[str, Any]
    ) -> None:
        """A Secret event from the cluster-wide watch: kept only if some AuditUser reads it."""
        name = (body.get("metadata") or {}).get("name")
        if self.secret_is_wanted(namespace, name):
            self.observe("secrets", event_type, body)

    def secrets_listing(self) -> None:
        """The Secret watch starts a complete list (first, or again after an error)."""
        self._secrets_list_started = self.store.sequence

    def secrets_listed(self, keys: set[tuple[str, str]]) -> None:
        """The list is complete: Secrets it lacks were deleted while the watch was down."""
        if self.store.forget_unlisted("secrets", keys, self._secrets_list_started):
            self._wake_plan()

    def node_changed(self) -> None:
        self._status_wanted.set()

    def secret_is_wanted(self, namespace: str | None, name: str | None) -> bool:
        """Only Secrets some AuditUser reads are kept (the watch sees every Secret)."""
        key = (namespace or "", name or "")
        return self.store.has("secrets", key) or key in self._wanted_secrets()

    def _wanted_secrets(self) -> set[tuple[str, str]]:
        """Secret keys the users refer to, recomputed only when the users change."""
        version = self.store.user_version
        if self._wanted_cache[0] != version:
            wanted = set()
            for _, body in self.store.items("auditusers"):
                try:
                    user = parse_audit_user(body)
                except InvalidInput:
                    continue
                ns, secret, _ = secret_location(user, self.config.settings)
                wanted.add((ns, secret))
            self._wanted_cache = (version, wanted)
        return self._wanted_cache[1]

    def _wake_plan(self) -> None:
        loop_time = asyncio.get_running_loop().time()
        if not self._plan_wanted.is_set():
            self._first_change = loop_time
        self._last_change = loop_time
        self._plan_wanted.set()

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile after each quiet debounce window, and every ``resync`` seconds anyway."""
        loop = asyncio.get_running_loop()
        self._stop = stop
        await self._resume_local()
        await self.wait_synced(stop)
        self._wake_plan()
        watch = asyncio.create_task(self._watch_manifest(stop))
        try:
            await self._loop(stop, loop)
        finally:
            watch.cancel()

    async def _resume_local(self) -> None:
        """Before anything needs the API: a pod killed during the health wait left it open.
        Verify that apiserver or roll it back now; on a single node with a bad config the API
        would never come back for the usual path to do it."""
        try:
            layout = self._layout()
            result = await asyncio.to_thread(resume_node, layout, self._health(layout))
        except RolledBack as error:
            self.metrics.rollbacks.inc()
            log.error("%s: resumed the wait and rolled back: %s", self.config.node_name, error)
        except KubeAuditError as error:
            log.warning("could not resume the previous health wait: %s", error)
        else:
            if result is not None:
                log.info("%s: resumed the wait: %s", self.config.node_name, result.message)

    async def _watch_manifest(self, stop: asyncio.Event) -> None:
        """Plan again when someone else rewrites the manifest (``kubeadm upgrade`` does, and
        drops our flags): the identities come back within seconds, not at the next resync."""
        seen: tuple[int, int, int] | None = None
        while not stop.is_set():
            try:
                current = hostfs.file_signature(self._layout().manifest)
            except KubeAuditError:
                current = None
            if seen is not None and current is not None and current != seen:
                self._wake_plan()
            seen = current if current is not None else seen
            await sleep_unless_stopped(stop, self.config.manifest_poll)

    async def _loop(self, stop: asyncio.Event, loop: asyncio.AbstractEventLoop) -> None:
        while not stop.is_set():
            await self._wait(stop)
            if stop.is_set():
                return
            await self._debounce(stop, loop)
            plan = self._plan_wanted.is_set()
            self._plan_wanted.clear()
            self._status_wanted.clear()
            try:
                if plan:
                    await self.wait_synced(stop)
                    await self.reconcile(stop)
                else:
                    await self.update_status()
                self.metrics.last_success.set_to_current_time()
                self._failures = 0
                release_memory()
            except KubeAuditError as error:
                log.warning("reconcile failed, will retry: %s", error)
                await self._back_off(stop)
            except Exception:
                log.exception("reconcile crashed, will retry")
                await self._back_off(stop)

    async def wait_synced(self, stop: asyncio.Event) -> None:
        """Plan only from the cluster's current view of every AuditUser and AuditPolicy.

        kopf lists each kind on its own and 10,000 users take a while; a watch can also be
        failing for a while (a CRD whose storage is still initializing answers 429). A plan
        made from a half-loaded view would drop users or the policy and restart the apiserver
        twice. And a watch that re-lists (after every apiserver restart we cause) never reports
        what was deleted meanwhile: a deleted user would keep a working token. So before every
        plan both kinds are listed (name and uid): what the list lacks is forgotten, what the
        store lacks (or has with another uid: deleted and made again) is waited for. The names
        are listed again now and then, so an object deleted meanwhile is not waited for.
        """
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            missing: set[tuple[str, str, str]] = set()
            try:
                for plural in PLURALS.values():
                    since = self.store.sequence
                    listed = await asyncio.to_thread(self.api.list_uids, plural)
                    gone = self.store.forget_unlisted(plural, set(listed), since)
                    if gone:
                        log.info("%s deleted while unwatched: %s", plural, ", ".join(gone))
                    missing.update((plural, name, uid) for name, uid in listed.items())
            except KubeAuditError as error:
                log.warning("cannot list the objects yet, will retry: %s", error)
                await sleep_unless_stopped(stop, self.config.retry_backoff)
                continue
            relist_at = loop.time() + SYNC_RELIST
            while not stop.is_set():
                missing = {m for m in missing if self.store.uid(m[0], m[1]) != m[2]}
                if not missing:
                    return
                if loop.time() >= relist_at:
                    log.info("watches still miss %d listed objects; listing again", len(missing))
                    break
                await sleep_unless_stopped(stop, 0.1)

    async def _back_off(self, stop: asyncio.Event) -> None:
        """Retry later, doubling the wait up to 30 s (the apiserver may be restarting)."""
        self.metrics.failures.inc()
        self._failures += 1
        self._plan_wanted.set()
        delay = min(self.config.retry_backoff * 2 ** (self._failures - 1), 30.0)
        await sleep_unless_stopped(stop, delay)

    async def _wait(self, stop: asyncio.Event) -> None:
        waiters = [
            asyncio.ensure_future(e.wait()) for e in (self._plan_wanted, self._status_wanted, stop)
        ]
        done, pending = await asyncio.wait(
            waiters, timeout=self.config.resync, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        if not done:
            self._plan_wanted.set()

    async def _debounce(self, stop: asyncio.Event, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until no change came for ``debounce`` seconds (at most ``max_debounce``)."""
        while not stop.is_set() and self._plan_wanted.is_set():
            now = loop.time()
            quiet_at = self._last_change + self.config.debounce
            give_up_at = self._first_change + self.config.max_debounce
            wake = min(quiet_at, give_up_at)
            if now >= wake:
                return
            await sleep_unless_stopped(stop, wake - now)

    # -- one reconcile -----------------------------------------------------------------------

    def _layout(self) -> HostLayout:
        return HostLayout.discover(
            self.config.host_root, self.config.settings, self.config.kubelet_config
        )

    def _health(self, layout: HostLayout) -> HealthCheck | None:
        c = self.config
        if c.health_factory is not None:
            return c.health_factory(layout)
        check = health_check(layout, url=c.health_url, timeout=c.timeout, no_wait=c.no_wait)
        if check is not None:
            check.instance = self._prove_instance
        return check

    def _prove_instance(self, want: Expectation) -> tuple[bool | None, str]:
        """The mirror pod's verdict; None where the API cannot tell (no pod, no permission)."""
        try:
            pod = self.api.mirror_pod(self.config.node_name)
        except ClusterError as error:
            if error.status in (401, 403):
                return None, f"cannot read the mirror pod: {error}"
            raise
        return mirror_pod_verdict(pod, want)

    def _users(self) -> Iterator[tuple[dict[str, Any], AuditUser]]:
        """Valid users, decoded one at a time (never all 10,000 at once)."""
        for _, body in self.store.items("auditusers"):
            try:
                yield body, parse_audit_user(body)
            except InvalidInput:
                continue

    async def ensure_tokens(self, stop: asyncio.Event) -> None:
        """Create missing default token Secrets, rotate on request, fetch referenced ones.

        One list call learns which of our Secrets exist; a create that loses a race to another
        pod (409) reads the winner's Secret, so every pod serves the same token.
        """
        settings = self.config.settings
        if any(
            user.spec.token_secret_ref is None
            and not self.store.has("secrets", secret_location(user, settings)[:2])
            for _, user in self._users()
        ):
            for raw in await asyncio.to_thread(
                self.api.list_token_secrets, settings.token_namespace
            ):
                self.store.upsert("secrets", raw)

        async def one(body: Mapping[str, Any], user: AuditUser) -> None:
            ns, name, _ = secret_location(user, settings)
            if not self.store.has("secrets", (ns, name)):
                await self._fetch_or_create(body, user, ns, name)
            await self._rotate_if_asked(user, ns, name)

        await self._concurrently((functools.partial(one, b, u) for b, u in self._users()), stop)

    async def _concurrently(
        self, jobs: Iterable[Callable[[], Awaitable[None]]], stop: asyncio.Event
    ) -> None:
        """Run API jobs, a few in flight, pulling them lazily: with 10,000 users neither all
        jobs nor all their objects exist at once."""
        source = iter(jobs)

        async def worker() -> None:
            for job in source:
                if stop.is_set():
                    return
                await job()

        await asyncio.gather(*(worker() for _ in range(API_CONCURRENCY)))

    async def _fetch_or_create(
        self, body: Mapping[str, Any], user: AuditUser, ns: str, name: str
    ) -> None:
        raw: dict[str, Any] | None = None
        if user.spec.token_secret_ref is None and not user.spec.disabled:
            owner = {
                "apiVersion": body.get("apiVersion", "kube-audit.io/v1alpha1"),
                "kind": AUDIT_USER,
                "name": user.meta.name,
                "uid": user.meta.uid,
                "blockOwnerDeletion": False,
            }
            token = random_tokens.token_urlsafe(32)
            raw = await asyncio.to_thread(self.api.create_token_secret, ns, name, token, owner)
            log.info("token Secret %s/%s %s", ns, name, "created" if raw else "made by another pod")
        if raw is None:
            found = await asyncio.to_thread(self.api.read_secret, ns, name)
            raw = found[1] if found is not None else None
        if raw is not None:
            self.store.upsert("secrets", raw)

    async def _rotate_if_asked(self, user: AuditUser, ns: str, name: str) -> None:
        """Rotate once per value of the rotate annotation (recorded on the Secret)."""
        nonce = user.meta.annotations.get(ROTATE_ANNOTATION)
        raw = self.store.get("secrets", (ns, name))
        if not nonce or raw is None or user.spec.token_secret_ref is not None:
            return
        meta = raw.get("metadata") or {}
        if (meta.get("annotations") or {}).get(ROTATED_FOR) == nonce:
            return
        await asyncio.to_thread(
            self.api.rotate_token_secret,
            ns,
            name,
            random_tokens.token_urlsafe(32),
            nonce,
            str(meta.get("resourceVersion") or ""),
        )
        found = await asyncio.to_thread(self.api.read_secret, ns, name)
        if found is not None:
            self.store.upsert("secrets", found[1])

    def plan(self) -> DesiredState:
        return plan_desired(collect_inputs(self.store.documents()), self.config.settings)

    async def reconcile(self, stop: asyncio.Event) -> None:
        await self.ensure_tokens(stop)
        report = await self._converge(stop)
        await self._write_node_status(report)
        await self.update_status()

    async def _converge(self, stop: asyncio.Event) -> NodeReport:
        """Plan and, if the host differs, roll out. At most one plan is alive at a time and only
        the small report outlives it: 10,000 users' models are gone before the status writes."""
        desired = self.plan()
        layout = self._layout()
        if not await asyncio.to_thread(needs_change, layout, desired):
            if self._holding_rollout or not self._released_stale_lease:
                # A pod of this node killed mid-rollout left the Lease in our name: the other
                # nodes would wait for it to expire.
                await self._release_rollout({})
                self._released_stale_lease = True
            if self._logged_live != desired.config_hash:
                self._logged_live = desired.config_hash
                log.info(
                    "%s: unchanged, the node runs config %s",
                    self.config.node_name,
                    desired.config_hash[:16] or "(none)",
                )
            return NodeReport(desired.config_hash, desired.problems, APPLIED, "live")
        if desired.config_hash in read_state(layout).get("failed", []):
            return NodeReport(
                desired.config_hash,
                desired.problems,
                ROLLED_BACK,
                "this configuration failed on this node and was rolled back",
            )
        stopped = NodeReport(desired.config_hash, desired.problems, BLOCKED, "operator stopping")
        del desired
        return await self._rollout(layout, stop) or stopped

    async def _rollout(self, layout: HostLayout, stop: asyncio.Event) -> NodeReport | None:
        """Apply under the rollout lease, planning again once it is held: waiting for the
        other nodes can take minutes, and the objects may have changed meanwhile. None if the
        operator stopped before the lease was free."""
        c = self.config
        holder = c.node_name
        if not await lease.acquire(
            self.api,
            namespace=c.namespace,
            name=ROLLOUT_LEASE,
            holder=holder,
            duration=c.rollout_lease_seconds,
            poll=c.lease_poll,
            stop=stop,
        ):
            return None
        self._holding_rollout = True
        note: str | None = None
        interrupted = False
        try:
            desired = self.plan()

            def report(outcome: str, message: str) -> NodeReport:
                return NodeReport(desired.config_hash, desired.problems, outcome, message)

            failed = await asyncio.to_thread(
                lease.annotation, self.api, c.namespace, ROLLOUT_LEASE, lease.FAILED_ANNOTATION
            )
            if failed and failed == desired.config_hash:
                return report(BLOCKED, "rollout stopped: this configuration failed on another node")
            try:
                result = await asyncio.to_thread(
                    apply_node, layout, desired, self._health(layout), retry_failed=False
                )
            except asyncio.CancelledError:
                interrupted = True  # the apply goes on in its thread: this node is restarting
                raise
            except RolledBack as error:
                self.metrics.rollbacks.inc()
                self.metrics.restarts.inc(2)
                note = error.failed_hash
                log.error("rolled back on %s: %s", holder, error)
                return report(ROLLED_BACK, str(error))
            self.applies.append(result)
            if result.outcome == "skipped-failed":
                return report(ROLLED_BACK, result.message)
            self.metrics.applies.inc()
            if result.restarted:
                self.metrics.restarts.inc()
            log.info("%s: %s", holder, result.message)
            return report(APPLIED, result.message)
        finally:
            if interrupted:
                # Releasing now would let the next node restart while this one still is (two
                # apiservers down). The next pod on this node resumes the wait and releases it;
                # if none comes, the Lease expires.
                log.warning(
                    "%s: stopping during an apply; keeping the rollout Lease for this node's "
                    "next pod to finish the wait",
                    holder,
                )
            else:
                await self._release_rollout({lease.FAILED_ANNOTATION: note} if note else {})

    async def _release_rollout(self, annotations: dict[str, str | None]) -> None:
        """Let the next node go; if the API is down now, the next reconcile releases it."""
        c = self.config
        await asyncio.to_thread(
            lease.release, self.api, c.namespace, ROLLOUT_LEASE, c.node_name, annotations
        )
        self._holding_rollout = False

    async def _write_node_status(self, report: NodeReport) -> None:
        """This node's entry on every object whose entry changed, with an Event for each."""
        outcome, message = report.outcome, report.message
        problems: dict[str, list[str]] = {}
        waiting: set[str] = set()
        for problem in report.problems:
            problems.setdefault(problem.obj, []).append(
                f"{problem.field}: {problem.message}" if problem.field else problem.message
            )
            if problem.pending:
                waiting.add(problem.obj)
        waiting -= {p.obj for p in report.problems if not p.pending}
        now = _now()
        node = self.config.node_name

        def jobs() -> Iterator[Callable[[], Awaitable[None]]]:
            for kind, plural in PLURALS.items():
                for name, body in self.store.items(plural):
                    generation = int((body.get("metadata") or {}).get("generation") or 0)
                    old = ((body.get("status") or {}).get("nodes") or {}).get(node)
                    if f"{kind}/{name}" in problems:
                        entry_outcome = PENDING if f"{kind}/{name}" in waiting else INVALID
                        text = "; ".join(problems[f"{kind}/{name}"])
                    elif outcome == APPLIED:
                        entry_outcome, text = APPLIED, f"live (config {report.config_hash[:16]})"
                    elif (
                        old
                        and old.get("outcome") == APPLIED
                        and old.get("observedGeneration") == generation
                    ):
                        continue
                    else:
                        entry_outcome, text = outcome, message
                    entry = node_entry(
                        generation=generation,
                        config_hash=report.config_hash,
                        outcome=entry_outcome,
                        message=text,
                        time=now,
                    )
                    if entry_differs(old, entry):
                        uid = str((body.get("metadata") or {}).get("uid") or "")
                        yield functools.partial(self._report, kind, name, uid, entry)

        await self._concurrently(jobs(), self._stop)
        self.metrics.invalid.set(len(problems))

    async def _patch_status(self, kind: str, name: str, patch: dict[str, Any]) -> bool:
        """Patch status; False when the object is gone (then it is forgotten: its delete may
        never have reached our watch)."""
        try:
            await asyncio.to_thread(self.api.patch_status, PLURALS[kind], name, patch)
        except NotFound:
            if self.store.forget(PLURALS[kind], name):
                self._wake_plan()
            return False
        return True

    async def _report(self, kind: str, name: str, uid: str, entry: dict[str, Any]) -> None:
        """Write one node entry and the Event that goes with it."""
        node = self.config.node_name
        if not await self._patch_status(kind, name, {"nodes": {node: entry}}):
            return
        self.store.merge_status(PLURALS[kind], name, {"nodes": {node: entry}})
        outcome = entry["outcome"]
        await asyncio.to_thread(
            self.api.create_event,
            {"metadata": {"name": name, "uid": uid}},
            kind,
            "Normal" if outcome in (APPLIED, PENDING) else "Warning",
            {APPLIED: "Applied", INVALID: "Refused"}.get(outcome, outcome),
            f"node {node}: {entry['message']}",
        )

    async def update_status(self) -> None:
        """If this pod owns status, turn node entries into kstatus conditions."""
        c = self.config
        owner = await asyncio.to_thread(
            lease.try_acquire, self.api, c.namespace, STATUS_LEASE, c.node_name, 60
        )
        if not owner:
            return
        nodes = await asyncio.to_thread(self.api.control_plane_nodes)
        now = _now()

        def jobs() -> Iterator[Callable[[], Awaitable[None]]]:
            for kind, plural in PLURALS.items():
                for name, body in self.store.items(plural):
                    patch = {**compute_conditions(body, nodes, now), **_columns(kind, body)}
                    if conditions_differ(body.get("status") or {}, patch):
                        yield functools.partial(self._write_conditions, kind, name, patch)

        await self._concurrently(jobs(), self._stop)

    async def _write_conditions(self, kind: str, name: str, patch: dict[str, Any]) -> None:
        if await self._patch_status(kind, name, patch):
            self.store.merge_status(PLURALS[kind], name, patch)


def release_memory() -> None:
    """Hand freed heap back to the OS after a big reconcile (glibc keeps it otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _columns(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """Status fields behind the printer columns that JSONPath cannot compute."""
    spec = body.get("spec") or {}
    if kind == AUDIT_USER:
        return {"username": spec.get("username") or (body.get("metadata") or {}).get("name")}
    rules = spec.get("rules")
    return {"ruleCount": len(rules) if isinstance(rules, list) else 0}
