"""Shipping to the audit store, shown where people look: every few seconds each pod
copies its ship container's report into its node's record, and the pod that writes conditions
judges every record (``core.ship_report``) into a ``Shipping`` condition and a
``status.shipping`` entry per node on each AuditPolicy, with an Event when a node stops or
starts shipping again. Not a failure for Flux or Argo CD: Ready stays as it is."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from kube_audit.agent.layout import STATE_DIR, under
from kube_audit.agent.ship import read_ship_report
from kube_audit.constants import AUDIT_POLICY, NODE_SHIPPING_ANNOTATION
from kube_audit.controller.clock import micro_time, rfc3339
from kube_audit.controller.status import StatusWriter
from kube_audit.core.ship_report import ShippingJudgement, judge_shipping, shipping_patch
from kube_audit.errors import KubeAuditError

log = logging.getLogger(__name__)

# Entry states a Warning Event on the Node is posted for (Unknown: no report yet, at start).
STOPPED = ("Stalled", "Failing")


class ShippingReporter:
    """One pod's part: its node's report to its record; the owner's part: the policies."""

    def __init__(self, status: StatusWriter) -> None:
        self.status = status
        self.folder = under(status.config.host_root, STATE_DIR) / "ship"
        self._copied: bytes | None = None
        self._stopped: set[str] = set()
        # Since when this pod has judged shipping: nodes still without a report
        # are not called stalled before the bound has passed once.
        self._judging_since: float | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: copy, then judge, every SHIP_REPORT_SECONDS; a failure is logged and
        tried again next time (the records age, which is what shows)."""
        while not stop.is_set():
            try:
                await self.copy_report()
                await self.judge()
            except KubeAuditError as error:
                log.warning("shipping not reported this time: %s", error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.status.config.ship_report_every)

    async def copy_report(self) -> None:
        """The ship container's report into this node's record (when it changed: it is
        rewritten every few seconds, so its age tells the cluster the shipper runs)."""
        report = await asyncio.to_thread(read_ship_report, self.folder)
        if report is None or report == self._copied:
            return
        config = self.status.config
        await asyncio.to_thread(
            self.status.api.write_node_record,
            config.namespace,
            config.node_name,
            {NODE_SHIPPING_ANNOTATION: report.decode(errors="replace")},
            micro_time(self.status.clock.now()),
        )
        self._copied = report

    async def judge(self) -> None:
        """The owner only: every AuditPolicy's Shipping condition and entries."""
        status = self.status
        shown = any(
            "shipping" in (body.get("status") or {})
            for _, body in status.store.items("auditpolicies")
        )
        if self._copied is None and not shown:
            return  # no store on this node, nothing shown: no API call for nothing
        if not await asyncio.to_thread(status.owner.try_acquire):
            return
        nodes = await asyncio.to_thread(status.api.control_plane_nodes)
        records = await asyncio.to_thread(status.api.node_records, status.config.namespace)
        bound = status.config.ship_stalled_after
        now = status.clock.now().timestamp()
        started = self._judging_since = self._judging_since or now
        judged = judge_shipping(records, nodes, now, bound, missing_stalled=now - started > bound)
        status.shipping = judged.condition if judged is not None else None
        await self._tell(judged)
        moment = rfc3339(status.clock.now())
        for name, body in status.store.items("auditpolicies"):
            patch = shipping_patch(body.get("status") or {}, judged, moment)
            if patch is not None:
                await status.patch_status(AUDIT_POLICY, name, patch)

    async def _tell(self, judged: ShippingJudgement | None) -> None:
        """A Warning Event on the Node when it stops shipping, a Normal one when it ships
        again: the condition says it too, the Event says when."""
        stopped = {e["node"] for e in (judged.entries if judged else []) if e["state"] in STOPPED}
        message = judged.condition["message"] if judged else ""
        for node in sorted(stopped - self._stopped):
            await self.status.post_node_event(
                node, "ShippingStalled", f"node {node}: {_part(message, node)}", warning=True
            )
        for node in sorted(self._stopped - stopped):
            await self.status.post_node_event(
                node, "ShippingResumed", f"node {node}: its audit log reaches the store again"
            )
        self._stopped = stopped


def _part(message: str, node: str) -> str:
    for part in message.split("; "):
        if part.startswith(f"{node}:"):
            return part.removeprefix(f"{node}:").strip()
    return message
