"""How one authn-webhook hands the node's port to the next, so that no review goes unanswered
across a pod update.

A surge update starts the node's new pod beside the old one; both webhooks listen on the port
(``SO_REUSEPORT``: the kernel gives each new connection to one of them). At SIGTERM the old one
serves on until another process answers on the port with a snapshot loaded, then stops
accepting, answers what its open connections still ask with ``Connection: close`` (their next
request goes to the new one), and resets the connections still idle: kube-apiserver's webhook
client retries a review whose connection was reset, not a POST on a kept-alive connection that
was closed as it was reused."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import time

from kube_audit.agent.webhook_http import parse_head
from kube_audit.constants import AUTHN_INSTANCE_HEADER

log = logging.getLogger(__name__)

# How often the port is asked whether another webhook answers there (each ask is a new
# connection, given to one of the listeners by its addresses' hash), and how long open
# connections get to ask once more (and be told to close) before they are reset.
SUCCESSOR_POLL = 0.1
DRAIN_SECONDS = 2.0
LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}


async def await_successor(address: tuple[str, int], own: str, seconds: float) -> str | None:
    """Ask the port until a webhook other than ``own`` answers it ready: its instance ID, or
    None once ``seconds`` have passed without one (no next pod: the DaemonSet was deleted)."""
    host, port = LOOPBACK.get(address[0], address[0]), address[1]
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # loopback, and nothing secret is asked
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
            other = await asyncio.wait_for(ready_instance(host, port, context), 1.0)
            if other is not None and other != own:
                log.info("the webhook %s answers on port %d now: handing over", other, port)
                return other
        await asyncio.sleep(SUCCESSOR_POLL)
    log.warning("no other webhook answered on port %d within %.0f s: stopping", port, seconds)
    return None


async def ready_instance(host: str, port: int, context: ssl.SSLContext) -> str | None:
    """The instance ID of whichever webhook the kernel gave this connection, if it is ready."""
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        writer.write(f"GET /readyz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.transport.abort()
    status_line, _, rest = head.decode("latin-1").partition("\r\n")
    if status_line.split(" ")[1:2] != ["200"]:
        return None
    _method, _path, headers = parse_head(b"GET / HTTP/1.1\r\n" + rest.encode("latin-1"))
    return headers.get(AUTHN_INSTANCE_HEADER.lower())


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
