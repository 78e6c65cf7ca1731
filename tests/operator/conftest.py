"""Simulated control-plane nodes: each a kopf operator on its own thread and event loop,
with its own host root, all watching one in-process mock API server."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from kube_audit.agent.health import Expectation, HealthCheck, HealthOutcome
from kube_audit.agent.layout import HostLayout
from kube_audit.constants import CONTROL_PLANE_LABEL
from kube_audit.controller.config import OperatorConfig
from kube_audit.controller.main import run_operator
from kube_audit.controller.metrics import Metrics
from kube_audit.controller.reconciler import NodeRuntime
from kube_audit.controller.rollout import Planned, Rollout
from kube_audit.core.manifest import flag_value, parse_manifest
from kube_audit.core.plan import DesiredState
from kube_audit.kube import KubeApi
from tests.agent.conftest import make_host
from tests.clock import ManualClock
from tests.operator.cluster import OPERATOR_TOKEN, ClusterThread

GROUP, VERSION = "kube-audit.io", "v1alpha1"


@dataclass
class RecordingHealth(HealthCheck):
    """Stands in for the wait on the new apiserver: records when each node restarted."""

    node: str = ""
    journal: list[tuple[str, float, float]] = field(default_factory=list)
    seconds: float = 0.2
    ready: Callable[[], bool] = lambda: True
    # Not ready: answering 500 (True, may be transient) or never answering (False, a crash).
    transient: bool = False
    # Config hashes the apiserver does not start with, whatever ``ready`` says.
    refused: set[str] = field(default_factory=set)

    def wait_ready(self, require_restart: bool = True, expect: object = None) -> HealthOutcome:
        start = time.monotonic()
        time.sleep(self.seconds)
        self.journal.append((self.node, start, time.monotonic()))
        wanted = expect.config_hash if isinstance(expect, Expectation) else None
        ok = self.ready() and wanted not in self.refused
        if ok:
            return HealthOutcome(True, "ready")
        if self.transient:
            return HealthOutcome(False, "not ready within 180s; last error: HTTP 500")
        return HealthOutcome(False, "the new instance never answered", crashed=True)


@dataclass
class SimNode:
    name: str
    root: Path
    runtime: NodeRuntime
    stop: threading.Event
    ready: threading.Event
    thread: threading.Thread

    @property
    def layout(self) -> HostLayout:
        return HostLayout.discover(self.root, self.runtime.config.settings)

    def applied(self) -> list[str]:
        return [r.outcome for r in self.runtime.applies if r.outcome == "applied"]

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive(), f"operator on {self.name} did not stop"


class Harness:
    def __init__(self, cluster: ClusterThread, tmp: Path) -> None:
        self.cluster = cluster
        self.tmp = tmp
        self.nodes: list[SimNode] = []
        self.journal: list[tuple[str, float, float]] = []
        self.healthy: dict[str, Callable[[], bool]] = {}
        client = kubernetes.client.ApiClient(cluster.configuration())
        self.api = KubeApi(client)
        self.core = kubernetes.client.CoreV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    def is_healthy(self, name: str) -> bool:
        check = self.healthy.get(name)
        return True if check is None else check()

    def add_control_plane(self, name: str) -> None:
        self.core.create_node(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name, "labels": {CONTROL_PLANE_LABEL: ""}},
            }
        )

    def start(
        self, name: str, *, debounce: float = 0.3, fresh: bool = True, **overrides: Any
    ) -> SimNode:
        root = self.tmp / name
        if fresh and not root.exists():
            make_host(root)
        stop, ready = threading.Event(), threading.Event()

        def health(layout: HostLayout) -> HealthCheck:
            return RecordingHealth(
                url="",
                node=name,
                journal=self.journal,
                ready=functools.partial(self.is_healthy, name),
            )

        options: dict[str, Any] = {
            "max_debounce": 20,
            "resync": 3600,
            "lease_poll": 0.05,
            "retry_backoff": 0.2,
            "min_ready": 0.0,
            **overrides,
        }
        config = OperatorConfig(
            node_name=name, host_root=root, debounce=debounce, health_factory=health, **options
        )
        # The operator's own credential: Secrets only where deploy/rbac.yaml and grants allow.
        client = kubernetes.client.ApiClient(self.cluster.configuration(OPERATOR_TOKEN))
        holder: dict[str, NodeRuntime] = {}
        created = threading.Event()

        def main() -> None:
            async def go() -> None:
                runtime = NodeRuntime(config, KubeApi(client))
                holder["runtime"] = runtime
                created.set()
                await run_operator(runtime, stop=stop, ready=ready)

            asyncio.run(go())

        thread = threading.Thread(target=main, name=f"operator-{name}", daemon=True)
        thread.start()
        created.wait(10)
        assert ready.wait(20), f"kopf on {name} never became ready"
        node = SimNode(name, root, holder["runtime"], stop, ready, thread)
        self.nodes.append(node)
        return node

    # -- what a person does with kubectl -------------------------------------------------------

    def apply_user(self, name: str, **spec: Any) -> None:
        self._apply("auditusers", "AuditUser", name, spec)

    def apply_policy(self, name: str, **spec: Any) -> None:
        self._apply("auditpolicies", "AuditPolicy", name, spec)

    def _apply(
        self,
        plural: str,
        kind: str,
        name: str,
        spec: dict[str, Any],
        annotations: dict[str, str] | None = None,
    ) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "metadata": {"name": name},
            "spec": spec,
        }
        if annotations:
            body["metadata"]["annotations"] = annotations
        try:
            self.custom.create_cluster_custom_object(GROUP, VERSION, plural, body)
        except kubernetes.client.ApiException as error:
            if error.status != 409:
                raise
            self.custom.patch_cluster_custom_object(
                GROUP, VERSION, plural, name, {"spec": spec, "metadata": body["metadata"]}
            )

    def annotate(self, plural: str, name: str, annotations: dict[str, str]) -> None:
        self.custom.patch_cluster_custom_object(
            GROUP, VERSION, plural, name, {"metadata": {"annotations": annotations}}
        )

    def delete(self, plural: str, name: str) -> None:
        self.custom.delete_cluster_custom_object(GROUP, VERSION, plural, name)

    def get(self, plural: str, name: str) -> dict[str, Any]:
        return self.cluster.objects(plural)[name]

    def condition(self, plural: str, name: str, kind: str = "Ready") -> dict[str, Any] | None:
        obj = self.cluster.objects(plural).get(name) or {}
        for cond in (obj.get("status") or {}).get("conditions") or []:
            if cond["type"] == kind:
                return dict(cond)
        return None

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.thread.is_alive():
                node.halt()


def eventually(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (AssertionError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r})")


@pytest.fixture
def cluster() -> Iterator[ClusterThread]:
    thread = ClusterThread().start()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture
def harness(cluster: ClusterThread, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(cluster, tmp_path)
    try:
        yield h
    finally:
        h.stop_all()


class RolloutNode:
    """One control-plane host tree and its rollout, planning whatever ``wanted`` holds."""

    def __init__(self, harness: Harness, name: str, clock: ManualClock, first: DesiredState):
        self.wanted = first
        self.health = RecordingHealth(url="", node=name, seconds=0.0)
        self.config = OperatorConfig(
            node_name=name,
            host_root=make_host(harness.tmp / name),
            health_factory=lambda layout: self.health,
            min_ready=0.0,
            lease_poll=0.05,
        )
        self.metrics = Metrics()
        self.rollout = Rollout(
            self.config, harness.api, clock, self.metrics, plan=lambda: Planned(self.wanted, {})
        )

    async def converge(self, wanted: DesiredState | None = None) -> tuple[str, str, bool]:
        self.wanted = wanted or self.wanted
        report = await self.rollout.converge(asyncio.Event())
        return report.outcome, report.message, report.permanent

    def tokens(self) -> bytes:
        layout = HostLayout.discover(self.config.host_root, self.config.settings)
        path = flag_value(parse_manifest(layout.manifest.read_text()), "--token-auth-file")
        return layout.host(path or "/nowhere").read_bytes()

    def held(self) -> float:
        return float(self.metrics.held._value.get())
