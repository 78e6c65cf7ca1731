"""``kube-audit authn-webhook`` judged by the real kube-apiserver (issue 21): a node made by
real kubeadm whose apiserver asks our webhook, with the flags webhook mode sets, who holds a
bearer token. What it is shown: identities change with no apiserver restart; the webhook's
``system:`` filter holds; another process on the webhook's port gets no identity through;
with the webhook down people are refused and x509 admin goes on.

The node agent does not write webhook mode's files yet: this test writes them as it will (the
kubeconfig, the CA, the serving certificate, the snapshot)."""

from __future__ import annotations

import base64
import http.server
import json
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from kube_audit.agent.pki import KeyPair, generate_ca, issue
from kube_audit.constants import AUTHN_WEBHOOK_PORT
from kube_audit.core.identities import render_identity_snapshot
from kube_audit.core.tokens import TokenRecord
from tests.controlplane.cluster import (
    KUBE_AUDIT,
    SINGLE_NODE_PHASES,
    ControlPlane,
    Node,
    bind_cluster_admins,
    cluster_configuration,
    control_plane,
    require_tier,
    stop_process,
    wait_for,
)
from tests.controlplane.test_job import whoami

CONFIG_DIR = "/etc/kubernetes/kube-audit-authn"
# Short, so the test sees cached answers age out; webhook mode's default will be 10s.
CACHE_TTL = 2
ALICE = TokenRecord("alice", "u-alice", ("dev",), "alice-" + "a" * 40)
BOB = TokenRecord("bob", "u-bob", ("ops",), "bob-" + "b" * 40)
MALLORY = TokenRecord("mallory", "u-mallory", ("dev", "system:masters", "kubeadm:cluster-admins"),
                      "mallory-" + "m" * 40)  # fmt: skip


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_bytes(data)
    temporary.chmod(mode)
    os.replace(temporary, path)


@dataclass
class WebhookNode:
    cp: ControlPlane
    node: Node
    ca: KeyPair
    process: subprocess.Popen[bytes] | None = None

    @property
    def snapshot(self) -> Path:
        return self.node.tree / "var/lib/kube-audit/identities.json"

    @property
    def log(self) -> Path:
        return self.node.work / "authn-webhook.log"

    def people(self, *records: TokenRecord) -> None:
        _write(self.snapshot, render_identity_snapshot(records))

    def start_webhook(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(KUBE_AUDIT), "authn-webhook", "--host-root", str(self.node.tree)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.cp.processes.append(self.process)

    def stop_webhook(self) -> None:
        assert self.process is not None
        assert stop_process(self.process, grace=30) == 0, self.log.read_text()[-2000:]
        self.cp.processes.remove(self.process)
        self.process = None

    def starts(self) -> int:
        return len(self.node.apiserver_events("start"))


def _webhook_files(node: Node) -> KeyPair:
    """What webhook mode's node agent writes before the apiserver needs it."""
    now = datetime.now(UTC)
    ca = generate_ca(now)
    serving = issue(ca, now, common_name="kube-audit-authn-webhook", hosts=("127.0.0.1",))
    folder = node.tree / "var/lib/kube-audit/authn-webhook"
    _write(folder / "serving.crt", serving.cert)
    _write(folder / "serving.key", serving.key)
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kube-audit", "cluster": {
            "server": f"https://127.0.0.1:{AUTHN_WEBHOOK_PORT}/authenticate",
            "certificate-authority-data": base64.b64encode(ca.cert).decode()}}],
        "users": [{"name": "kube-apiserver", "user": {
            "client-certificate": "/etc/kubernetes/pki/apiserver-kubelet-client.crt",
            "client-key": "/etc/kubernetes/pki/apiserver-kubelet-client.key"}}],
        "contexts": [{"name": "webhook", "context": {"cluster": "kube-audit",
                                                     "user": "kube-apiserver"}}],
        "current-context": "webhook",
    }  # fmt: skip
    _write(node.tree / CONFIG_DIR.lstrip("/") / "kubeconfig", yaml.safe_dump(kubeconfig).encode())
    return ca


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebhookNode]:
    require_tier()
    with control_plane(tmp_path_factory.mktemp("authn")) as cp:
        node = cp.add_node(1)
        flags = {
            "authentication-token-webhook-config-file": f"{CONFIG_DIR}/kubeconfig",
            "authentication-token-webhook-version": "v1",
            "authentication-token-webhook-cache-ttl": f"{CACHE_TTL}s",
        }
        node.write_kubeadm_config(cluster_configuration("kube-audit-authn", {"apiServer": {
            "extraArgs": [{"name": k, "value": v} for k, v in flags.items()],
            "extraVolumes": [{"name": "kube-audit-authn", "hostPath": CONFIG_DIR,
                              "mountPath": CONFIG_DIR, "readOnly": True,
                              "pathType": "Directory"}]}}))  # fmt: skip
        node.init_phases(SINGLE_NODE_PHASES[:1])  # certs: the webhook pins the apiserver's
        ca = _webhook_files(node)
        node.init_phases(SINGLE_NODE_PHASES[1:])
        assert "--token-auth-file" not in node.manifest.read_text()
        running = WebhookNode(cp, node, ca)
        running.people(ALICE)
        running.start_webhook()
        node.start()
        node.wait_ready()
        bind_cluster_admins(cp, node)
        yield running


def _accepted(cp: ControlPlane, record: TokenRecord) -> dict[str, Any] | None:
    answer = whoami(cp, record.token)
    return answer if isinstance(answer, dict) else None


def test_identities_change_with_no_apiserver_restart(webhook: WebhookNode) -> None:
    """alice works, exactly as the snapshot says; bob is added and alice taken away by a new
    snapshot only: bob is accepted at once, alice refused once cached answers age out (the
    webhook TTL, plus the 10 s the apiserver keeps successes); the apiserver never restarts."""
    cp = webhook.cp
    starts = webhook.starts()
    assert _accepted(cp, ALICE) == {
        "username": "alice",
        "uid": "u-alice",
        "groups": ["dev", "system:authenticated"],
    }
    assert _accepted(cp, BOB) is None
    changed = time.monotonic()
    webhook.people(BOB)
    wait_for("bob accepted", lambda: _accepted(cp, BOB) is not None, 30, 0.2)
    bob_after = time.monotonic() - changed
    wait_for("alice refused", lambda: _accepted(cp, ALICE) is None, 60, 0.5)
    alice_after = time.monotonic() - changed
    assert alice_after < CACHE_TTL + 10 + 1 + 5, f"alice refused only after {alice_after:.1f}s"
    assert webhook.starts() == starts, "no apiserver restart"
    print(
        f"new snapshot: bob accepted after {bob_after:.1f}s, alice refused after {alice_after:.1f}s"
    )


def test_a_system_group_in_the_snapshot_is_never_given(webhook: WebhookNode) -> None:
    cp = webhook.cp
    webhook.people(BOB, MALLORY)
    wait_for("mallory accepted", lambda: _accepted(cp, MALLORY) is not None, 30, 0.2)
    assert _accepted(cp, MALLORY) == {
        "username": "mallory",
        "uid": "u-mallory",
        "groups": ["dev", "system:authenticated"],
    }
    config = cp.token_kubeconfig(cp.base / "mallory.kubeconfig", MALLORY.token)
    denied = cp.kubectl("get", "secrets", "-A", kubeconfig=config, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr, denied.stderr


class _Impostor(http.server.BaseHTTPRequestHandler):
    """Says yes to every token, as cluster-admin."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                           "status": {"authenticated": True, "user": {
                               "username": "impostor", "groups": ["system:masters"]}}}).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_down_refuses_people_not_admin_and_an_impostor_on_the_port_gets_nothing_through(
    webhook: WebhookNode, tmp_path: Path
) -> None:
    """The webhook stopped: people are refused once cached answers age out (no restart: the
    apiserver asks again each time), x509 admin works. Another process on its port, with a
    certificate we did not issue: no token is accepted through it. The webhook back: people
    are accepted at once (errors are never cached)."""
    cp = webhook.cp
    webhook.people(BOB)
    wait_for("bob accepted", lambda: _accepted(cp, BOB) is not None, 30, 0.2)
    webhook.stop_webhook()
    stopped = time.monotonic()
    wait_for("bob refused with the webhook down", lambda: _accepted(cp, BOB) is None, 60, 0.5)
    refused_after = time.monotonic() - stopped
    assert cp.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok", "x509 admin unaffected"

    stranger = generate_ca(datetime.now(UTC), "not ours")
    serving = issue(stranger, datetime.now(UTC), common_name="impostor", hosts=("127.0.0.1",))
    (tmp_path / "s.crt").write_bytes(serving.cert)
    (tmp_path / "s.key").write_bytes(serving.key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "s.crt", tmp_path / "s.key")
    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", AUTHN_WEBHOOK_PORT), _Impostor)
    impostor.socket = context.wrap_socket(impostor.socket, server_side=True)
    thread = threading.Thread(target=impostor.serve_forever, daemon=True)
    thread.start()
    try:
        for record in (BOB, ALICE):
            assert _accepted(cp, record) is None, f"{record.username} accepted by an impostor"
        log = webhook.node.apiserver_log()
        assert "x509" in log or "certificate" in log, log[-3000:]
    finally:
        impostor.shutdown()
        impostor.server_close()
        thread.join(10)

    webhook.start_webhook()
    back = time.monotonic()
    wait_for("bob accepted with the webhook back", lambda: _accepted(cp, BOB) is not None, 30, 0.2)
    print(
        f"webhook down: bob refused after {refused_after:.1f}s; back: accepted after "
        f"{time.monotonic() - back:.1f}s (including the webhook's start)"
    )
