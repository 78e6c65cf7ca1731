"""One pod's reconciler: event intake → token Secrets → plan → rollout → health → status.

Each stage is a module of its own; this one only runs them in order, in one task, and decides
what a failure means: a transient one is retried with back-off, a permanent one (bad input, a
node we must not manage) is reported on the objects and waits for a change or the resync.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
from collections.abc import Mapping
from typing import Any

from kube_audit.constants import AUDIT_USER, PLURALS
from kube_audit.controller.clock import Clock, SystemClock
from kube_audit.controller.config import OperatorConfig
from kube_audit.controller.intake import Intake
from kube_audit.controller.metrics import Metrics
from kube_audit.controller.rollout import NodeReport, Planned, Rollout
from kube_audit.controller.shipping import ShippingReporter
from kube_audit.controller.status import StatusWriter
from kube_audit.controller.tokens import TokenSecrets
from kube_audit.core.plan import collect_inputs, plan_desired
from kube_audit.core.status import PENDING
from kube_audit.errors import ClusterError, KubeAuditError
from kube_audit.kube import KubeApi

log = logging.getLogger("kube_audit.operator")
MAX_BACKOFF = 30.0


class NodeRuntime:
    """The reconciler of one control-plane node."""

    def __init__(
        self,
        config: OperatorConfig,
        api: KubeApi,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.api = api
        self.metrics = metrics or Metrics()
        self.clock = clock or SystemClock()
        self.intake = Intake(config, api, self.clock)
        self.store = self.intake.store
        self.tokens = TokenSecrets(
            api, self.store, config.settings, self.intake.unreadable, self.secrets_forbidden
        )
        self.rollout = Rollout(config, api, self.clock, self.metrics, self.plan)
        self.status = StatusWriter(
            config,
            api,
            self.clock,
            store=self.store,
            metrics=self.metrics,
            on_gone=self.intake.wake_plan,
        )
        self.applies = self.rollout.applies
        self.shipping = ShippingReporter(self.status)
        # Set once the node is settled: the first reconcile ended (applied, unchanged, or a
        # permanent failure shown on the objects). The pod's readiness.
        self.settled = asyncio.Event()
        self._failures = 0
        # Epoch seconds of the earliest spec.expiresAt still ahead (the last plan's).
        self._next_expiry: float | None = None

    # -- what the watches call ---------------------------------------------------------------

    def observe(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        self.intake.observe(kind, event_type, body)

    def observe_secret(self, event_type: str, body: Mapping[str, Any]) -> None:
        self.intake.observe_secret(event_type, body)

    def secrets_listing(self, namespace: str) -> None:
        self.intake.secrets_listing(namespace)

    def secrets_listed(self, namespace: str, keys: set[tuple[str, str]]) -> None:
        self.intake.secrets_listed(namespace, keys)

    def secrets_forbidden(self, namespace: str, message: str) -> None:
        self.intake.secrets_forbidden(namespace, message)

    def secrets_unwatched(self, namespace: str) -> None:
        self.intake.secrets_unwatched(namespace)

    def node_changed(self) -> None:
        self.intake.node_changed()

    # -- the loop ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Resume this node's own unfinished apply, load the cluster's view, then reconcile
        after each quiet debounce window and every ``resync`` seconds. Raises if one of its
        tasks crashes: the process then exits and the DaemonSet starts a new pod, rather than
        one that looks alive and no longer reconciles."""
        await self.rollout.resume_local()
        await self.intake.wait_synced(stop)
        self.intake.wake_plan()
        tasks = [
            asyncio.create_task(self._loop(stop), name="reconcile"),
            asyncio.create_task(self.intake.watch_manifest(stop), name="manifest watch"),
            asyncio.create_task(self._show_changes(stop), name="status on change"),
            asyncio.create_task(self.shipping.run(stop), name="shipping report"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._hand_over_status()

    async def _hand_over_status(self) -> None:
        """A pod that stops gives up the status Lease, so another pod writes conditions at
        once instead of after the Lease expires (a DaemonSet update stops every pod in turn)."""
        with contextlib.suppress(KubeAuditError, TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(self.status.owner.release), 5)

    async def wait_synced(self, stop: asyncio.Event) -> None:
        await self.intake.wait_synced(stop)

    async def _show_changes(self, stop: asyncio.Event) -> None:
        """A changed object reads Reconciling with its new observedGeneration as soon as it is
        seen, even while a rollout for another change takes minutes: until then its status
        said Ready for the generation before, which `kubectl wait --for=condition=Ready` takes
        as done. Best effort: the reconcile writes the same conditions after its rollout. Only
        after the first reconcile: before it, the tokens each node must serve are not known."""
        seen = self.intake.change_seen
        await _first_of(self.settled, stop)
        seen.clear()  # the first reconcile judged all it listed: no second pass over them
        while not stop.is_set():
            await _first_of(seen, stop)
            if stop.is_set():
                return
            seen.clear()
            try:
                errors = await self.status.update_conditions(stop)
            except KubeAuditError as failure:
                errors = [failure]
            for problem in errors:
                log.debug("status of a change not shown yet: %s", problem)

    async def _loop(self, stop: asyncio.Event) -> None:
        while (plan := await self.intake.next_work(stop)) is not None:
            try:
                if plan:
                    report = await self.reconcile(stop)
                    self.settled.set()
                    if self._next_expiry is not None:
                        # The plan at that time leaves the person out (the token file's line;
                        # the webhook refuses at that second by itself) and says Expired.
                        wait = self._next_expiry - self.clock.now().timestamp()
                        self.intake.plan_again_in(wait)
                    if report.retry_at is not None:
                        wait = report.retry_at - self.clock.now().timestamp()
                        self.intake.plan_again_in(wait)
                    if report.permanent or report.retry_at is not None:
                        if report.outcome != PENDING:
                            self.metrics.failures.inc()
                        continue  # shown on the objects; wait for a change, the retry, the resync
                else:
                    _raise_if_any(await self.status.update_conditions(stop))
                self.metrics.last_success.set_to_current_time()
                self._failures = 0
                release_memory()
            except KubeAuditError as error:
                log.warning("reconcile failed, will retry: %s", error)
                await self._back_off(stop)
            except Exception:
                log.exception("reconcile crashed, will retry")
                await self._back_off(stop)

    async def reconcile(self, stop: asyncio.Event) -> NodeReport:
        await self.intake.wait_synced(stop)
        errors = await self.tokens.ensure(stop)
        report = await self.rollout.converge(stop)
        errors += await self.status.write_node(report, stop)
        errors += await self.status.update_conditions(stop)
        _raise_if_any(errors)
        return report

    def plan(self) -> Planned:
        """The plan from the store, with the generation of every object that went into it."""
        generations: dict[str, int] = {}

        def documents() -> Any:
            for source, body in self.store.documents():
                if source.partition("/")[0] in PLURALS:
                    meta = body.get("metadata") or {}
                    generations[source] = int(meta.get("generation") or 0)
                yield source, body

        now = self.clock.now()
        desired = plan_desired(
            collect_inputs(documents()),
            self.config.settings,
            unreadable=frozenset(self.intake.unreadable),
            now=now,
        )
        tokens = {f"{AUDIT_USER}/{name}": digest for name, digest in desired.users.tokens}
        self.metrics.expiry.clear()
        for name, expires in desired.users.expiries:
            self.metrics.expiry.labels(name).set((expires - now).total_seconds())
        for name in desired.users.expired:
            self.metrics.expiry.labels(name).set(0)
        upcoming = [expires for _, expires in desired.users.expiries]
        self._next_expiry = min(upcoming).timestamp() if upcoming else None
        return Planned(desired, generations, tokens)

    async def _back_off(self, stop: asyncio.Event) -> None:
        """Retry later, doubling the wait up to 30 s (the apiserver may be restarting)."""
        self.metrics.failures.inc()
        self._failures += 1
        self.intake.retry_later()
        delay = min(self.config.retry_backoff * 2 ** (self._failures - 1), MAX_BACKOFF)
        await self.clock.sleep(delay, stop)


async def _first_of(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()


def _raise_if_any(errors: list[KubeAuditError]) -> None:
    """Per-object failures were logged and the others went on; retry the reconcile."""
    if errors:
        raise ClusterError(f"{len(errors)} API call(s) failed, the first: {errors[0]}")


def release_memory() -> None:
    """Hand freed heap back to the OS after a big reconcile (glibc keeps it otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
