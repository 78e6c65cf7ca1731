"""A temporary control-plane host root, desired states, and a fake kubelet + apiserver.

The fake answers the health URL the way a real node would: when the manifest on disk changes,
the old instance goes away for a few probes (kubelet restarting it), then the new instance
answers 200 if ``healthy(manifest)`` says its configuration works, 500 otherwise; an instance
that ``crashes(manifest)`` never answers at all (kube-apiserver exits at start-up). With
``anonymous`` False it answers 401 to a request without ``token`` (``--anonymous-auth=false``),
and 403 to another token if ``forbidden``.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kube_audit.agent.health import HealthCheck
from kube_audit.agent.layout import HostLayout
from kube_audit.core.manifest import parse_manifest
from kube_audit.core.plan import DesiredState, collect_inputs, plan_desired
from kube_audit.core.settings import Settings
from tests.conftest import FIXTURES, audit_policy, audit_user, long_token, token_secret

REPO = Path(__file__).resolve().parents[2]
OTHER_PODS = ("etcd.yaml", "kube-controller-manager.yaml", "kube-scheduler.yaml")


def make_host(root: Path, version: str = "v1.31", static_pod_path: str | None = None) -> Path:
    """A host tree: kubeadm's manifests for ``version``, kubelet config, other static pods."""
    pods = static_pod_path or "/etc/kubernetes/manifests"
    manifests = root / pods.lstrip("/")
    manifests.mkdir(parents=True)
    shutil.copy(FIXTURES / "kubeadm" / version / "kube-apiserver.yaml", manifests)
    (manifests / "kube-apiserver.yaml").chmod(0o600)
    for name in OTHER_PODS:
        shutil.copy(REPO / "examples/demo/host/etc/kubernetes/manifests" / name, manifests)
    kubelet = root / "var/lib/kubelet"
    kubelet.mkdir(parents=True)
    config = "kind: KubeletConfiguration\n"
    if static_pod_path:
        config += f"staticPodPath: {static_pod_path}\n"
    (kubelet / "config.yaml").write_text(config)
    return root


def desired(
    *names: str,
    policy: bool = True,
    marker: str = "",
    level: str = "Metadata",
    settings: Settings | None = None,
) -> DesiredState:
    """Users ``names`` (token ``tok-<name><marker>``), and one policy (its rule at ``level``)
    unless told otherwise."""
    objs: list[Any] = []
    for name in names:
        objs += [
            audit_user(name, groups=["developer"]),
            token_secret(f"audituser-{name}", long_token(f"tok-{name}{marker}")),
        ]
    if policy:
        objs.append(audit_policy("dev", rules=[{"level": level, "userGroups": ["developer"]}]))
    inputs = collect_inputs([(f"t#{i}", o) for i, o in enumerate(objs)])
    return plan_desired(inputs, settings or Settings())


@pytest.fixture
def host(tmp_path: Path) -> Path:
    return make_host(tmp_path / "host")


@pytest.fixture
def layout(host: Path) -> HostLayout:
    return HostLayout.discover(host, Settings())


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@dataclass
class FakeNode:
    """kubelet + kube-apiserver as the health URL sees them."""

    layout: HostLayout
    healthy: Callable[[dict[str, Any]], bool] = lambda manifest: True
    crashes: Callable[[dict[str, Any]], bool] = lambda manifest: False
    anonymous: bool = True
    token: str = "operator-token"
    forbidden: bool = False
    authorizations: list[str] = field(default_factory=list)
    restart_probes: int = 2
    kubelet_alive: bool = True
    delay: float = 0.0
    running: str = ""
    down_left: int = 0
    probes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.running = self.layout.manifest.read_text()

    def answer(self, authorization: str = "") -> int | None:
        """HTTP status, or None for a refused/dropped connection."""
        with self.lock:
            self.authorizations.append(authorization)
            self.probes += 1
            on_disk = self.layout.manifest.read_text()
            if self.kubelet_alive and on_disk != self.running and self.down_left == 0:
                self.down_left = self.restart_probes
                self.running = on_disk
            if self.down_left > 0:
                self.down_left -= 1
                return None
            running = parse_manifest(self.running)
            if self.crashes(running):
                return None
            if authorization and authorization != f"Bearer {self.token}":
                return 401
            if not authorization and not self.anonymous:
                return 401
            if authorization and self.forbidden:
                return 403
            return 200 if self.healthy(running) else 500


@pytest.fixture
def fake_node(layout: HostLayout) -> Iterator[tuple[FakeNode, str]]:
    node = FakeNode(layout)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if node.delay:
                time.sleep(node.delay)
            status = node.answer(self.headers.get("Authorization", ""))
            if status is None:
                self.close_connection = True
                self.connection.close()
                return
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield node, f"http://127.0.0.1:{server.server_address[1]}/readyz"
    finally:
        server.shutdown()
        server.server_close()


def health(url: str, timeout: float = 3.0) -> HealthCheck:
    return HealthCheck(
        url=url, timeout=timeout, interval=0.01, probe_timeout=0.5, successes_needed=3
    )
