"""The pod's readiness: ready once its node is settled, so a DaemonSet update moves to the next
node only after this one's new pod has finished (or reported) the node's pending work."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

from aiohttp import web


@contextlib.asynccontextmanager
async def serve_readiness(endpoint: str | None, ready: Callable[[], bool]) -> AsyncIterator[None]:
    """Serve ``GET <path>``: 200 when ``ready()``, else 503; nothing when ``endpoint`` is empty."""
    if not endpoint:
        yield
        return
    url = urlsplit(endpoint)

    async def readyz(_: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ok\n")
        return web.Response(status=503, text="the first reconcile has not finished\n")

    app = web.Application()
    app.router.add_get(url.path or "/", readyz)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, url.hostname or "127.0.0.1", url.port or 80)
    await site.start()
    try:
        yield
    finally:
        await asyncio.shield(runner.cleanup())
