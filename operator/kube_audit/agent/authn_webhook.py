"""``kube-audit authn-webhook``: kube-apiserver's TokenReview webhook, served on the node.

Its own container of the DaemonSet's pod, so an operator crash or restart does not stop it, and
it answers from memory: after a node reboot the apiserver starts before any pod can reach the
API. Reviews are answered only to a client presenting kube-apiserver's client certificate; any
other local process gets the health routes (no request body is ever read from it) or 403.

One event loop, no thread per connection: a connection costs a socket and a few buffers, so a
crowd of slow local clients cannot starve the apiserver's reviews or the container's memory.
Every stage has its own deadline (the TLS handshake, a request whole, an answer written), and
connections past a cap are closed at once. The inputs are looked at four times a second; a look
that fails unexpectedly is logged and counted, never the end of the loop, and /healthz fails
(kubelet restarts the container) if the loop stops looking.

No review goes unanswered across a pod update: the port is shared with the node's next
webhook, and this one hands over at SIGTERM (webhook_handover.py).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import json
import logging
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import generate_latest

from kube_audit.agent.webhook_admission import MAX_UNPROVEN, Unproven
from kube_audit.agent.webhook_handover import DRAIN_SECONDS, await_successor, reset
from kube_audit.agent.webhook_http import (
    Refused,
    close_connection,
    content_length,
    parse_head,
    render_response,
)
from kube_audit.agent.webhook_sources import (
    ClientPin,
    IdentitySource,
    ServingTls,
    WebhookFiles,
    WebhookMetrics,
)
from kube_audit.constants import (
    AUTHN_INSTANCE_HEADER,
    AUTHN_SNAPSHOT_HEADER,
    AUTHN_WEBHOOK_PATH,
)
from kube_audit.core.identities import NONE_ALLOWED, Allowed, review_token

__all__ = ["AuthnWebhook", "WebhookFiles", "WebhookMetrics"]

log = logging.getLogger(__name__)

# kube-apiserver's TokenReview is a token and a few audiences: anything near this is not one.
MAX_BODY = 64 * 1024
# A request line and headers; client-go sends a few hundred bytes.
MAX_HEAD = 8 * 1024
# Deadlines, each for one stage as a whole (Guard's: 5 s to read a request, 10 s to write).
HANDSHAKE_SECONDS = 5.0
REQUEST_SECONDS = 5.0
WRITE_SECONDS = 10.0
# kube-apiserver keeps its connection between reviews; Go closes idle ones after 90 s.
IDLE_SECONDS = 120.0
# Connections at most, the apiserver's included (unproven ones: webhook_admission.py).
MAX_CONNECTIONS = 4096
# How often the inputs are looked at (a stat of each): a new person is answered for this much
# sooner, and the agent waits this much less before it calls them live.
REFRESH_SECONDS = 0.25
# /healthz fails when the loop has not looked for this long: kubelet's liveness probe restarts
# a webhook whose refresh stopped, instead of it answering from an old snapshot unnoticed.
REFRESH_STALLED = 30.0
# Bodiless routes any local client may ask: /livez (the loop still looks at its inputs: kubelet's
# liveness), /readyz (and a snapshot is loaded: readiness), /healthz (the same, naming the
# snapshot answered from: the node agent's probe), /metrics.
HEALTH_ROUTES = ("/livez", "/readyz", "/healthz", "/metrics")
# asyncio gives every TLS connection a 256 KiB receive buffer (``SSLProtocol.max_size``, a
# class attribute read per connection): 2,000 idle clients took 481 MiB. A TLS record is at
# most 16 KiB, and a review a few hundred bytes: 16 KiB chunks cost a crowd an eighth of that
# (measured in tests/agent/test_webhook_crowd.py). Set where this process starts serving.
TLS_READ_CHUNK = 16 * 1024


class AuthnWebhook:
    """The server. ``serve`` runs it on an event loop of its own in the calling thread, until
    ``shutdown`` (from any thread). ``refuse_after``: seconds since the operator last confirmed
    the snapshot after which every token is refused (None: never); ``allowed``: the ``system:``
    names the operator's guard flags allow (the same flags and variables as the operator's)."""

    def __init__(
        self,
        files: WebhookFiles,
        address: tuple[str, int],
        metrics: WebhookMetrics | None = None,
        clock: Callable[[], float] = time.time,
        *,
        refuse_after: float | None = None,
        allowed: Allowed = NONE_ALLOWED,
        max_connections: int = MAX_CONNECTIONS,
        max_unproven: int = MAX_UNPROVEN,
    ) -> None:
        self.files = files
        # Wall-clock seconds: a token is refused from its expiresAt on.
        self.clock = clock
        self.metrics = metrics or WebhookMetrics()
        self.source = IdentitySource(files, self.metrics)
        self.pin = ClientPin(files.client_cert)
        self.tls = ServingTls(files)
        self.refuse_after = refuse_after
        self.allowed = allowed
        self.max_connections = max_connections
        self._unproven: Unproven[asyncio.StreamWriter] = Unproven(max_unproven)
        # Every open connection's handler: ended (not cancelled) at shutdown.
        self._handlers: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}
        self.metrics.snapshot_age.set_function(self._age_metric)
        # Told apart from the node's next webhook on the same port.
        self.instance = uuid.uuid4().hex
        # Loaded before the port is shared: a review the kernel hands this process is answered.
        self.refresh()
        self._looked = time.monotonic()
        self._open = 0
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Shared with the node's next webhook during a pod update (same user only).
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._socket.bind(address)
            self._socket.listen(1024)
        except OSError:
            self._socket.close()
            raise
        self._socket.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._hand_over = 0.0
        self._draining = False
        self._stopping = False
        self.successor: str | None = None

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def refresh(self) -> None:
        """Re-read what changed: the snapshot and its confirmation, the pinned certificate, the
        serving certificate (new handshakes use a renewed one; the apiserver needs no restart)."""
        self.source.refresh()
        self.pin.refresh()
        self.tls.refresh()

    def _age_metric(self) -> float:
        age = self.source.age(self.clock())
        return -1.0 if age is None else age

    def stale(self) -> str | None:
        """Why every token is refused now (None: it is not)."""
        return self.source.too_old(self.clock(), self.refuse_after)

    async def _look_often(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as error:
                self.metrics.refresh_errors.inc()
                log.error("looking at the inputs failed: %s: %s", type(error).__name__, error)
            self._looked = time.monotonic()
            await asyncio.sleep(REFRESH_SECONDS)

    def serve(self, *, look: bool = True) -> None:
        """Serve until ``shutdown``. ``look`` False: the inputs are read again only when
        ``refresh`` is called (tests that step it themselves)."""
        asyncio.run(self._serve(look))

    async def _serve(self, look: bool) -> None:
        if getattr(asyncio.sslproto.SSLProtocol, "max_size", 0) > TLS_READ_CHUNK:
            asyncio.sslproto.SSLProtocol.max_size = TLS_READ_CHUNK
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, sock=self._socket, limit=MAX_HEAD)
        looker = asyncio.create_task(self._look_often() if look else asyncio.Event().wait())
        drain = 0.0
        try:
            await self._stop.wait()
            self._stopping = True
            if self._hand_over > 0:
                address = self._socket.getsockname()[:2]
                self.successor = await await_successor(address, self.instance, self._hand_over)
                drain = DRAIN_SECONDS
        finally:
            server.close()  # the listening socket: new connections go to the other listener
            self._draining = True
            if drain and self._handlers:
                await asyncio.wait(list(self._handlers.values()), timeout=drain)
            looker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await looker
            for writer in list(self._handlers):
                reset(writer)  # each handler ends on its own, none is cancelled
            if self._handlers:
                await asyncio.wait(list(self._handlers.values()), timeout=2.0)
            await server.wait_closed()

    def shutdown(self, hand_over: float = 0.0) -> None:
        """Stop serving; callable from any thread, before or after ``serve`` started.
        ``hand_over``: first serve on for up to this many seconds, until another process
        answers on the port with a snapshot loaded (``successor`` names it then)."""
        loop, stop = self._loop, self._stop
        while loop is None or stop is None:
            time.sleep(0.01)
            loop, stop = self._loop, self._stop
        self._hand_over = hand_over
        with contextlib.suppress(RuntimeError):  # its loop ended already: stopped
            loop.call_soon_threadsafe(stop.set)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self.max_connections:
            self.metrics.refused_connections.inc()
            writer.transport.abort()
            return
        room, pushed_out = self._unproven.make_room()
        if pushed_out is not None:
            self.metrics.refused_connections.inc()
            pushed_out.transport.abort()
        if not room:
            self.metrics.refused_connections.inc()
            writer.transport.abort()
            return
        self._unproven.began(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers[writer] = task
        self._open += 1
        self.metrics.connections.set(self._open)
        answered = False
        try:
            await self._converse(reader, writer)
        except Refused:
            answered = True  # what it was told is on its way: close after it
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        except TimeoutError as timeout:
            self.metrics.timeouts.labels(str(timeout) or "request").inc()
        finally:
            self._handlers.pop(writer, None)
            self._unproven.ended(writer)
            self._open -= 1
            self.metrics.connections.set(self._open)
            await close_connection(writer, flush=answered)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Headers and body go out as two writes: with Nagle's algorithm the second waits
            # for the client's delayed ACK, 40 ms on every review.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = self.tls.context
        if context is None:
            raise Refused
        plain = writer.transport
        try:
            await writer.start_tls(context, ssl_handshake_timeout=HANDSHAKE_SECONDS)
        except (TimeoutError, ConnectionAbortedError):
            raise TimeoutError("handshake") from None  # asyncio aborts a handshake past it
        except AttributeError:
            # Closed during the handshake (pushed out, or the client left): asyncio's
            # start_tls returns no transport then, and the writer keeps None (CPython 3.11,
            # 3.12). It gets its own back, so closing it (and its finalizer) can work.
            writer._transport = plain  # type: ignore[attr-defined]
            raise ConnectionAbortedError("closed during the handshake") from None
        ssl_object = writer.get_extra_info("ssl_object")
        peer = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        apiserver = self.pin.allows(peer)
        self._unproven.shown(writer, apiserver)
        idle = IDLE_SECONDS if apiserver else REQUEST_SECONDS
        while True:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), idle)
            except asyncio.LimitOverrunError:
                await self._send(writer, 431, b"request head too large\n", close=True)
                raise Refused from None
            except TimeoutError:
                raise TimeoutError("request") from None
            await self._answer(reader, writer, head, apiserver)
            if self._draining:
                raise Refused  # told "Connection: close": its next request goes elsewhere

    async def _answer(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        head: bytes,
        apiserver: bool,
    ) -> None:
        started = time.monotonic()
        method, route, headers = parse_head(head)
        length = content_length(headers)
        if not apiserver:
            # Not kube-apiserver: the health routes, bodiless, and nothing else; no body read.
            if method == "GET" and route in HEALTH_ROUTES and length == 0:
                await self._health(writer, route, close=True)
            else:
                self.metrics.refused_clients.inc()
                error = {"error": "only kube-apiserver's client certificate is answered"}
                await self._json(writer, 403, error, close=True)
            raise Refused
        chunked = "chunked" in headers.get("transfer-encoding", "")
        if length is None or not 0 <= length <= MAX_BODY or chunked:
            error = {"error": f"a TokenReview is at most {MAX_BODY} bytes, with a Content-Length"}
            await self._json(writer, 413, error, close=True)
            raise Refused
        left = REQUEST_SECONDS - (time.monotonic() - started)
        try:
            body = await asyncio.wait_for(reader.readexactly(length), max(left, 0.001))
        except TimeoutError:
            raise TimeoutError("request") from None
        if method == "GET" and route in HEALTH_ROUTES:
            await self._health(writer, route)
        elif method == "POST" and route == AUTHN_WEBHOOK_PATH:
            await self._review(writer, body)
        else:
            error = {"error": f"no {method} {route}; TokenReviews go to POST {AUTHN_WEBHOOK_PATH}"}
            await self._json(writer, 404, error)

    async def _review(self, writer: asyncio.StreamWriter, body: bytes) -> None:
        identities, key = self.source.loaded or (None, None)
        answer = review_token(identities, body, self.clock(), self.stale(), self.allowed, key=key)
        status = answer.body.get("status") or {}
        result = (
            "invalid" if answer.status != 200
            else "error" if status.get("error")
            else "authenticated" if status.get("authenticated")
            else "unknown"
        )  # fmt: skip
        self.metrics.reviews.labels(result).inc()
        await self._json(writer, answer.status, answer.body)

    async def _health(self, writer: asyncio.StreamWriter, route: str, close: bool = False) -> None:
        if route == "/metrics":
            await self._send(writer, 200, generate_latest(self.metrics.registry), close=close)
            return
        digest = self.source.digest
        stalled = time.monotonic() - self._looked > REFRESH_STALLED
        if stalled:
            await self._send(writer, 503, b"the inputs are not looked at any more\n", close=close)
        elif route == "/livez":
            await self._send(writer, 200, b"ok\n", close=close)
        elif self._stopping:
            # Still answering reviews until the next webhook does, but not to be counted on:
            # the agent's probe must not switch the node to a webhook about to go.
            await self._send(writer, 503, b"stopping: handing over\n", close=close)
        elif digest is None:
            await self._send(writer, 503, b"not loaded\n", close=close)
        else:
            headers = {AUTHN_SNAPSHOT_HEADER: digest}
            await self._send(writer, 200, b"ok\n", close=close, headers=headers)

    async def _json(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: Mapping[str, Any],
        *,
        close: bool = False,
    ) -> None:
        data = json.dumps(body).encode()
        await self._send(writer, status, data, close=close, content_type="application/json")

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        *,
        close: bool = False,
        content_type: str = "text/plain; charset=utf-8",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        close = close or self._draining
        headers = {**(headers or {}), AUTHN_INSTANCE_HEADER: self.instance}
        writer.write(render_response(status, body, content_type, close=close, headers=headers))
        try:
            await asyncio.wait_for(writer.drain(), WRITE_SECONDS)
        except TimeoutError:
            raise TimeoutError("write") from None
