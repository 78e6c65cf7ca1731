"""Webhook mode's own costs, 10,000 people (issue 21): a TokenReview answered by
``kube-audit authn-webhook`` over TLS with the pinned client certificate (p50 and p99; the goal
is p99 <= 5 ms for a cache miss), the same on a new connection each time, TokenReviews per
second on one core, the webhook's memory (goal <= 60 MB) and the snapshot: rendered by the node
agent and re-read by the webhook. The webhook runs as its own process, as in its container.
The real kube-apiserver's end of it is in tests/controlplane/test_authn_webhook.py and
bench/realnode_bench.py."""

from __future__ import annotations

import http.client
import json
import multiprocessing
import socket
import ssl
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kube_audit.agent.authn_webhook import AuthnWebhook, WebhookFiles  # noqa: E402
from kube_audit.agent.pki import generate_ca, issue  # noqa: E402
from kube_audit.core.identities import (  # noqa: E402
    parse_identity_snapshot,
    render_digest_key,
    render_identity_snapshot,
    render_keyed_snapshot,
)
from kube_audit.core.tokens import TokenRecord  # noqa: E402

PEOPLE = 10_000
REVIEWS = 2_000
THROUGHPUT_SECONDS = 3.0


def _serve(files: WebhookFiles, port: int) -> None:
    """The child: what ``kube-audit authn-webhook`` runs, on one core (one process)."""
    AuthnWebhook(files, ("127.0.0.1", port)).serve()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _ms(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100)[int(q) - 1] * 1000 if q < 100 else max(samples)


def main() -> int:
    records = [
        TokenRecord(f"user-{i:05d}", f"uid-{i:05d}", ("developer", f"team-{i % 50}"),
                    f"tok-{i:05d}-{'x' * 40}")
        for i in range(PEOPLE)
    ]  # fmt: skip
    results: list[tuple[str, float, float]] = []
    start = time.perf_counter()
    key = bytes(range(32))
    snapshot = render_keyed_snapshot(render_identity_snapshot(records), key)
    results.append(
        ("render the snapshot, keyed (10,000 people)", (time.perf_counter() - start) * 1000, 200)
    )
    start = time.perf_counter()
    parse_identity_snapshot(snapshot)
    results.append(
        ("parse the snapshot (the webhook's re-read)", (time.perf_counter() - start) * 1000, 200)
    )

    now = datetime.now(UTC)
    webhook_ca, cluster_ca = generate_ca(now), generate_ca(now, "kubernetes")
    serving = issue(webhook_ca, now, common_name="kube-audit", hosts=("127.0.0.1",))
    client = issue(cluster_ca, now, common_name="kube-apiserver-kubelet-client", client=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        written = {
            "identities.json": snapshot,
            "digest.key": render_digest_key(key),
            "serving.crt": serving.cert,
            "serving.key": serving.key,
            "ca.crt": cluster_ca.cert,
            "client.crt": client.cert,
            "client.key": client.key,
        }
        for name, data in written.items():
            (folder / name).write_bytes(data)
        files = WebhookFiles(
            *(folder / n for n in ("identities.json", "serving.crt", "serving.key", "ca.crt")),
            client_cert=folder / "client.crt",
        )
        port = _free_port()
        child = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(files, port), daemon=True
        )
        child.start()
        context = ssl.create_default_context(cadata=webhook_ca.cert.decode())
        context.load_cert_chain(folder / "client.crt", folder / "client.key")

        def review(connection: http.client.HTTPSConnection, i: int) -> None:
            body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "spec": {"token": records[i % PEOPLE].token}}  # fmt: skip
            connection.request("POST", "/authenticate?timeout=30s", json.dumps(body),
                               {"Content-Type": "application/json"})  # fmt: skip
            answer = json.loads(connection.getresponse().read())
            assert answer["status"]["authenticated"], answer

        kept = http.client.HTTPSConnection("127.0.0.1", port, context=context)
        deadline = time.monotonic() + 30
        while True:
            try:
                review(kept, 0)
                break
            except (ConnectionRefusedError, json.JSONDecodeError, KeyError):
                kept.close()  # not listening yet, or the snapshot not loaded yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        samples = []
        for i in range(REVIEWS):
            begin = time.perf_counter()
            review(kept, i * 7)
            samples.append(time.perf_counter() - begin)
        answered, begin = 0, time.perf_counter()
        while time.perf_counter() - begin < THROUGHPUT_SECONDS:
            review(kept, answered * 11)
            answered += 1
        per_second = answered / (time.perf_counter() - begin)
        kept.close()
        results.append(("TokenReview, kept-alive TLS (client-go), p50", _ms(samples, 50), 5))
        results.append(("TokenReview, kept-alive TLS (client-go), p99", _ms(samples, 99), 5))
        fresh = []
        for i in range(200):
            begin = time.perf_counter()
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=context)
            review(connection, i * 13)
            connection.close()
            fresh.append(time.perf_counter() - begin)
        results.append(("TokenReview on a new TLS connection, p99", _ms(fresh, 99), 20))
        assert child.pid is not None
        rss, peak = _memory_mb(child.pid)
        child.terminate()
        child.join(10)

    width = max(len(n) for n, _, _ in results)
    failed = 0
    for name, value, target in results:
        verdict = "ok" if value <= target else "OVER TARGET"
        failed += value > target
        print(f"{name:<{width}}  {value:8.2f} ms  (target {target:.0f} ms)  {verdict}")
    verdict = "ok" if peak <= 60 else "OVER TARGET"
    failed += peak > 60
    print(f"webhook memory, 10,000 people: RSS {rss:.1f} MB, peak {peak:.1f} MB "
          f"(target 60 MB)  {verdict}")  # fmt: skip
    print(f"TokenReviews per second, one connection, the webhook on one core: {per_second:.0f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
