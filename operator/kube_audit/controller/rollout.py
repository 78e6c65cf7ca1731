"""Rollout: bring this node to the plan, one node of the cluster at a time.

A node that needs a change takes the rollout Lease, plans again (waiting can take minutes),
lets its agent write and wait for the new apiserver (health), and gives the Lease back, with
the config hash recorded on it if the new apiserver crashed with the config: the other nodes
never try that config (a change that only removes identities excepted). A failure that may be
transient is not recorded there: this node retries it with back-off (``core.retry``). The
Lease is renewed during the apply and kept when the apply is interrupted, so no second
apiserver restarts while this one is down. While a config is held back (a refused AuditPolicy
in it), the identities it takes away are taken away on their own (``core.plan.plan_revocation``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from kube_audit.agent.node import NodeAgent
from kube_audit.agent.records import NodeResult
from kube_audit.constants import FAILED_ANNOTATION, KEEP_FAILED, ROLLOUT_LEASE
from kube_audit.controller.clock import Clock, rfc3339
from kube_audit.controller.config import OperatorConfig
from kube_audit.controller.health import node_agent
from kube_audit.controller.lease import LeaseLock
from kube_audit.controller.metrics import Metrics
from kube_audit.core.plan import DesiredState
from kube_audit.core.retry import Hold
from kube_audit.core.status import APPLIED, BLOCKED, PENDING, ROLLED_BACK
from kube_audit.errors import (
    ClusterError,
    KubeAuditError,
    ManifestError,
    NodeConfigError,
    Problem,
    RewrittenDuringWait,
    RolledBack,
)
from kube_audit.kube import KubeApi

log = logging.getLogger("kube_audit.operator")
MARK_ATTEMPTS = 5
# How often to look again while kubelet has not yet run a manifest someone else wrote.
KUBELET_POLL = 5.0


@dataclass(frozen=True)
class Planned:
    """A plan and the generation of every object it was made from ("AuditUser/alice" -> 3):
    status reports what went into the plan, not what arrived during the health wait."""

    desired: DesiredState
    generations: Mapping[str, int]
    # "AuditUser/alice" -> fingerprint of the token the plan serves for her ("" disabled).
    tokens: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeReport:
    """What one reconcile tells the objects: the plan's hash and problems, and the outcome.
    ``permanent``: nothing will change until someone changes the input or the node."""

    config_hash: str
    problems: tuple[Problem, ...]
    generations: Mapping[str, int]
    outcome: str
    message: str
    permanent: bool = False
    # This reconcile changed the node (applied, or rolled back): the node record's times move
    # only then.
    changed_node: bool = False
    # Wall-clock seconds when a config held back by a failure is tried again.
    retry_at: float | None = None
    # The plan's token fingerprints (see ``Planned.tokens``).
    tokens: Mapping[str, str] = field(default_factory=dict)
    # Webhook mode: when this reconcile confirmed the node's identity snapshot current (RFC
    # 3339; None: not confirmed, or token-file mode). The node record carries it for others.
    confirmed: str | None = None


def held_by(report: NodeReport, hold: Hold) -> NodeReport:
    """A node that does not apply the plan now: why, and whether and when it tries again."""
    return replace(
        report,
        outcome=BLOCKED if hold.by_admin else PENDING if hold.waiting else ROLLED_BACK,
        message=hold.message,
        permanent=hold.retry_at is None,
        retry_at=hold.retry_at,
    )


def failed_configs(value: str | None) -> list[str]:
    return [h for h in (value or "").split(",") if h]


class Rollout:
    def __init__(
        self,
        config: OperatorConfig,
        api: KubeApi,
        clock: Clock,
        metrics: Metrics,
        plan: Callable[[], Planned],
    ) -> None:
        self.config = config
        self.api = api
        self.clock = clock
        self.metrics = metrics
        self.plan = plan
        self.lease = LeaseLock(
            api,
            clock,
            namespace=config.namespace,
            name=ROLLOUT_LEASE,
            holder=config.node_name,
            duration=config.rollout_lease_seconds,
        )
        self.applies: deque[NodeResult] = deque(maxlen=100)
        self._holding = False
        self._checked_stale = False
        self._unmarked: str | None = None
        self._logged_live: str | None = None
        self._logged_hold: str | None = None
        self._logged_behind = False
        self._logged_webhook: str | None = None
        self._confirmed: str | None = None

    def _agent(self) -> NodeAgent:
        return node_agent(self.config, self.api, lambda: self.clock.now().timestamp())

    async def resume_local(self) -> None:
        """Before anything needs the API: a pod killed during the health wait left it open.
        Verify that apiserver or roll it back now; on a single node with a bad config the API
        would never come back for the usual path to do it."""
        name = self.config.node_name
        try:
            agent = await asyncio.to_thread(self._agent)
            pending = await asyncio.to_thread(agent.pending)
            if pending:
                log.info("%s: an earlier pod left config %s unverified", name, pending[:16])
            result = await asyncio.to_thread(agent.resume)
        except RolledBack as error:
            self.metrics.rollbacks.inc()
            if error.crashed:
                self._unmarked = error.failed_hash
            log.error("%s: resumed the wait and rolled back: %s", name, error)
        except KubeAuditError as error:
            log.warning("could not resume the previous health wait: %s", error)
        else:
            if result is not None:
                log.info("%s: resumed the wait: %s", name, result.message)

    async def converge(self, stop: asyncio.Event) -> NodeReport:
        """Plan and, if the host differs, roll out. At most one plan is alive at a time and only
        the small report outlives it: 10,000 users' models are gone before the status writes."""
        self._confirmed = None
        report = await self._converge(stop)
        return replace(report, confirmed=self._confirmed)

    async def _converge(self, stop: asyncio.Event) -> NodeReport:
        planned = self.plan()
        desired = planned.desired
        facts = (desired.config_hash, desired.problems, planned.generations)
        tokens = planned.tokens

        def report(outcome: str, message: str, permanent: bool = False) -> NodeReport:
            return NodeReport(*facts, outcome, message, permanent, tokens=tokens)

        try:
            agent = await asyncio.to_thread(self._agent)
            listed = rfc3339(self.clock.now())
            published = await asyncio.to_thread(agent.publish_identities, desired)
            if desired.webhook_mode:
                self._confirmed = listed
            if published:
                log.info("%s: authn-webhook files written: %s", self.config.node_name,
                         ", ".join(published))  # fmt: skip
            change = await asyncio.to_thread(agent.needs_change, desired)
            hold = await asyncio.to_thread(agent.hold, desired) if change else None
            revocation = (
                await asyncio.to_thread(agent.revocation, desired) if hold is not None else None
            )
        except (ManifestError, NodeConfigError) as error:
            self.metrics.blocked.set(1)
            log.error("%s: blocked: %s", self.config.node_name, error)
            return report(BLOCKED, str(error), permanent=True)
        self.metrics.blocked.set(0)
        self.metrics.held.set(1 if hold is not None else 0)
        if not change or hold is not None:
            await self._settle_lease()
        if self._unmarked is not None:
            revocation = None  # the failure mark first: the other nodes must not try that config
        if not change and desired.webhook_mode and self.config.webhook_probe is not None:
            # Live only once the webhook answers with the new people: a token asked before is
            # refused, and kube-apiserver keeps that answer for the whole cache TTL.
            why = await asyncio.to_thread(self.config.webhook_probe, agent.layout)
            if why is not None:
                if self._logged_webhook != why:
                    log.warning("%s: authn-webhook behind: %s", self.config.node_name, why)
                self._logged_webhook = why
                waiting = report(
                    PENDING,
                    "identities written; this node's authn-webhook container does not answer "
                    f"with them yet: {why}",
                )
                retry_at = self.clock.now().timestamp() + self.config.webhook_poll
                return replace(waiting, retry_at=retry_at)
            self._logged_webhook = None
        if not change:
            if self._logged_live != desired.config_hash:
                self._logged_live = desired.config_hash
                log.info(
                    "%s: unchanged, the node runs config %s",
                    self.config.node_name,
                    desired.config_hash[:16] or "(none)",
                )
            return report(APPLIED, "live")
        if hold is not None and revocation is None:
            if self._logged_hold != hold.message:
                self._logged_hold = hold.message
                log.warning("%s: held: %s", self.config.node_name, hold.message)
            return held_by(report(ROLLED_BACK, hold.message), hold)
        stopped = report(BLOCKED, "operator stopping")
        del desired, planned
        return await self._rollout(agent, stop) or stopped

    async def _settle_lease(self) -> None:
        """Nothing to apply here (or only a held content's revocations): record a failure mark
        still owed, and give back a Lease in our name (a pod of this node killed mid-rollout
        left it; the other nodes wait)."""
        if self._unmarked is not None and not await self._mark_failed(self._unmarked):
            return
        if self._holding or not self._checked_stale:
            await asyncio.to_thread(self.lease.release)
            self._holding = False
            self._checked_stale = True

    async def _mark_failed(self, config_hash: str) -> bool:
        """Record a config the apiserver refused on the rollout Lease, first and with retries:
        if it were lost, the next node would restart its apiserver into the same failure.
        False (the Lease is kept, the mark still owed) if the API never took it."""
        self._unmarked = config_hash
        delay = 1.0
        for attempt in range(1, MARK_ATTEMPTS + 1):
            try:
                current = failed_configs(
                    await asyncio.to_thread(self.lease.annotation, FAILED_ANNOTATION)
                )
                marks = [*[h for h in current if h != config_hash], config_hash][-KEEP_FAILED:]
                if await asyncio.to_thread(
                    self.lease.annotate, {FAILED_ANNOTATION: ",".join(marks)}
                ):
                    self._unmarked = None
                    return True
            except ClusterError as error:
                log.warning("recording the failed config (attempt %d): %s", attempt, error)
            if attempt < MARK_ATTEMPTS:
                await self.clock.sleep(delay, asyncio.Event())
                delay *= 2
        log.error("could not record failed config %s; keeping the rollout Lease", config_hash[:16])
        return False

    async def _rollout(self, agent: NodeAgent, stop: asyncio.Event) -> NodeReport | None:
        """Apply under the rollout Lease, planning again once it is held. None if the operator
        stopped before the Lease was free."""
        holder = self.config.node_name
        if not await self.lease.acquire(self.config.lease_poll, stop):
            return None
        self._holding = True
        planned = self.plan()
        desired = planned.desired

        def report(outcome: str, message: str) -> NodeReport:
            return NodeReport(
                desired.config_hash,
                desired.problems,
                planned.generations,
                outcome,
                message,
                tokens=planned.tokens,
            )

        try:
            behind = await asyncio.to_thread(agent.kubelet_behind)
        except Exception:
            await self._release()
            raise
        if behind is not None:
            await self._release()
            if not self._logged_behind:
                log.info("%s: %s", holder, behind)
            self._logged_behind = True
            waiting = report(PENDING, behind)
            return replace(waiting, retry_at=self.clock.now().timestamp() + KUBELET_POLL)
        self._logged_behind = False
        marks = failed_configs(await asyncio.to_thread(self.lease.annotation, FAILED_ANNOTATION))
        held: NodeReport | None = None
        hold = await asyncio.to_thread(agent.hold, desired)
        if hold is not None:
            held = held_by(report(ROLLED_BACK, hold.message), hold)
        elif desired.config_hash in marks and not await asyncio.to_thread(
            agent.removes_identities_only, desired
        ):
            held = report(
                BLOCKED,
                "rollout stopped: the new kube-apiserver crashed with this configuration on "
                "another node",
            )
        target = desired
        if held is not None:
            revocation = await asyncio.to_thread(agent.revocation, desired)
            if revocation is None:
                await self._release()
                return held
            target = revocation
            log.warning(
                "%s: %s; taking away on their own the identities it removes (config %s)",
                holder,
                held.message,
                target.config_hash[:16] or "(none)",
            )
        try:
            result = await asyncio.to_thread(self._apply_renewing, agent, target)
        except asyncio.CancelledError:
            # The apply goes on in its thread: this node is restarting. Releasing now would let
            # the next node restart too (two apiservers down). The next pod on this node
            # resumes the wait and releases it; if none comes, the Lease expires.
            log.warning(
                "%s: stopping during an apply; keeping the rollout Lease for this node's "
                "next pod to finish the wait",
                holder,
            )
            raise
        except RolledBack as error:
            self.metrics.rollbacks.inc()
            self.metrics.restarts.inc(2)
            log.error("rolled back on %s: %s", holder, error)
            if not error.crashed or await self._mark_failed(error.failed_hash):
                await self._release()
            return replace(report(ROLLED_BACK, str(error)), changed_node=True)
        except RewrittenDuringWait as error:
            await self._release()
            log.warning("%s: %s", holder, error)
            waiting = replace(report(PENDING, str(error)), changed_node=True)
            return replace(waiting, retry_at=self.clock.now().timestamp() + KUBELET_POLL)
        except (ManifestError, NodeConfigError) as error:
            await self._release()
            self.metrics.blocked.set(1)
            log.error("%s: blocked: %s", holder, error)
            return NodeReport(
                desired.config_hash,
                desired.problems,
                planned.generations,
                BLOCKED,
                str(error),
                permanent=True,
                tokens=planned.tokens,
            )
        except Exception:
            await self._release()
            raise
        self.applies.append(result)
        if result.restarted and self.config.min_ready > 0:
            # Ready is not yet in rotation: a load balancer marks the new apiserver healthy
            # only after a few checks. Until then, the next node must not go down.
            log.info(
                "%s: ready; holding the rollout for %.0f s more", holder, self.config.min_ready
            )
            await self.clock.sleep(self.config.min_ready, stop)
        await self._release()
        if result.outcome == "held":
            return report(ROLLED_BACK, result.message)
        self.metrics.applies.inc()
        if result.restarted:
            self.metrics.restarts.inc()
        log.info("%s: %s", holder, result.message)
        if held is not None:
            message = (
                f"{held.message}; meanwhile the identities it removes were taken away on their "
                f"own: {result.message}"
            )
            return replace(held, message=message, changed_node=True)
        return replace(report(APPLIED, result.message), changed_node=True)

    def _apply_renewing(self, agent: NodeAgent, desired: DesiredState) -> NodeResult:
        """The apply, in its thread, with the Lease renewed beside it until the apply returns,
        whether or not the operator is stopping meanwhile."""
        done = threading.Event()
        renewer = threading.Thread(
            target=self.lease.renew_until, args=(done,), name="rollout lease renewal", daemon=True
        )
        renewer.start()
        try:
            return agent.apply(desired)
        finally:
            done.set()
            renewer.join()

    async def _release(self) -> None:
        """Let the next node go; if the API is down now, the next reconcile releases it."""
        try:
            await asyncio.to_thread(self.lease.release)
        except ClusterError as error:
            log.warning("releasing the rollout Lease: %s (the next reconcile will)", error)
            return
        self._holding = False
