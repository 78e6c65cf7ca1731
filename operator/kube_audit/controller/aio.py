"""Small asyncio helpers shared by the controller modules."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from kube_audit.errors import KubeAuditError

log = logging.getLogger("kube_audit.operator")
API_CONCURRENCY = 8


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``stop`` is set, whichever comes first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(seconds, 0.0))


async def run_bounded(
    jobs: Iterable[Callable[[], Awaitable[None]]], stop: asyncio.Event, what: str
) -> list[KubeAuditError]:
    """Run API jobs a few at a time, pulling them lazily (with 10,000 users neither all jobs
    nor their objects exist at once). One job's failure is logged and returned, never allowed
    to stop its siblings: one object the API refuses must not keep every other one waiting."""
    source = iter(jobs)
    errors: list[KubeAuditError] = []

    async def worker() -> None:
        for job in source:
            if stop.is_set():
                return
            try:
                await job()
            except KubeAuditError as error:
                errors.append(error)
                log.warning("%s: %s", what, error)

    await asyncio.gather(*(worker() for _ in range(API_CONCURRENCY)))
    return errors
