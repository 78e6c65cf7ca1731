"""Issue 36 finding 4: how old the webhook's answers may be. The snapshot is confirmed current by
the operator on every reconcile (right after it listed the cluster); the webhook reports the
snapshot's age, refuses every token past a bound when told to, and its refresh loop neither
dies silently nor stops unnoticed."""

from __future__ import annotations

import http.client
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kube_audit.agent.apply import publish_identities
from kube_audit.agent.authn_webhook import AuthnWebhook, WebhookFiles
from kube_audit.agent.layout import HostLayout
from kube_audit.core.identities import (
    parse_confirmation,
    render_confirmation,
    render_identity_snapshot,
)
from kube_audit.core.settings import Settings
from tests.agent.conftest import desired
from tests.agent.test_authn_webhook import (  # noqa: F401 - pki and files are fixtures
    ALICE,
    BOB,
    Pki,
    _ask,
    _client,
    _write,
    files,
    pki,
)

CONFIRMED = datetime(2026, 12, 7, 9, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _serve(server: AuthnWebhook, *, look: bool) -> Iterator[AuthnWebhook]:
    thread = threading.Thread(target=lambda: server.serve(look=look), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join(10)


@pytest.fixture
def clock() -> Clock:
    return Clock(CONFIRMED)


@pytest.fixture
def bounded(files: WebhookFiles, clock: Clock) -> Iterator[AuthnWebhook]:  # noqa: F811
    """A webhook that refuses every token once the snapshot is over a minute unconfirmed."""
    _write(files.confirmation, render_confirmation("sha256:x", datetime.fromtimestamp(CONFIRMED)))
    yield from _serve(
        AuthnWebhook(files, ("127.0.0.1", 0), clock=clock, refuse_after=60), look=False
    )


def _get(webhook: AuthnWebhook, context: ssl.SSLContext, route: str) -> tuple[int, bytes]:
    """A bodiless GET, as kubelet's probe or the node agent asks."""
    connection = http.client.HTTPSConnection("127.0.0.1", webhook.port, context=context, timeout=10)
    connection.request("GET", route)
    answer = connection.getresponse()
    return answer.status, answer.read()


def _age(webhook: AuthnWebhook, pki: Pki, tmp_path: Path) -> float:  # noqa: F811
    text = _get(webhook, _client(webhook, pki, tmp_path, None), "/metrics")[1].decode()
    (line,) = [
        x for x in text.splitlines() if x.startswith("kube_audit_authn_snapshot_age_seconds ")
    ]
    return float(line.split()[1])


def test_the_snapshot_is_refused_past_its_bound_and_answered_again_once_confirmed(
    bounded: AuthnWebhook,
    files: WebhookFiles,  # noqa: F811
    pki: Pki,  # noqa: F811
    clock: Clock,
    tmp_path: Path,
) -> None:
    """Before, a node whose operator was stuck or cut off went on answering from its last
    snapshot for ever, a person deleted since included, with nothing saying so."""
    apiserver = _client(bounded, pki, tmp_path, pki.apiserver)
    clock.now = CONFIRMED + 59
    assert _ask(bounded, apiserver, ALICE.token)[1]["status"]["authenticated"] is True
    assert _age(bounded, pki, tmp_path) == 59
    clock.now = CONFIRMED + 61
    status, body = _ask(bounded, apiserver, ALICE.token)
    error = body["status"].get("error", "")
    assert status == 200 and body["status"]["authenticated"] is False
    assert "last confirmed 61 s ago" in error and "--refuse-after" in error, error
    assert _age(bounded, pki, tmp_path) == 61
    _write(files.confirmation, render_confirmation("sha256:x", datetime.fromtimestamp(clock.now)))
    bounded.refresh()
    assert _ask(bounded, apiserver, ALICE.token)[1]["status"]["authenticated"] is True


def test_never_confirmed_is_refused_only_when_a_bound_is_set(
    files: WebhookFiles,  # noqa: F811
    pki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    """An earlier agent wrote no confirmation: with no bound (the default) it is answered, and
    its age reads -1; with a bound it is refused, as an unconfirmed snapshot should be."""
    for bound, authenticated in ((None, True), (60.0, False)):
        server = AuthnWebhook(files, ("127.0.0.1", 0), refuse_after=bound)
        for webhook in _serve(server, look=False):
            status = _ask(webhook, _client(webhook, pki, tmp_path, pki.apiserver), ALICE.token)
            assert status[1]["status"]["authenticated"] is authenticated, (bound, status)
            assert _age(webhook, pki, tmp_path) == -1


def test_the_refresh_loop_survives_an_unexpected_error_and_a_stall_fails_healthz(
    files: WebhookFiles,  # noqa: F811
    pki: Pki,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before, only a HostError was caught: any other exception ended the loop silently and
    /healthz stayed 200 while new snapshots were never read."""
    server = AuthnWebhook(files, ("127.0.0.1", 0))
    failures = {"left": 2}
    real_refresh = server.source.refresh

    def flaky() -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("a file system that misbehaves")
        real_refresh()

    monkeypatch.setattr(server.source, "refresh", flaky)
    for webhook in _serve(server, look=True):
        _write(files.snapshot, render_identity_snapshot([BOB]))
        apiserver = _client(webhook, pki, tmp_path, pki.apiserver)
        deadline = time.monotonic() + 10
        while _ask(webhook, apiserver, BOB.token)[1]["status"].get("authenticated") is not True:
            assert time.monotonic() < deadline, "the loop stopped looking after the error"
            time.sleep(0.1)
        assert "RuntimeError: a file system that misbehaves" in caplog.text
        probe = _client(webhook, pki, tmp_path, None)
        assert _get(webhook, probe, "/healthz")[0] == 200
        webhook._looked -= 3600  # what a stuck loop leaves behind
        for route in ("/healthz", "/livez", "/readyz"):
            status, body = _get(webhook, probe, route)
            assert status == 503 and b"not looked at" in body, route


def test_live_before_any_snapshot_ready_only_with_one(
    files: WebhookFiles,  # noqa: F811
    pki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    """kubelet's probes (issue 36 finding 5): a webhook waiting for its first snapshot is alive
    (no restart) but not ready; each answered without a client certificate, as kubelet asks."""
    files.snapshot.unlink()
    for webhook in _serve(AuthnWebhook(files, ("127.0.0.1", 0)), look=False):
        probe = _client(webhook, pki, tmp_path, None)
        assert [_get(webhook, probe, r)[0] for r in ("/livez", "/readyz")] == [200, 503]
        _write(files.snapshot, render_identity_snapshot([ALICE]))
        webhook.refresh()
        assert [_get(webhook, probe, r)[0] for r in ("/livez", "/readyz")] == [200, 200]


def test_the_operator_confirms_the_snapshot_on_every_publish(layout: HostLayout) -> None:
    """What the staleness bound counts from: written beside the snapshot, in the webhook's
    folder, with the operator's wall time, each time (even when the people did not change)."""
    webhook = HostLayout(layout.root, Settings(identity_mode="webhook"),
                         layout.static_pod_dir, layout.state_dir)  # fmt: skip
    people = desired("alice", settings=webhook.settings)
    publish_identities(webhook, people, lambda: CONFIRMED)
    confirmation = webhook.webhook_dir / "confirmed.json"
    assert parse_confirmation(confirmation.read_bytes()) == CONFIRMED
    assert publish_identities(webhook, people, lambda: CONFIRMED + 300) == []
    assert parse_confirmation(confirmation.read_bytes()) == CONFIRMED + 300
