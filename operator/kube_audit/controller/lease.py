"""coordination.k8s.io Leases: one node restarts its apiserver at a time; one pod owns status.

Expiry is timed as client-go's leader election times it: from when *this* pod last saw the
holder's record change, on its own monotonic clock. Comparing the holder's ``renewTime`` with
our wall clock would make a node whose clock runs a minute ahead take a Lease that is still
held, and restart its apiserver while another node's is down.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

from kube_audit.controller.clock import Clock, micro_time
from kube_audit.errors import ClusterError
from kube_audit.kube import KubeApi

RENEW_AT_MOST_EVERY = 5.0


@dataclass
class _Observed:
    record: tuple[Any, ...]
    at: float


class LeaseLock:
    """A named Lease held by ``holder`` for ``duration`` seconds at a time."""

    def __init__(
        self,
        api: KubeApi,
        clock: Clock,
        *,
        namespace: str,
        name: str,
        holder: str,
        duration: int,
    ) -> None:
        self.api = api
        self.clock = clock
        self.namespace = namespace
        self.name = name
        self.holder = holder
        self.duration = duration
        # How often a held Lease is renewed during an apply: a third of its duration, and at
        # least every RENEW_AT_MOST_EVERY seconds, so that a renewal refused while this node's
        # apiserver restarts is tried again as soon as it is back, not minutes later.
        self.renew_interval = min(duration / 3, RENEW_AT_MOST_EVERY)
        self._observed: _Observed | None = None

    def _expired(self, lease: dict[str, Any]) -> bool:
        """Held by another: expired once its record has not changed for its duration."""
        spec = lease.get("spec") or {}
        record = (
            spec.get("holderIdentity"),
            spec.get("renewTime"),
            spec.get("acquireTime"),
            (lease.get("metadata") or {}).get("resourceVersion"),
        )
        now = self.clock.monotonic()
        if self._observed is None or self._observed.record != record:
            self._observed = _Observed(record, now)
            return False
        duration = int(spec.get("leaseDurationSeconds") or self.duration)
        return now - self._observed.at > duration

    def try_acquire(self) -> bool:
        """Take or renew the Lease if it is free, ours, or expired; False if another holds it."""
        now = micro_time(self.clock.now())
        lease = self.api.read_lease(self.namespace, self.name)
        if lease is None:
            return self.api.create_lease(
                self.namespace,
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {
                        "holderIdentity": self.holder,
                        "leaseDurationSeconds": self.duration,
                        "acquireTime": now,
                        "renewTime": now,
                    },
                },
            )
        spec = lease.setdefault("spec", {})
        current = spec.get("holderIdentity")
        if current and current != self.holder and not self._expired(lease):
            return False
        if current != self.holder:
            spec["acquireTime"] = now
        spec.update(holderIdentity=self.holder, leaseDurationSeconds=self.duration, renewTime=now)
        return self.api.replace_lease(self.namespace, self.name, lease)

    def renew(self) -> bool:
        """Extend the Lease if it is still ours (during a long apply)."""
        lease = self.api.read_lease(self.namespace, self.name)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.holder:
            return False
        lease["spec"]["renewTime"] = micro_time(self.clock.now())
        return self.api.replace_lease(self.namespace, self.name, lease)

    def holds(self) -> bool:
        lease = self.api.read_lease(self.namespace, self.name)
        return lease is not None and (lease.get("spec") or {}).get("holderIdentity") == self.holder

    def annotate(self, annotations: dict[str, str | None], *, release: bool = False) -> bool:
        """Record ``annotations`` (None removes one) while the Lease is ours, giving it up if
        ``release``. False when it is not ours (nothing written) or the write lost a race."""
        lease = self.api.read_lease(self.namespace, self.name)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.holder:
            return False
        meta = lease.setdefault("metadata", {})
        notes = meta.get("annotations") or {}
        for key, value in annotations.items():
            if value is None:
                notes.pop(key, None)
            else:
                notes[key] = value
        meta["annotations"] = notes
        if release:
            lease["spec"]["holderIdentity"] = None
        return self.api.replace_lease(self.namespace, self.name, lease)

    def release(self) -> bool:
        return self.annotate({}, release=True)

    def annotation(self, key: str) -> str | None:
        lease = self.api.read_lease(self.namespace, self.name)
        if lease is None:
            return None
        value = ((lease.get("metadata") or {}).get("annotations") or {}).get(key)
        return str(value) if value is not None else None

    async def acquire(self, poll: float, stop: asyncio.Event) -> bool:
        """Wait until the Lease is ours (True) or the operator stops (False). An API error is
        only a reason to try again: the holder's apiserver may be the one restarting."""
        while not stop.is_set():
            try:
                if await asyncio.to_thread(self.try_acquire):
                    return True
            except ClusterError as error:
                if error.status in (401, 403):
                    raise
            await self.clock.sleep(poll, stop)
        return False

    def renew_until(self, done: threading.Event) -> None:
        """Renew every ``renew_interval`` until ``done``. A thread, not a task: after SIGTERM
        the event loop winds down while the apply it guards goes on (up to two health waits),
        and the Lease must not lapse while this node's apiserver may still be down."""
        while not done.wait(self.renew_interval):
            try:
                self.renew()
            except ClusterError:
                continue
