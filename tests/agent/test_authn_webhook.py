"""``kube-audit authn-webhook`` over real TLS on loopback: who it answers, what it answers, and
what it does when the snapshot or the certificates change under it."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from kube_audit.agent.authn_webhook import AuthnWebhook, WebhookFiles
from kube_audit.agent.pki import KeyPair, generate_ca, issue, needs_renewal, not_after
from kube_audit.constants import CREDENTIAL_ID
from kube_audit.core.identities import render_identity_snapshot
from kube_audit.core.tokens import TokenRecord, fingerprint
from tests.controlplane.cluster import KUBE_AUDIT

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
ALICE = TokenRecord("alice", "u-alice", ("dev", "system:masters"), "a" * 43)
BOB = TokenRecord("bob", "u-bob", (), "b" * 43)


@dataclass
class Pki:
    webhook_ca: KeyPair
    cluster_ca: KeyPair
    apiserver: KeyPair  # the apiserver's client certificate, signed by the cluster CA
    other_client: KeyPair  # signed by the cluster CA too, but not the apiserver's


@pytest.fixture(scope="module")
def pki() -> Pki:
    webhook_ca = generate_ca(NOW)
    cluster_ca = generate_ca(NOW, "kubernetes")
    return Pki(
        webhook_ca,
        cluster_ca,
        issue(cluster_ca, NOW, common_name="kube-apiserver-kubelet-client", client=True),
        issue(cluster_ca, NOW, common_name="someone-else", client=True),
    )


def _write(path: Path, data: bytes) -> None:
    """Replaced, not rewritten in place: how the node agent and kubeadm write."""
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


@pytest.fixture
def files(tmp_path: Path, pki: Pki) -> WebhookFiles:
    serving = issue(
        pki.webhook_ca, datetime.now(UTC), common_name="kube-audit", hosts=("127.0.0.1",)
    )
    paths = WebhookFiles(
        snapshot=tmp_path / "identities.json",
        serving_cert=tmp_path / "serving.crt",
        serving_key=tmp_path / "serving.key",
        client_ca=tmp_path / "ca.crt",
        client_cert=tmp_path / "apiserver-kubelet-client.crt",
    )
    _write(paths.serving_cert, serving.cert)
    _write(paths.serving_key, serving.key)
    _write(paths.client_ca, pki.cluster_ca.cert)
    _write(paths.client_cert, pki.apiserver.cert)
    _write(paths.snapshot, render_identity_snapshot([ALICE]))
    return paths


@pytest.fixture
def webhook(files: WebhookFiles) -> Iterator[AuthnWebhook]:
    server = AuthnWebhook(files, ("127.0.0.1", 0))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join(10)


def _client(webhook: AuthnWebhook, pki: Pki, tmp_path: Path, who: KeyPair | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=pki.webhook_ca.cert.decode())
    if who is not None:
        cert, key = tmp_path / "client.crt", tmp_path / "client.key"
        cert.write_bytes(who.cert)
        key.write_bytes(who.key)
        context.load_cert_chain(cert, key)
    return context


def _ask(
    webhook: AuthnWebhook, context: ssl.SSLContext, token: str, path: str = "/authenticate"
) -> tuple[int, dict[str, Any]]:
    review = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token},
    }
    connection = http.client.HTTPSConnection("127.0.0.1", webhook.port, context=context, timeout=10)
    try:
        connection.request("POST", path, json.dumps(review), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_the_apiservers_certificate_gets_answers(
    webhook: AuthnWebhook, pki: Pki, tmp_path: Path
) -> None:
    apiserver = _client(webhook, pki, tmp_path, pki.apiserver)
    status, body = _ask(webhook, apiserver, ALICE.token)
    assert status == 200
    assert body["status"] == {
        "authenticated": True,
        "user": {
            "username": "alice",
            "uid": "u-alice",
            "groups": ["dev"],
            "extra": {CREDENTIAL_ID: [f"kube-audit-token={fingerprint(ALICE.token)}"]},
        },
    }
    assert _ask(webhook, apiserver, BOB.token) == (
        200,
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "status": {"authenticated": False},
        },
    )


def test_client_gos_query_and_a_kept_alive_connection_are_answered(
    webhook: AuthnWebhook, pki: Pki, tmp_path: Path
) -> None:
    """client-go posts to ``/authenticate?timeout=30s`` and keeps the connection: a wrong path
    answered before its body was read would leave the body to be parsed as the next request
    (found by the real kube-apiserver)."""
    review = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": ALICE.token},
    }
    context = _client(webhook, pki, tmp_path, pki.apiserver)
    connection = http.client.HTTPSConnection("127.0.0.1", webhook.port, context=context, timeout=10)
    try:
        for path, status in (
            ("/nowhere", 404),
            ("/authenticate?timeout=30s", 200),
            ("/authenticate", 200),
        ):
            connection.request("POST", path, json.dumps(review))
            response = connection.getresponse()
            assert response.status == status, response.read()
            body = json.loads(response.read())
            if status == 200:
                assert body["status"]["user"]["username"] == "alice"
    finally:
        connection.close()


def test_any_other_client_is_refused(webhook: AuthnWebhook, pki: Pki, tmp_path: Path) -> None:
    """Same cluster CA but not the apiserver's certificate: 403. No certificate: 403. A
    certificate of another CA: the handshake fails."""
    for who in (pki.other_client, None):
        status, body = _ask(webhook, _client(webhook, pki, tmp_path, who), ALICE.token)
        assert (status, body) == (
            403,
            {"error": "only kube-apiserver's client certificate is answered"},
        )
    stranger = issue(
        generate_ca(NOW), NOW, common_name="kube-apiserver-kubelet-client", client=True
    )
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _ask(webhook, _client(webhook, pki, tmp_path, stranger), ALICE.token)
    assert "kube_audit_authn_refused_clients_total 2.0" in _metrics(webhook, pki, tmp_path)


def _metrics(webhook: AuthnWebhook, pki: Pki, tmp_path: Path) -> str:
    connection = http.client.HTTPSConnection(
        "127.0.0.1", webhook.port, context=_client(webhook, pki, tmp_path, None), timeout=10
    )
    connection.request("GET", "/metrics")
    return connection.getresponse().read().decode()


def test_a_new_snapshot_is_answered_from_once_refreshed(
    webhook: AuthnWebhook, files: WebhookFiles, pki: Pki, tmp_path: Path
) -> None:
    apiserver = _client(webhook, pki, tmp_path, pki.apiserver)
    _write(files.snapshot, render_identity_snapshot([BOB]))
    webhook.refresh()  # what the server's own thread does when it looks
    assert _ask(webhook, apiserver, BOB.token)[1]["status"]["authenticated"] is True
    assert _ask(webhook, apiserver, ALICE.token)[1]["status"] == {"authenticated": False}


def test_a_corrupt_snapshot_keeps_the_last_good_one_and_says_so(
    webhook: AuthnWebhook,
    files: WebhookFiles,
    pki: Pki,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    apiserver = _client(webhook, pki, tmp_path, pki.apiserver)
    _write(files.snapshot, b'{"apiVersion": "kube-audit.io/v1alpha1", "kind": "IdentitySnapshot"')
    webhook.refresh()
    assert "not JSON" in caplog.text and "keeping the last good one" in caplog.text
    assert _ask(webhook, apiserver, ALICE.token)[1]["status"]["authenticated"] is True
    assert "kube_audit_authn_snapshot_errors_total 1.0" in _metrics(webhook, pki, tmp_path)


def test_before_any_snapshot_the_answer_is_an_error_and_healthz_says_not_loaded(
    files: WebhookFiles, pki: Pki, tmp_path: Path
) -> None:
    files.snapshot.unlink()
    server = AuthnWebhook(files, ("127.0.0.1", 0))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        status, body = _ask(server, _client(server, pki, tmp_path, pki.apiserver), ALICE.token)
        assert status == 200 and "not loaded yet" in body["status"]["error"]
        connection = http.client.HTTPSConnection(
            "127.0.0.1", server.port, context=_client(server, pki, tmp_path, None), timeout=10
        )
        connection.request("GET", "/healthz")
        assert connection.getresponse().status == 503
    finally:
        server.shutdown()
        thread.join(10)


def test_renewed_certificates_are_used_without_a_restart(
    webhook: AuthnWebhook, files: WebhookFiles, pki: Pki, tmp_path: Path
) -> None:
    """kubeadm renews the apiserver's client certificate in place; kube-apiserver re-reads its
    files only every few minutes, so for a while it still presents the old one. Issue 36
    finding 6: the old one used to be refused at once (people got 401 for up to 5 minutes);
    both are answered now (same subject, same cluster CA), another subject of that CA is not.
    The node agent renews the serving certificate (new handshakes present it)."""
    renewed = issue(pki.cluster_ca, NOW, common_name="kube-apiserver-kubelet-client", client=True)
    _write(files.client_cert, renewed.cert)
    serving = issue(
        pki.webhook_ca, datetime.now(UTC), common_name="kube-audit", hosts=("127.0.0.1",)
    )
    _write(files.serving_cert, serving.cert)
    _write(files.serving_key, serving.key)
    webhook.refresh()
    assert _ask(webhook, _client(webhook, pki, tmp_path, pki.apiserver), ALICE.token)[0] == 200
    assert _ask(webhook, _client(webhook, pki, tmp_path, renewed), ALICE.token)[0] == 200
    assert _ask(webhook, _client(webhook, pki, tmp_path, pki.other_client), ALICE.token)[0] == 403
    with socket.create_connection(("127.0.0.1", webhook.port), timeout=10) as raw:
        context = _client(webhook, pki, tmp_path, None)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            presented = tls.getpeercert(binary_form=True)
    assert presented == ssl.PEM_cert_to_DER_cert(serving.cert.decode())


def test_a_slow_or_silent_client_does_not_hold_up_the_others(
    webhook: AuthnWebhook, pki: Pki, tmp_path: Path
) -> None:
    with socket.create_connection(("127.0.0.1", webhook.port), timeout=10):
        status, _ = _ask(webhook, _client(webhook, pki, tmp_path, pki.apiserver), ALICE.token)
    assert status == 200


def test_a_serving_certificate_is_renewed_well_before_its_end_and_when_not_ours(pki: Pki) -> None:
    serving = issue(pki.webhook_ca, NOW, common_name="kube-audit", hosts=("127.0.0.1",))
    assert not needs_renewal(serving.cert, pki.webhook_ca.cert, NOW)
    assert needs_renewal(
        serving.cert, pki.webhook_ca.cert, not_after(serving.cert) - timedelta(days=89)
    )
    assert needs_renewal(serving.cert, pki.cluster_ca.cert, NOW), "signed by another CA"
    assert needs_renewal(None, pki.webhook_ca.cert, NOW)
    assert needs_renewal(b"garbage", pki.webhook_ca.cert, NOW)


def _host_root(root: Path, pki: Pki) -> Path:
    """A host tree laid out as the node agent and kubeadm leave it in webhook mode."""
    (root / "etc/kubernetes/pki").mkdir(parents=True)
    (root / "var/lib/kube-audit/authn-webhook").mkdir(parents=True)
    serving = issue(
        pki.webhook_ca, datetime.now(UTC), common_name="kube-audit", hosts=("127.0.0.1",)
    )
    _write(root / "var/lib/kube-audit/authn-webhook/serving.crt", serving.cert)
    _write(root / "var/lib/kube-audit/authn-webhook/serving.key", serving.key)
    _write(
        root / "var/lib/kube-audit/authn-webhook/identities.json", render_identity_snapshot([ALICE])
    )
    _write(root / "etc/kubernetes/pki/ca.crt", pki.cluster_ca.cert)
    _write(root / "etc/kubernetes/pki/apiserver-kubelet-client.crt", pki.apiserver.cert)
    return root


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_command_serves_from_the_host_tree_and_stops_on_sigterm(
    pki: Pki, tmp_path: Path
) -> None:
    root = _host_root(tmp_path / "host", pki)
    port = _free_port()
    process = subprocess.Popen(
        [
            str(KUBE_AUDIT),
            "authn-webhook",
            "--host-root",
            str(root),
            "--listen",
            f"127.0.0.1:{port}",
            "--hand-over",
            "1",  # nobody takes over here: it stops at this bound
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        context = ssl.create_default_context(cadata=pki.webhook_ca.cert.decode())
        (root / "c.crt").write_bytes(pki.apiserver.cert)
        (root / "c.key").write_bytes(pki.apiserver.key)
        context.load_cert_chain(root / "c.crt", root / "c.key")
        deadline = time.monotonic() + 30
        while True:
            try:
                connection = http.client.HTTPSConnection(
                    "127.0.0.1", port, context=context, timeout=10
                )
                review = {"apiVersion": "authentication.k8s.io/v1beta1", "kind": "TokenReview",
                          "spec": {"token": ALICE.token}}  # fmt: skip
                connection.request("POST", "/authenticate", json.dumps(review))
                answer = json.loads(connection.getresponse().read())
                break
            except ConnectionRefusedError:
                assert process.poll() is None and time.monotonic() < deadline, process.stdout
                time.sleep(0.1)
        assert answer["apiVersion"] == "authentication.k8s.io/v1beta1"
        assert answer["status"]["user"]["username"] == "alice"
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out
    assert "1 identities loaded" in out and "SIGTERM: serving on until" in out, out
    assert "no other webhook answered" in out and out.rstrip().endswith("stopped"), out


def test_the_command_names_a_missing_client_ca(pki: Pki, tmp_path: Path) -> None:
    root = _host_root(tmp_path / "host", pki)
    (root / "etc/kubernetes/pki/ca.crt").unlink()
    result = subprocess.run(
        [str(KUBE_AUDIT), "authn-webhook", "--host-root", str(root), "--listen", "127.0.0.1:0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"cannot read {root}/etc/kubernetes/pki/ca.crt" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_an_expired_token_is_refused_at_that_second(
    files: WebhookFiles, pki: Pki, tmp_path: Path
) -> None:
    """The webhook's own clock judges spec.expiresAt: no operator needs to be running."""
    expires = datetime(2027, 1, 31, 18, tzinfo=UTC)
    _write(
        files.snapshot, render_identity_snapshot([ALICE._replace(expires_at=expires.isoformat())])
    )
    clock = [expires.timestamp() - 1]
    server = AuthnWebhook(files, ("127.0.0.1", 0), clock=lambda: clock[0])
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        apiserver = _client(server, pki, tmp_path, pki.apiserver)
        assert _ask(server, apiserver, ALICE.token)[1]["status"]["authenticated"] is True
        clock[0] = expires.timestamp()
        assert _ask(server, apiserver, ALICE.token)[1]["status"] == {"authenticated": False}
    finally:
        server.shutdown()
        thread.join(10)


def test_the_webhook_ca_signs_for_the_loopback_only(files: WebhookFiles, pki: Pki) -> None:
    """Issue 36 finding 9: the CA a new node makes is name-constrained to 127.0.0.1, so a
    certificate it signed for any other address is refused by a verifying client (OpenSSL
    here, Go in kube-apiserver): its key, should it leak, serves nothing beyond the node."""
    constraints = x509.load_pem_x509_certificate(
        pki.webhook_ca.cert
    ).extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    assert constraints.value.permitted_subtrees == [
        x509.IPAddress(ipaddress.ip_network("127.0.0.1/32"))
    ]
    wider = issue(
        pki.webhook_ca, datetime.now(UTC), common_name="x", hosts=("127.0.0.1", "10.0.0.1")
    )
    _write(files.serving_cert, wider.cert)
    _write(files.serving_key, wider.key)
    server = AuthnWebhook(files, ("127.0.0.1", 0))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        context = ssl.create_default_context(cadata=pki.webhook_ca.cert.decode())
        with (
            pytest.raises(ssl.SSLCertVerificationError, match="subtree"),
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        ):
            context.wrap_socket(raw, server_hostname="127.0.0.1").close()
    finally:
        server.shutdown()
        thread.join(10)
