"""A clock tests move by hand: no test sleeps through a debounce window or a Lease."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta


@dataclass
class ManualClock:
    wall: datetime = field(default_factory=lambda: datetime(2026, 11, 28, 12, 0, tzinfo=UTC))
    mono: float = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += timedelta(seconds=seconds)

    async def sleep(self, seconds: float, stop: asyncio.Event) -> None:
        """Time passes at once; the loop still gets a turn."""
        if not stop.is_set():
            self.advance(max(seconds, 0.0))
        await asyncio.sleep(0)
