"""Time, injected: the reconciler and the Leases ask a ``Clock``, so tests move time on
instead of sleeping through a debounce window or a Lease's duration."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol

from kube_audit.controller.aio import sleep_unless_stopped


class Clock(Protocol):
    def now(self) -> datetime:
        """Wall-clock time (UTC): timestamps written to objects, and users' expiry."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps: every interval and expiry is measured on it."""

    async def sleep(self, seconds: float, stop: asyncio.Event) -> None:
        """Sleep ``seconds`` or until ``stop`` is set."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float, stop: asyncio.Event) -> None:
        await sleep_unless_stopped(stop, seconds)


def micro_time(moment: datetime) -> str:
    """A Lease's MicroTime."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
