"""Webhook mode's own costs, 10,000 people (issue 21): a TokenReview answered by
``kube-audit authn-webhook`` over TLS with the pinned client certificate (p50 and p99; the goal
is p99 <= 5 ms for a cache miss), the same on a new connection each time, and the snapshot:
rendered by the node agent and re-read by the webhook. The real kube-apiserver's end of it
(identities changing with no restart) is in tests/controlplane/test_authn_webhook.py."""

from __future__ import annotations

import http.client
import json
import ssl
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kube_audit.agent.authn_webhook import AuthnWebhook, WebhookFiles  # noqa: E402
from kube_audit.agent.pki import generate_ca, issue  # noqa: E402
from kube_audit.core.identities import parse_identity_snapshot, render_identity_snapshot  # noqa: E402
from kube_audit.core.tokens import TokenRecord  # noqa: E402

PEOPLE = 10_000
REVIEWS = 2_000


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
    snapshot = render_identity_snapshot(records)
    results.append(
        ("render the snapshot (10,000 people)", (time.perf_counter() - start) * 1000, 200)
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
        server = AuthnWebhook(files, ("127.0.0.1", 0))
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
        context = ssl.create_default_context(cadata=webhook_ca.cert.decode())
        context.load_cert_chain(folder / "client.crt", folder / "client.key")

        def review(connection: http.client.HTTPSConnection, i: int) -> None:
            body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "spec": {"token": records[i % PEOPLE].token}}  # fmt: skip
            connection.request("POST", "/authenticate?timeout=30s", json.dumps(body),
                               {"Content-Type": "application/json"})  # fmt: skip
            answer = json.loads(connection.getresponse().read())
            assert answer["status"]["authenticated"], answer

        kept = http.client.HTTPSConnection("127.0.0.1", server.port, context=context)
        review(kept, 0)
        samples = []
        for i in range(REVIEWS):
            begin = time.perf_counter()
            review(kept, i * 7)
            samples.append(time.perf_counter() - begin)
        kept.close()
        results.append(("TokenReview, kept-alive TLS (client-go), p50", _ms(samples, 50), 5))
        results.append(("TokenReview, kept-alive TLS (client-go), p99", _ms(samples, 99), 5))
        fresh = []
        for i in range(200):
            begin = time.perf_counter()
            connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context)
            review(connection, i * 13)
            connection.close()
            fresh.append(time.perf_counter() - begin)
        results.append(("TokenReview on a new TLS connection, p99", _ms(fresh, 99), 20))
        server.shutdown()
        thread.join(10)

    width = max(len(n) for n, _, _ in results)
    failed = 0
    for name, value, target in results:
        verdict = "ok" if value <= target else "OVER TARGET"
        failed += value > target
        print(f"{name:<{width}}  {value:8.2f} ms  (target {target:.0f} ms)  {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
