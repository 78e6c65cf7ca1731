"""Stand-ins on the authn-webhook's port for the control-plane tier: a TLS server of the test's
own (an impostor that says yes to everyone, or one that answers late by asking ours)."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kube_audit.agent.pki import KeyPair, issue
from kube_audit.constants import AUTHN_WEBHOOK_PORT


def send_json(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def serve_tls(
    handler: type[http.server.BaseHTTPRequestHandler], serving: KeyPair, folder: Path
) -> http.server.ThreadingHTTPServer:
    """A stand-in on the webhook's port, over TLS with ``serving``; stop it with shutdown()."""
    (folder / "serving.crt").write_bytes(serving.cert)
    (folder / "serving.key").write_bytes(serving.key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "serving.crt", folder / "serving.key")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", AUTHN_WEBHOOK_PORT), handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Impostor(http.server.BaseHTTPRequestHandler):
    """Says yes to every token, as cluster-admin."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                           "status": {"authenticated": True, "user": {
                               "username": "impostor", "groups": ["system:masters"]}}}).encode()  # fmt: skip
        send_json(self, 200, body)

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class SlowWebhook:
    """A webhook that answers ``delay`` seconds late: it holds each review, then asks ours."""

    ca: KeyPair
    tree: Path
    delay: float
    upstream: int

    def serve(self, tmp_path: Path) -> http.server.ThreadingHTTPServer:
        pki = self.tree / "etc/kubernetes/pki"
        serving = issue(self.ca, datetime.now(UTC), common_name="slow", hosts=("127.0.0.1",))
        client_side = ssl.create_default_context(cadata=self.ca.cert.decode())
        client_side.load_cert_chain(pki / "apiserver-kubelet-client.crt",
                                    pki / "apiserver-kubelet-client.key")  # fmt: skip
        slow = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                with contextlib.suppress(OSError):  # the apiserver gave up first (40 s late)
                    self._answer_late()

            def _answer_late(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(slow.delay)
                connection = http.client.HTTPSConnection(
                    "127.0.0.1", slow.upstream, context=client_side, timeout=10
                )
                try:
                    connection.request("POST", self.path, body,
                                       {"Content-Type": "application/json"})  # fmt: skip
                    answer = connection.getresponse()
                    send_json(self, answer.status, answer.read())
                finally:
                    connection.close()

            def log_message(self, *args: Any) -> None:
                pass

        return serve_tls(Handler, serving, tmp_path)
