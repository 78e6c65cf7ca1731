"""``make bench``: timings against the targets the issues set (reported, never asserted in tests).

Render: 10,000 users and 200 policy rules under 200 ms on one core. Manifest patch. Node agent:
a no-op apply and a full apply under 100 ms each without the health wait. Then, as their own
processes, ``who`` against jq and grep (who_bench.py), webhook mode's TokenReview latency and
snapshot (webhook_bench.py), the real control plane
(controlplane_bench.py: apply -> working token, apiserver downtime; ha_bench.py: failed requests
through HAProxy during a rollout over three nodes, rollout time, identities missing after a
kubeadm rewrite; realnode_bench.py: the image and its pod on the real kubelet;
BENCH_SKIP_CONTROLPLANE=1 skips the three), shipping to the real VictoriaLogs against vlagent
(store_bench.py; BENCH_SKIP_STORE=1 skips it) and the operator with 10,000
AuditUsers (operator_bench.py; BENCH_SKIP_OPERATOR=1 skips it, it takes minutes).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import audit_policy, audit_user, kubeadm_manifest_text, long_token, token_secret  # noqa: E402

from kube_audit.agent.apply import apply_node  # noqa: E402
from kube_audit.agent.layout import HostLayout  # noqa: E402
from kube_audit.core.manifest import parse_manifest, patch_manifest  # noqa: E402
from kube_audit.core.plan import collect_inputs, plan_desired, plan_manifest  # noqa: E402
from kube_audit.core.settings import Settings  # noqa: E402

RESULTS: list[tuple[str, float, float]] = []


def measure(name: str, target_ms: float, func: Callable[[], object], repeat: int = 7) -> None:
    func()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        samples.append((time.perf_counter() - start) * 1000)
    median = statistics.median(samples)
    RESULTS.append((name, median, target_ms))


def main() -> int:
    users = [
        audit_user(f"user-{i:05d}", groups=["developer", f"team-{i % 50}"]) for i in range(10_000)
    ]
    secrets = [
        token_secret(f"audituser-user-{i:05d}", long_token(f"tok-{i:05d}-abcdefghijklmnop"))
        for i in range(10_000)
    ]
    policies = [
        audit_policy(
            f"policy-{p:02d}",
            priority=p,
            omitStages=["RequestReceived"],
            rules=[
                {"level": "Metadata", "userGroups": [f"team-{r}"], "verbs": ["create", "delete"]}
                for r in range(10)
            ],
        )
        for p in range(20)
    ]
    docs = [(f"bench#{i}", o) for i, o in enumerate([*users, *secrets, *policies])]
    inputs = collect_inputs(docs)
    settings = Settings()
    measure(
        "render 10,000 users + 200 rules (validated inputs)",
        200,
        lambda: plan_desired(inputs, settings),
    )
    measure(
        "parse + validate + render, from objects",
        1000,
        lambda: plan_desired(collect_inputs(docs), settings),
        3,
    )

    desired = plan_desired(inputs, settings)
    manifest = parse_manifest(kubeadm_manifest_text("v1.31"))
    config = desired.manifest_config()
    measure("patch kube-apiserver manifest", 5, lambda: patch_manifest(manifest, config), 50)

    with tempfile.TemporaryDirectory() as tmp:
        host = Path(tmp) / "host"
        shutil.copytree(REPO / "examples/demo/host", host)
        layout = HostLayout.discover(host, settings)
        small = plan_desired(
            collect_inputs(
                [(f"s#{i}", o) for i, o in enumerate([*users[:100], *secrets[:100], *policies[:2]])]
            ),
            settings,
        )
        other = plan_desired(
            collect_inputs(
                [(f"s#{i}", o) for i, o in enumerate([*users[:101], *secrets[:101], *policies[:2]])]
            ),
            settings,
        )
        apply_node(layout, small, None)
        measure("node apply, no-op (100 users)", 100, lambda: apply_node(layout, small, None))
        flip = [small, other]

        def full() -> None:
            flip.reverse()
            apply_node(layout, flip[0], None)

        measure("node apply, full change (100 users)", 100, full)
        measure("plan_manifest on the apply path", 5, lambda: plan_manifest(manifest, small), 50)

    width = max(len(n) for n, _, _ in RESULTS)
    failed = 0
    for name, median, target in RESULTS:
        verdict = "ok" if median <= target else "OVER TARGET"
        failed += median > target
        print(f"{name:<{width}}  {median:8.1f} ms  (target {target:.0f} ms)  {verdict}")
    import subprocess  # noqa: PLC0415 - only for the benchmarks run as their own processes

    failed += subprocess.call([sys.executable, str(REPO / "bench/who_bench.py")]) != 0
    failed += subprocess.call([sys.executable, str(REPO / "bench/webhook_bench.py")]) != 0
    if os.environ.get("BENCH_SKIP_CONTROLPLANE") != "1":
        failed += subprocess.call([sys.executable, str(REPO / "bench/controlplane_bench.py")]) != 0
        failed += subprocess.call([sys.executable, str(REPO / "bench/ha_bench.py")]) != 0
        failed += subprocess.call([sys.executable, str(REPO / "bench/realnode_bench.py")]) != 0
    if os.environ.get("BENCH_SKIP_STORE") != "1":
        failed += subprocess.call([sys.executable, str(REPO / "bench/store_bench.py")]) != 0
    if os.environ.get("BENCH_SKIP_OPERATOR") != "1":
        failed += subprocess.call([sys.executable, str(REPO / "bench/operator_bench.py")]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
