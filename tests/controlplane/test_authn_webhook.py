"""``kube-audit authn-webhook`` judged by the real kube-apiserver (issue 21): a node made by
real kubeadm whose apiserver asks our webhook, with the flags webhook mode sets, who holds a
bearer token. What it is shown: identities change with no apiserver restart; the webhook's
``system:`` filter holds; another process on the webhook's port gets no identity through;
with the webhook down people are refused and x509 admin goes on; a webhook slower than 5 s is
waited for, up to the apiserver's 30 s.

The apiserver's side alone: the test writes webhook mode's files (the kubeconfig, the CA, the
serving certificate, the snapshot) as the node agent does; the agent writing them is proven in
tests/agent and on the real node tier."""

from __future__ import annotations

import base64
import http.client
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from kube_audit.agent.pki import KeyPair, generate_ca, issue
from kube_audit.constants import AUTHN_WEBHOOK_PORT, CREDENTIAL_ID
from kube_audit.core.identities import credential_id, render_identity_snapshot
from kube_audit.core.tokens import TokenRecord
from tests.agent.test_webhook_crowd import (
    CROWD,
    OTHERS,
    SETTLE_SECONDS,
    Crowd,
    memory_limit_mib,
    peak_rss_mib,
)
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
from tests.controlplane.webhook_standins import Impostor, SlowWebhook, serve_tls

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
        return self.node.tree / "var/lib/kube-audit/authn-webhook/identities.json"

    @property
    def log(self) -> Path:
        return self.node.work / "authn-webhook.log"

    def people(self, *records: TokenRecord) -> None:
        _write(self.snapshot, render_identity_snapshot(records))

    def start_webhook(self, listen: str = f"127.0.0.1:{AUTHN_WEBHOOK_PORT}") -> None:
        with self.log.open("ab") as out:
            command = [
                KUBE_AUDIT,
                "authn-webhook",
                "--host-root",
                self.node.tree,
                "--listen",
                listen,
                # Stopped here to be down (no next pod takes over): at once, not after its
                # wait for one (tests/realnode measures the hand-over).
                "--hand-over",
                "0",
            ]
            self.process = subprocess.Popen(
                [str(part) for part in command],
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
        # issue 36 finding 7: kube-apiserver takes the token's fingerprint as the credential ID
        "extra": {CREDENTIAL_ID: [credential_id(ALICE.token)]},
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
        "extra": {CREDENTIAL_ID: [credential_id(MALLORY.token)]},
    }
    config = cp.token_kubeconfig(cp.base / "mallory.kubeconfig", MALLORY.token)
    denied = cp.kubectl("get", "secrets", "-A", kubeconfig=config, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr, denied.stderr


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
    impostor = serve_tls(Impostor, serving, tmp_path)
    try:
        for record in (BOB, ALICE):
            assert _accepted(cp, record) is None, f"{record.username} accepted by an impostor"
        log = webhook.node.apiserver_log()
        assert "x509" in log or "certificate" in log, log[-3000:]
    finally:
        impostor.shutdown()
        impostor.server_close()

    webhook.start_webhook()
    back = time.monotonic()
    wait_for("bob accepted with the webhook back", lambda: _accepted(cp, BOB) is not None, 30, 0.2)
    print(
        f"webhook down: bob refused after {refused_after:.1f}s; back: accepted after "
        f"{time.monotonic() - back:.1f}s (including the webhook's start)"
    )


def _timed(cp: ControlPlane, record: TokenRecord) -> tuple[float, dict[str, Any] | None]:
    started = time.monotonic()
    answer = _accepted(cp, record)
    return time.monotonic() - started, answer


def test_a_slow_webhook_is_waited_for_up_to_30_seconds(
    webhook: WebhookNode, tmp_path: Path
) -> None:
    """What clients see when the webhook is slower than 5 s (docs/identity-modes.md): the
    request waits that long once per token and cache TTL, then answers from the apiserver's
    cache; the apiserver gives up after 30 s in all (retries included) and the client gets 401.
    x509 admin never waits."""
    cp = webhook.cp
    carol = TokenRecord("carol", "u-carol", ("dev",), "carol-" + "c" * 40)
    dave = TokenRecord("dave", "u-dave", ("dev",), "dave-" + "d" * 40)
    webhook.people(BOB, carol, dave)  # carol and dave never asked for: in no cache
    webhook.stop_webhook()
    upstream = AUTHN_WEBHOOK_PORT + 1
    webhook.start_webhook(f"127.0.0.1:{upstream}")
    slow = SlowWebhook(webhook.ca, webhook.node.tree, delay=6, upstream=upstream)
    server = slow.serve(tmp_path)
    try:
        first, answer = _timed(cp, carol)
        assert answer is not None and answer["username"] == "carol", answer
        again, answer = _timed(cp, carol)
        assert answer is not None
        admin_started = time.monotonic()
        assert cp.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
        admin = time.monotonic() - admin_started
        assert 6 <= first < 6 + 5, f"first review took {first:.1f}s"
        assert again < 3, f"the cached answer took {again:.1f}s"
        assert admin < 3, f"x509 admin took {admin:.1f}s"
        slow.delay = 40
        over, answer = _timed(cp, dave)
        assert answer is None, "an answer later than 30 s is never used"
        assert 30 <= over < 30 + 5, f"gave up after {over:.1f}s"
    finally:
        server.shutdown()
        server.server_close()
        webhook.stop_webhook()
        webhook.start_webhook()
    wait_for("bob accepted with the webhook back", lambda: _accepted(cp, BOB) is not None, 30, 0.2)
    print(
        f"webhook 6 s late: first request {first:.1f}s, cached {again:.1f}s, x509 admin "
        f"{admin:.1f}s; 40 s late: 401 after {over:.1f}s"
    )


def _metric(name: str) -> float:
    """One of the webhook's counters, over its bodiless /metrics (no client certificate)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    connection = http.client.HTTPSConnection(
        "127.0.0.1", AUTHN_WEBHOOK_PORT, context=context, timeout=10
    )
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    values = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(values[0]) if values else 0.0


def test_a_crowd_of_slow_local_clients_does_not_starve_the_apiservers_reviews(
    webhook: WebhookNode,
    open_files: None,
) -> None:
    """Issue 36 finding 3, judged by the real kube-apiserver: with the finding's 2,000 slow
    connections (and 800 other slow clients) on the webhook's port, people never asked before
    (in no cache) are answered through the apiserver as fast as without them, and the
    webhook process stays under its container's memory limit."""
    cp = webhook.cp
    people = [TokenRecord(f"crowd-{n}", f"u-crowd-{n}", ("dev",), f"crowd-{n}-" + "c" * 40)
              for n in range(10)]  # fmt: skip
    webhook.people(BOB, *people)
    wait_for("bob accepted", lambda: _accepted(cp, BOB) is not None, 30, 0.2)
    quiet, _ = _timed(cp, people[0])
    crowd = Crowd(AUTHN_WEBHOOK_PORT, (OTHERS, CROWD, OTHERS))
    crowd.start()
    try:
        assert crowd.ready.wait(90), f"only {crowd.attempts} of the crowd tried"
        time.sleep(SETTLE_SECONDS)
        timed = [_timed(cp, record) for record in people[1:]]
        assert webhook.process is not None
        peak = peak_rss_mib(webhook.process.pid)
    finally:
        crowd.stop()
    assert all(answer is not None for _, answer in timed), timed
    seconds = [took for took, _ in timed]
    limit = memory_limit_mib()
    print(f"real apiserver, {crowd.size} slow clients on the webhook's port: whoami with a new "
          f"person at most {max(seconds):.2f} s (kubectl included; {quiet:.2f} s without the "
          f"crowd); webhook peak RSS {peak:.1f} MiB of {limit} MiB")  # fmt: skip
    assert max(seconds) < 1.0, seconds
    assert peak < limit


def test_a_kubeadm_renewal_of_the_apiservers_client_certificate_refuses_nobody(
    webhook: WebhookNode,
) -> None:
    """Issue 36 finding 6: ``kubeadm certs renew apiserver-kubelet-client`` rewrites the
    certificate the webhook pins, while kube-apiserver goes on presenting the one it loaded
    (it re-reads its files every few minutes). Before, the webhook pinned the new one at once
    and answered the apiserver 403: every person not in its cache got 401 until then. Now it
    answers the same subject from the cluster CA: a person never asked before is accepted."""
    cp, node = webhook.cp, webhook.node
    carol = TokenRecord("carol", "u-carol", ("dev",), "carol-" + "r" * 40)
    webhook.people(BOB, carol)
    wait_for("bob accepted", lambda: _accepted(cp, BOB) is not None, 30, 0.2)
    cert = node.tree / "etc/kubernetes/pki/apiserver-kubelet-client.crt"
    before, refused = cert.read_bytes(), _metric("kube_audit_authn_refused_clients_total")
    node.kubeadm("certs", "renew", "apiserver-kubelet-client", "--config", str(node.kubeadm_config))
    assert cert.read_bytes() != before, "kubeadm renewed the certificate"
    time.sleep(1)  # the webhook looks at its files four times a second
    answer = _accepted(cp, carol)
    assert answer is not None and answer["username"] == "carol", answer
    assert _metric("kube_audit_authn_refused_clients_total") == refused, "the apiserver refused"
    assert "x509" not in node.apiserver_log()[-3000:]
