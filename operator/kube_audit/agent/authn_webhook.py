"""``kube-audit authn-webhook``: kube-apiserver's TokenReview webhook, served on the node.

Its own container of the DaemonSet's pod, so an operator crash or restart does not stop it, and
it answers from memory: after a node reboot the apiserver starts before any pod can reach the
API. It answers only the client whose certificate is pinned (the apiserver's own client
certificate, re-read when kubeadm renews it): any other local process gets 403. The snapshot
and the pinned certificate are re-read within a second of a change; a snapshot that does not
parse keeps the last good one, and says so in the log and a metric.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from kube_audit import hostfs
from kube_audit.constants import AUTHN_SNAPSHOT_HEADER, AUTHN_WEBHOOK_PATH
from kube_audit.core.identities import (
    Identity,
    SnapshotError,
    parse_identity_snapshot,
    review_token,
    snapshot_digest,
)
from kube_audit.errors import HostError

log = logging.getLogger(__name__)

# kube-apiserver's TokenReview is a token and a few audiences: anything near this is not one.
MAX_BODY = 64 * 1024
# A client that connects and says nothing holds a thread only this long.
CLIENT_TIMEOUT = 10.0
# How often the inputs are looked at (a stat of each): a new person is answered for this much
# sooner, and the agent waits this much less before it calls them live.
REFRESH_SECONDS = 0.25


@dataclass(frozen=True)
class WebhookFiles:
    """Where the webhook reads what the node agent wrote, and the apiserver's client certificate."""

    snapshot: Path
    serving_cert: Path
    serving_key: Path
    client_ca: Path
    client_cert: Path


class WebhookMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reviews = Counter(
            "kube_audit_authn_reviews",
            "TokenReviews answered, by result",
            ["result"],
            registry=self.registry,
        )
        self.snapshot_errors = Counter(
            "kube_audit_authn_snapshot_errors",
            "Identity snapshots that did not parse (the last good one was kept)",
            registry=self.registry,
        )
        self.identities = Gauge(
            "kube_audit_authn_identities",
            "Identities in the snapshot answered from",
            registry=self.registry,
        )
        self.refused_clients = Counter(
            "kube_audit_authn_refused_clients",
            "Requests refused: no client certificate, or not the pinned one",
            registry=self.registry,
        )


class IdentitySource:
    """The snapshot as last read whole; None until the first good read. ``digest`` names it
    (set after the identities, so it never names a snapshot not yet answered from)."""

    def __init__(self, path: Path, metrics: WebhookMetrics) -> None:
        self.path = path
        self.metrics = metrics
        self.identities: Mapping[str, Identity] | None = None
        self.digest: str | None = None
        self._seen: tuple[int, int, int] | None = None

    def refresh(self) -> None:
        signature = hostfs.file_signature(self.path)
        if signature is None or signature == self._seen:
            return
        try:
            data = hostfs.read_bytes(self.path)
            identities = parse_identity_snapshot(data)
        except (HostError, SnapshotError) as error:
            self._seen = signature
            self.metrics.snapshot_errors.inc()
            kept = "none loaded yet" if self.identities is None else "keeping the last good one"
            log.error("%s: %s (%s)", self.path, error, kept)
            return
        self._seen = signature
        self.identities = identities  # one reference swap: a request sees old or new, whole
        self.digest = snapshot_digest(data)
        self.metrics.identities.set(len(identities))
        log.info("%s: %d identities loaded", self.path, len(identities))


class ClientPin:
    """The DER of the one client certificate answered (the apiserver's)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.der: bytes | None = None
        self._seen: tuple[int, int, int] | None = None

    def refresh(self) -> None:
        signature = hostfs.file_signature(self.path)
        if signature is None or signature == self._seen:
            return
        try:
            der = ssl.PEM_cert_to_DER_cert(hostfs.read_bytes(self.path).decode("ascii"))
        except (HostError, ValueError, UnicodeDecodeError) as error:
            log.error("%s: cannot read the client certificate to pin: %s", self.path, error)
            return
        self._seen = signature
        self.der = der

    def allows(self, der: bytes | None) -> bool:
        return der is not None and self.der is not None and der == self.der


class AuthnWebhook:
    """The HTTPS server and the thread that re-reads its inputs when they change."""

    def __init__(
        self,
        files: WebhookFiles,
        address: tuple[str, int],
        metrics: WebhookMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.files = files
        # Wall-clock seconds: a token is refused from its expiresAt on.
        self.clock = clock
        self.metrics = metrics or WebhookMetrics()
        self.source = IdentitySource(files.snapshot, self.metrics)
        self.pin = ClientPin(files.client_cert)
        self._serving_seen: tuple[Any, ...] | None = None
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        # Optional, not required: a probe without a certificate may ask /healthz; every review
        # needs the pinned one.
        self.context.verify_mode = ssl.CERT_OPTIONAL
        self.context.load_verify_locations(cadata=hostfs.read_bytes(files.client_ca).decode())
        self.refresh()
        self.server = ThreadingHTTPServer(address, _handler(self))
        self.server.daemon_threads = True
        self.server.socket = self.context.wrap_socket(
            self.server.socket, server_side=True, do_handshake_on_connect=False
        )
        self._stop = threading.Event()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def refresh(self) -> None:
        """Re-read what changed: the snapshot, the pinned certificate, the serving certificate
        (new handshakes use a renewed one; the apiserver needs no restart)."""
        self.source.refresh()
        self.pin.refresh()
        serving = (
            hostfs.file_signature(self.files.serving_cert),
            hostfs.file_signature(self.files.serving_key),
        )
        if serving != self._serving_seen:
            try:
                self.context.load_cert_chain(self.files.serving_cert, self.files.serving_key)
            except (OSError, ssl.SSLError) as error:
                if self._serving_seen is None:
                    raise HostError(
                        f"cannot load the serving certificate {self.files.serving_cert}: {error}"
                    ) from None
                log.error("%s: %s (keeping the last good one)", self.files.serving_cert, error)
                return
            self._serving_seen = serving

    def _refresh_often(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            try:
                self.refresh()
            except HostError as error:
                log.error("%s", error)

    def serve(self) -> None:
        """Serve until ``shutdown``."""
        refresher = threading.Thread(
            target=self._refresh_often, name="authn-webhook refresh", daemon=True
        )
        refresher.start()
        try:
            self.server.serve_forever(poll_interval=0.2)
        finally:
            self._stop.set()
            refresher.join()
            self.server.server_close()

    def shutdown(self) -> None:
        self.server.shutdown()


def _handler(webhook: AuthnWebhook) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = CLIENT_TIMEOUT
        protocol_version = "HTTP/1.1"
        # Headers and body go out as two writes: with Nagle's algorithm the second waits for
        # the client's delayed ACK, 40 ms on every review (measured by bench/webhook_bench.py).
        disable_nagle_algorithm = True

        def setup(self) -> None:
            super().setup()
            connection: ssl.SSLSocket = self.request
            try:
                connection.do_handshake()
                self.peer = connection.getpeercert(binary_form=True)
            except (OSError, ssl.SSLError) as error:
                log.debug("TLS handshake with %s failed: %s", self.client_address, error)
                self.peer = None
                self.close_connection = True
                self.rfile.close()

        def handle(self) -> None:
            if not self.rfile.closed:
                super().handle()

        def _send(
            self,
            status: int,
            body: bytes,
            content_type: str,
            headers: Mapping[str, str] | None = None,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, json.dumps(body).encode(), "application/json")

        def _route(self) -> str:
            """The path without its query: client-go asks ``/authenticate?timeout=30s``."""
            return urlsplit(self.path).path

        def do_GET(self) -> None:
            route = self._route()
            if route == "/healthz":
                digest = webhook.source.digest
                if digest is None:
                    self._send(503, b"not loaded\n", "text/plain")
                else:
                    self._send(200, b"ok\n", "text/plain", {AUTHN_SNAPSHOT_HEADER: digest})
            elif route == "/metrics":
                self._send(200, generate_latest(webhook.metrics.registry), "text/plain")
            else:
                self._json(
                    404, {"error": f"no {route}; TokenReviews go to POST {AUTHN_WEBHOOK_PATH}"}
                )

        def do_POST(self) -> None:
            # The body is read before any answer: one left unread on a kept-alive connection
            # would be taken for the client's next request.
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self.close_connection = True
                self._json(413, {"error": f"a TokenReview is at most {MAX_BODY} bytes here"})
                return
            body = self.rfile.read(length)
            route = self._route()
            if route != AUTHN_WEBHOOK_PATH:
                self._json(
                    404, {"error": f"no {route}; TokenReviews go to POST {AUTHN_WEBHOOK_PATH}"}
                )
                return
            if not webhook.pin.allows(self.peer):
                webhook.metrics.refused_clients.inc()
                self.close_connection = True
                self._json(403, {"error": "only kube-apiserver's client certificate is answered"})
                return
            answer = review_token(webhook.source.identities, body, webhook.clock())
            status = answer.body.get("status") or {}
            result = (
                "invalid" if answer.status != 200
                else "error" if status.get("error")
                else "authenticated" if status.get("authenticated")
                else "unknown"
            )  # fmt: skip
            webhook.metrics.reviews.labels(result).inc()
            self._json(answer.status, answer.body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.client_address[0], format % args)

    return Handler
