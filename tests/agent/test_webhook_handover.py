"""Issue 36 finding 5: a pod update refuses no token. The node's next authn-webhook listens on
the same port beside the old one (a surge update), and the old one, told to stop, serves until
the next one answers there, then hands its open connections over. The client here does what
kube-apiserver's webhook client does: keeps its connection alive, reconnects when told
``Connection: close``, and retries a review only when its connection was reset."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kube_audit.agent.authn_webhook import AuthnWebhook, WebhookFiles
from kube_audit.constants import AUTHN_INSTANCE_HEADER
from tests.agent import test_authn_webhook as base
from tests.agent.test_authn_webhook import ALICE, Pki, _client, _free_port, _host_root
from tests.controlplane.cluster import KUBE_AUDIT

# The webhook tests' certificates and host files.
pki = base.pki
files = base.files

REVIEW = json.dumps(
    {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": ALICE.token},
    }
)


class Reviewer(threading.Thread):
    """Reviews asked back to back on a kept-alive connection, as kube-apiserver asks them."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        super().__init__(daemon=True)
        self.port, self.context = port, context
        self.answered: list[tuple[float, str]] = []  # when, by which webhook
        self.failures: list[str] = []
        self.retried = 0
        self.stop = threading.Event()

    def run(self) -> None:
        connection = self._connect()
        while not self.stop.is_set():
            try:
                connection.request("POST", "/authenticate", REVIEW)
                response = connection.getresponse()
                body = json.loads(response.read())
            except (ConnectionResetError, BrokenPipeError):
                # client-go: a reset connection is retried (and a write that failed wrote
                # nothing); a connection closed as it was reused is not.
                self.retried += 1
                connection.close()
                connection = self._connect()
                continue
            except Exception as error:
                self.failures.append(f"{type(error).__name__}: {error}")
                connection.close()
                connection = self._connect()
                continue
            if response.status != 200 or body["status"].get("authenticated") is not True:
                self.failures.append(f"{response.status} {body}")
            self.answered.append((time.monotonic(), str(response.getheader(AUTHN_INSTANCE_HEADER))))
            time.sleep(0.002)
        connection.close()

    def _connect(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=5)


def _serve(webhook: AuthnWebhook) -> threading.Thread:
    thread = threading.Thread(target=webhook.serve, daemon=True)
    thread.start()
    return thread


class Serving:
    def __init__(self, webhook: AuthnWebhook) -> None:
        self.webhook, self.thread = webhook, _serve(webhook)

    def stopped_within(self, seconds: float) -> bool:
        """Whether ``serve`` returned (handed over and drained) within ``seconds``."""
        self.thread.join(seconds)
        return not self.thread.is_alive()


@pytest.fixture
def old(files: WebhookFiles) -> Iterator[Serving]:
    serving = Serving(AuthnWebhook(files, ("127.0.0.1", 0)))
    yield serving
    serving.webhook.shutdown()
    serving.thread.join(10)


def test_the_next_webhook_takes_the_port_and_no_review_fails(
    old: Serving, files: WebhookFiles, pki: Pki, tmp_path: Path
) -> None:
    context = _client(None, pki, tmp_path, pki.apiserver)  # type: ignore[arg-type]
    reviewers = [Reviewer(old.webhook.port, context) for _ in range(4)]  # client-go keeps several
    for reviewer in reviewers:
        reviewer.start()
    time.sleep(0.3)
    new = Serving(AuthnWebhook(files, ("127.0.0.1", old.webhook.port)))  # before: in use
    try:
        time.sleep(0.3)
        told = time.monotonic()
        old.webhook.shutdown(hand_over=20)
        stopped = old.stopped_within(15)
        stopped_in = time.monotonic() - told
        time.sleep(0.5)
    finally:
        for reviewer in reviewers:
            reviewer.stop.set()
            reviewer.join(10)
        new.webhook.shutdown()
        new.thread.join(10)
    old_id, new_id = old.webhook.instance, new.webhook.instance
    assert stopped and old.webhook.successor == new_id
    assert stopped_in < 10, f"{stopped_in:.1f}s: it waited for its bound, not for the next one"
    failures = [f for reviewer in reviewers for f in reviewer.failures]
    assert not failures, failures[:5]
    answered = sorted(a for reviewer in reviewers for a in reviewer.answered)
    assert {who for _, who in answered} == {old_id, new_id}
    last_old = max(t for t, who in answered if who == old_id)
    assert {who for t, who in answered if t > last_old} == {new_id}
    assert len(answered) > 100
    retried = sum(reviewer.retried for reviewer in reviewers)
    print(
        f"{len(answered)} reviews on 4 connections, none failed, {retried} retried after a "
        f"reset; the old webhook stopped {stopped_in:.2f}s after it was told"
    )


def test_with_no_next_webhook_it_serves_until_its_bound(
    old: Serving, pki: Pki, tmp_path: Path
) -> None:
    """An uninstall: nobody takes over. It answers all the while, and stops at the bound."""
    reviewer = Reviewer(old.webhook.port, _client(None, pki, tmp_path, pki.apiserver))  # type: ignore[arg-type]
    reviewer.start()
    time.sleep(0.2)
    told = time.monotonic()
    old.webhook.shutdown(hand_over=1.5)
    try:
        time.sleep(1.0)
        answered = len(reviewer.answered)
        time.sleep(0.3)
        assert len(reviewer.answered) > answered, "still answering within its bound"
        # ... but not ready: the node agent's probe must not switch to a webhook about to go
        # (found by the real node tier: a switch made to the old pod's webhook in its last
        # seconds, none after it).
        probe = http.client.HTTPSConnection(
            "127.0.0.1",
            old.webhook.port,
            context=_client(None, pki, tmp_path, None),
            timeout=5,  # type: ignore[arg-type]
        )
        probe.request("GET", "/healthz")
        answer = probe.getresponse()
        assert answer.status == 503 and b"handing over" in answer.read()
        stopped = old.stopped_within(10)
        took = time.monotonic() - told
    finally:
        reviewer.stop.set()
        reviewer.join(10)
    assert stopped and old.webhook.successor is None
    assert 1.5 <= took < 6, took


def test_the_command_waits_for_a_listener_that_does_not_share_the_port(
    pki: Pki, tmp_path: Path
) -> None:
    """The node's previous pod of 0.2.0 listens without sharing: the new webhook waits for it
    to go (it stops at SIGTERM) and takes the port within a tenth of a second, instead of
    failing and waiting out kubelet's back-off."""
    root = _host_root(tmp_path / "host", pki)
    port = _free_port()
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", port))
    holder.listen()
    process = subprocess.Popen(
        [str(KUBE_AUDIT), "authn-webhook", "--host-root", str(root),
         "--listen", f"127.0.0.1:{port}", "--hand-over", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        time.sleep(2)
        assert process.poll() is None, process.communicate()[0]
        holder.close()
        freed = time.monotonic()
        context = _client(None, pki, tmp_path, pki.apiserver)  # type: ignore[arg-type]
        while True:
            try:
                connection = http.client.HTTPSConnection(
                    "127.0.0.1", port, context=context, timeout=5
                )
                connection.request("POST", "/authenticate", REVIEW)
                body = json.loads(connection.getresponse().read())
                break
            except (ConnectionRefusedError, ConnectionResetError):
                assert time.monotonic() - freed < 10, "the port was never taken"
                time.sleep(0.02)
        took = time.monotonic() - freed
        assert body["status"]["user"]["username"] == "alice"
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=30)
    assert f"waiting for 127.0.0.1:{port}, where another process listens" in out, out
    assert took < 2, took
