"""A real control plane on this machine: kubeadm's own manifests run by the kubelet stand-in.

Everything runs in a private network namespace that the test process enters for the tier:
kubeadm refuses a loopback advertise address (it treats one as "find a global address on lo"),
so each node gets an address from the benchmarking range 198.18.0.0/15 on that namespace's own
``lo``. Nothing listens outside it and nothing is reachable from it, so every port is free.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

from kube_audit.constants import OPERATOR_POD_SELECTOR

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).resolve().parent
BIN = ROOT / "build" / "controlplane" / "bin"
# The kube-audit of the Python running the tests (its venv may be outside the checkout).
KUBE_AUDIT = Path(sys.executable).parent / "kube-audit"
PROGRAMS = ("kube-apiserver", "etcd", "kubeadm", "kube-controller-manager", "kubelet-standin")
CLONE_NEWNET = 0x40000000
TOKEN_NAMESPACE = "kube-audit"


def kubernetes_version() -> str:
    """The k8s.io/kubernetes version go.mod builds: the one kubeadm is told to deploy."""
    match = re.search(r"^\s*k8s\.io/kubernetes (v[0-9.]+)$", (SOURCE / "go.mod").read_text(), re.M)
    assert match, "tests/controlplane/go.mod requires no k8s.io/kubernetes version"
    return match.group(1)


def why_unavailable() -> tuple[str, bool] | None:
    """(reason, is_a_failure) when the tier cannot run; None when it can.

    Missing Go is a skip; Go present but the programs not built is a failure (``make test``
    builds them first), so a broken build never passes as a skip.
    """
    if sys.platform != "linux":
        return "the control-plane tier needs Linux (mount and network namespaces)", False
    if os.geteuid() != 0:
        return "the control-plane tier needs root (mount and network namespaces)", False
    missing = [p for p in PROGRAMS if not (BIN / p).is_file()]
    if missing:
        if shutil.which("go") is None:
            return (
                "needs Go 1.24+ on PATH to build kube-apiserver, etcd, kubeadm, "
                "kube-controller-manager and the kubelet stand-in (`make controlplane`)",
                False,
            )
        return f"{', '.join(missing)} not built in {BIN}: run `make controlplane`", True
    if not KUBE_AUDIT.is_file():
        return (
            f"needs kube-audit installed in the Python running the tests ({KUBE_AUDIT} is "
            "missing: `pip install -e .` there, or run `make test`)",
            False,
        )
    for tool, package in (("ip", "iproute2"), ("kubectl", "kubectl")):
        if shutil.which(tool) is None:
            return f"needs `{tool}` on PATH ({package})", False
    return None


def image_paths() -> list[str]:
    """The host folders the stand-in's containers see as their image, none inside another."""
    paths: list[str] = []
    for path in sorted({str(ROOT), sys.prefix, sys.base_prefix}, key=len):
        if not any(Path(path).is_relative_to(kept) for kept in paths):
            paths.append(path)
    return paths


class NetworkNamespace:
    """Moves the calling thread, and every process it starts, into a new network namespace."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._home = -1
        # The namespace's identity ("net:[inode]"), as /proc/PID/ns/net names it for every
        # process inside: how a tier tells its own processes from another tier's.
        self.name = ""

    def __enter__(self) -> NetworkNamespace:
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        if self._libc.unshare(CLONE_NEWNET) != 0:
            os.close(self._home)
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
        self.name = os.readlink("/proc/thread-self/ns/net")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return self

    def add_address(self, address: str) -> None:
        subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True)

    def __exit__(self, *exc: object) -> None:
        if self._libc.setns(self._home, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back to the original network namespace")
        os.close(self._home)


class KubectlError(AssertionError):
    """kubectl failed; ``wait_for`` retries it (the apiserver may be restarting)."""


def wait_for(
    what: str, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.5
) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, subprocess.CalledProcessError, ValueError, KubectlError) as error:
            last = error
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


class Probed(Protocol):
    name: str

    def readyz(self, token: str | None = None) -> int: ...


class Downtime:
    """Each node's kube-apiserver /readyz, asked every ``interval`` seconds from a thread of
    its own: the spans during which it did not answer. With a person's ``token`` it is asked
    with that token: a 401 is then a refusal of the person by a serving apiserver."""

    def __init__(
        self, nodes: Sequence[Probed], token: str | None = None, interval: float = 0.5
    ) -> None:
        self.token, self.interval = token, interval
        self.samples: dict[str, list[tuple[float, bool]]] = {n.name: [] for n in nodes}
        self.refused: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch, args=(n,)) for n in nodes]

    def _watch(self, node: Probed) -> None:
        while not self._stop.is_set():
            try:
                status = node.readyz(self.token)
            except OSError:
                status = 0
            at = time.monotonic()
            if status == 401 and self.token:
                self.refused.append((node.name, at))
            self.samples[node.name].append(
                (at, status == 200 or (status == 401 and bool(self.token)))
            )
            self._stop.wait(self.interval)

    def __enter__(self) -> Downtime:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def spans(self, name: str) -> list[tuple[float, float]]:
        """(start, end) of each span without an answer; a span still open ends at infinity."""
        found: list[tuple[float, float]] = []
        start: float | None = None
        for at, up in self.samples[name]:
            if not up and start is None:
                start = at
            elif up and start is not None:
                found.append((start, at))
                start = None
        if start is not None:
            found.append((start, float("inf")))
        return found

    def gaps(self, name: str) -> list[float]:
        """The length of each span that ended: a restart's unavailability."""
        return [end - start for start, end in self.spans(name) if end != float("inf")]

    def one_at_a_time(self) -> list[tuple[float, float, str]]:
        """Every span in time order, asserting no two overlap."""
        spans = sorted((a, b, name) for name in self.samples for a, b in self.spans(name))
        for (_, end, first), (start, _, second) in itertools.pairwise(spans):
            assert end < start, f"{first} and {second} were down at the same time: {spans}"
        return spans


def stop_process(process: subprocess.Popen[bytes], grace: float) -> int:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


@dataclass
class Node:
    """One control-plane node: a host tree made by real kubeadm, run by the kubelet stand-in."""

    name: str
    address: str
    tree: Path
    work: Path
    port: int = 6443
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://{self.address}:{self.port}"

    @property
    def ca(self) -> Path:
        return self.tree / "etc/kubernetes/pki/ca.crt"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.tree / "etc/kubernetes/admin.conf"

    @property
    def super_admin_kubeconfig(self) -> Path:
        return self.tree / "etc/kubernetes/super-admin.conf"

    @property
    def manifest(self) -> Path:
        return self.tree / "etc/kubernetes/manifests/kube-apiserver.yaml"

    @property
    def audit_log_dir(self) -> Path:
        return self.tree / "var/log/kubernetes/audit"

    @property
    def kubeadm_config(self) -> Path:
        return self.work / "kubeadm.yaml"

    def kubeadm_command(self, *args: str) -> list[str]:
        """Real kubeadm with /etc/kubernetes and /var/lib/kubelet being this node's tree."""
        binds = []
        for path in ("etc/kubernetes", "var/lib/kubelet"):
            (self.tree / path).mkdir(parents=True, exist_ok=True)
            binds += ["--bind", f"{self.tree / path}:/{path}"]
        return [str(BIN / "kubelet-standin"), "exec", *binds, "--", str(BIN / "kubeadm"), *args]

    def kubeadm(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.kubeadm_command(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"kubeadm {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
            )
        return result

    def write_kubeadm_config(self, cluster: dict[str, Any]) -> None:
        init = {
            "apiVersion": "kubeadm.k8s.io/v1beta4",
            "kind": "InitConfiguration",
            "localAPIEndpoint": {"advertiseAddress": self.address, "bindPort": self.port},
            "nodeRegistration": {
                "name": self.name,
                "criSocket": "unix:///run/containerd/containerd.sock",
            },
        }
        self.kubeadm_config.write_text(yaml.safe_dump_all([init, cluster], sort_keys=False))

    def init_phases(self, phases: Sequence[str]) -> None:
        for phase in phases:
            self.kubeadm("init", "phase", *phase.split(), "--config", str(self.kubeadm_config))

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        log = (self.work / "kubelet.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(BIN / "kubelet-standin"),
                "run",
                "--host-root",
                str(self.tree),
                "--node-name",
                self.name,
                "--node-ip",
                self.address,
                "--kubeconfig",
                str(self.super_admin_kubeconfig),
                "--path",
                # The operator container's programs: kube-audit (for exec) with the others.
                f"{BIN}{os.pathsep}{KUBE_AUDIT.parent}",
                # Their "image": the checkout (sources), the venv that runs the tests (which
                # need not be the checkout's .venv), and the Python it is built on.
                *(arg for path in image_paths() for arg in ("--image-path", path)),
                "--record",
                str(self.work / "record.jsonl"),
                "--log-dir",
                str(self.work / "logs"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=90)
            self.process = None

    def records(self) -> list[dict[str, Any]]:
        path = self.work / "record.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def apiserver_events(self, event: str, since: int = 0) -> list[dict[str, Any]]:
        """The stand-in's record of kube-apiserver ``event``s (start, stop, exit, ready) after
        record line ``since``."""
        return [
            r
            for r in self.records()[since:]
            if r["event"] == event and r.get("pod", "").startswith("kube-apiserver-")
        ]

    def readyz(self, token: str | None = None) -> int:
        context = ssl.create_default_context(cafile=str(self.ca))
        request = urllib.request.Request(f"{self.url}/readyz")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=3, context=context) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    def wait_ready(self, timeout: float = 90) -> None:
        wait_for(f"{self.name}'s kube-apiserver /readyz", lambda: self.readyz() == 200, timeout)

    def apiserver_log(self) -> str:
        path = self.work / "logs" / f"kube-apiserver-{self.name}_kube-apiserver.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class ControlPlane:
    """Nodes in one private network namespace, kubectl against them, and their processes."""

    base: Path
    netns: NetworkNamespace
    nodes: list[Node] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def first(self) -> Node:
        return self.nodes[0]

    def add_node(self, index: int) -> Node:
        address = f"198.18.0.{index}"
        self.netns.add_address(address)
        node = Node(
            name=f"node-{index}",
            address=address,
            tree=self.base / f"node-{index}" / "host",
            work=self.base / f"node-{index}" / "work",
        )
        node.work.mkdir(parents=True, exist_ok=True)
        self.nodes.append(node)
        return node

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        stdin: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        config = kubeconfig or self.first.admin_kubeconfig
        result = subprocess.run(
            ["kubectl", "--kubeconfig", str(config), *args],
            input=stdin,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result

    def kubectl_json(self, *args: str, **kw: Any) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json", **kw).stdout)

    def apply(self, docs: Sequence[dict[str, Any]] | str, **kw: Any) -> None:
        text = docs if isinstance(docs, str) else yaml.safe_dump_all(docs, sort_keys=False)
        self.kubectl("apply", "-f", "-", stdin=text, **kw)

    def token_kubeconfig(self, path: Path, token: str, server: str | None = None) -> Path:
        """A kubeconfig with a bearer token, for the first node (or ``server``, same CA)."""
        node = self.first
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "c",
                    "cluster": {
                        "server": server or node.url,
                        "certificate-authority": str(node.ca),
                    },
                }
            ],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "c",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def stop(self) -> None:
        for process in self.processes:
            stop_process(process, grace=30)
        for node in self.nodes:
            node.stop()


def cluster_configuration(name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """kubeadm's ClusterConfiguration for the tier. Of the controllers, only those the tests
    rely on: ownerReference cascade, namespace deletion, the aggregated edit/view roles, and the
    DaemonSet's pods (``run_operator_pods``)."""
    config: dict[str, Any] = {
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "ClusterConfiguration",
        "kubernetesVersion": kubernetes_version(),
        "clusterName": name,
        "controllerManager": {
            "extraArgs": [
                {
                    "name": "controllers",
                    "value": "garbage-collector-controller,namespace-controller,"
                    "clusterrole-aggregation-controller,daemonset-controller",
                },
            ]
        },
    }
    config.update(extra or {})
    return config


SINGLE_NODE_PHASES = (
    "certs all",
    "kubeconfig admin",
    "kubeconfig super-admin",
    "kubeconfig controller-manager",
    "etcd local",
    "control-plane apiserver",
    "control-plane controller-manager",
    "kubelet-start",
)


def bind_cluster_admins(cp: ControlPlane, node: Node) -> None:
    """What ``kubeadm init`` does last: bind admin.conf's group to cluster-admin."""

    def bound() -> bool:
        return (
            cp.kubectl(
                "create",
                "clusterrolebinding",
                "kubeadm:cluster-admins",
                "--clusterrole=cluster-admin",
                "--group=kubeadm:cluster-admins",
                kubeconfig=node.super_admin_kubeconfig,
                check=False,
            ).returncode
            == 0
        )

    wait_for("the kubeadm:cluster-admins binding", bound, timeout=60)


def require_tier(
    unavailable: Callable[[], tuple[str, bool] | None] = why_unavailable,
) -> None:
    """Skip the test with one line where the tier cannot run (no Go, not root); fail where it
    should (Go there but the programs not built)."""
    problem = unavailable()
    if problem is not None:
        reason, is_failure = problem
        if is_failure:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


def boot_single_node(cp: ControlPlane) -> Node:
    """``kubeadm init``'s phases for one node, then the stand-in, then what init does last:
    the binding that gives admin.conf's group cluster-admin."""
    node = cp.add_node(1)
    node.write_kubeadm_config(cluster_configuration("kube-audit-test"))
    node.init_phases(SINGLE_NODE_PHASES)
    node.start()
    node.wait_ready()
    bind_cluster_admins(cp, node)
    return node


@contextlib.contextmanager
def control_plane(base: Path) -> Iterator[ControlPlane]:
    with NetworkNamespace() as netns:
        cp = ControlPlane(base=base, netns=netns)
        try:
            yield cp
        finally:
            cp.stop()


def daemonset_env() -> dict[str, str]:
    """The operator container's literal env in deploy/daemonset.yaml: the flags pods run with."""
    docs = yaml.safe_load((ROOT / "deploy/daemonset.yaml").read_text())
    container = docs["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: str(e["value"]) for e in container["env"] if "value" in e}


@dataclass
class OperatorProcess:
    """``kube-audit operator`` as its own process with the DaemonSet's settings for one node."""

    cp: ControlPlane
    node: Node
    kubeconfig: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.node.work / "operator.log"

    @property
    def metrics_port(self) -> int:
        return 10290 + self.cp.nodes.index(self.node)

    def start(self) -> None:
        env = {
            **os.environ,
            **daemonset_env(),
            "NODE_NAME": self.node.name,
            "POD_NAMESPACE": TOKEN_NAMESPACE,
            "KUBE_AUDIT_HOST_ROOT": str(self.node.tree),
            "KUBE_AUDIT_LIVENESS": f"http://{self.node.address}:10281/healthz",
            "KUBE_AUDIT_READINESS": f"http://{self.node.address}:10283/readyz",
            "KUBE_AUDIT_METRICS_PORT": str(self.metrics_port),
            "KUBECONFIG": str(self.kubeconfig),
            **self.env,
        }
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(KUBE_AUDIT), "operator"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.cp.processes.append(self.process)

    def stop(self) -> int:
        assert self.process is not None
        code = stop_process(self.process, grace=90)
        self.cp.processes.remove(self.process)
        self.process = None
        return code


def install_operator(cp: ControlPlane) -> Path:
    """``kubectl apply -k deploy/`` as README says, then a kubeconfig of the operator's
    ServiceAccount (what the pod would mount), so RBAC is the one deploy/ grants."""
    cp.kubectl("apply", "-k", str(ROOT / "deploy"))
    cp.kubectl(
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "crd/auditusers.kube-audit.io",
        "crd/auditpolicies.kube-audit.io",
    )
    wait_for(
        "the new resources' storage to serve lists",
        lambda: cp.kubectl("get", "auditusers,auditpolicies", check=False).returncode == 0,
    )
    token = cp.kubectl(
        "create", "token", "kube-audit", "-n", TOKEN_NAMESPACE, "--duration=8h"
    ).stdout.strip()
    return cp.token_kubeconfig(cp.base / "operator.kubeconfig", token)


def run_operator_pods(cp: ControlPlane, nodes: Sequence[Node]) -> dict[str, str]:
    """Node name -> the DaemonSet's pod there, bound and Running.

    What kube-scheduler and kubelet do for the DaemonSet's pods, which this tier has neither
    of: each pod the DaemonSet controller made is bound to the node its affinity names, and
    reported Running on the node's address (hostNetwork). The tier runs each pod's main process
    itself (``OperatorProcess``); the stand-in serves ``kubectl exec`` into it, running the
    command with the container's env and volumes.
    """

    def pods() -> list[dict[str, Any]] | None:
        items = cp.kubectl_json("get", "pods", "-n", TOKEN_NAMESPACE, "-l", OPERATOR_POD_SELECTOR)[
            "items"
        ]
        return items if len(items) >= len(nodes) else None

    by_name = {n.name: n for n in nodes}
    out = {}
    for pod in wait_for("the DaemonSet's pods", pods, 120, 1):
        name = pod["metadata"]["name"]
        terms = pod["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        node = by_name[terms[0]["matchFields"][0]["values"][0]]
        if not pod["spec"].get("nodeName"):
            binding = {
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": {"name": name},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node.name},
            }
            cp.kubectl(
                "create",
                "--raw",
                f"/api/v1/namespaces/{TOKEN_NAMESPACE}/pods/{name}/binding",
                "-f",
                "-",
                stdin=json.dumps(binding),
            )
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        container = pod["spec"]["containers"][0]
        status = {
            "phase": "Running",
            "hostIP": node.address,
            "podIP": node.address,
            "podIPs": [{"ip": node.address}],
            "startTime": now,
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": now}
                for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
            ],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": "",
                    "ready": True,
                    "restartCount": 0,
                    "started": True,
                    "state": {"running": {"startedAt": now}},
                }
            ],
        }
        cp.kubectl(
            "patch", "pod", name, "-n", TOKEN_NAMESPACE, "--subresource=status",
            "--type=merge", "-p", json.dumps({"status": status}),
        )  # fmt: skip
        out[node.name] = name
    return out


LB_ADDRESS = "198.18.0.100"
ETCD_PHASES_LOCAL = ("certs all",)
SHARED_PKI = (
    "ca.crt", "ca.key", "sa.key", "sa.pub", "front-proxy-ca.crt", "front-proxy-ca.key",
    "etcd/ca.crt", "etcd/ca.key", "apiserver-etcd-client.crt", "apiserver-etcd-client.key",
)  # fmt: skip


def _external_etcd_config(
    node: Node,
    endpoint: str,
    *,
    controller_manager: bool,
    apiserver_args: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    pki = "/etc/kubernetes/pki"
    extra: dict[str, Any] = {
        "controlPlaneEndpoint": f"{LB_ADDRESS}:6443",
        "etcd": {
            "external": {
                "endpoints": [endpoint],
                "caFile": f"{pki}/etcd/ca.crt",
                "certFile": f"{pki}/apiserver-etcd-client.crt",
                "keyFile": f"{pki}/apiserver-etcd-client.key",
            }
        },
        "apiServer": {
            "extraArgs": [
                {"name": "bind-address", "value": node.address},
                *({"name": k, "value": v} for k, v in (apiserver_args or {}).items()),
            ]
        },
    }
    config = cluster_configuration("kube-audit-ha", extra)
    if controller_manager:
        config["controllerManager"]["extraArgs"].append(
            {"name": "bind-address", "value": node.address}
        )
    return config


def start_etcd(cp: ControlPlane, node: Node) -> str:
    """One etcd member, as its own process, serving with certificates kubeadm made on
    ``node``: kubeadm's external-etcd topology, shared by every apiserver."""
    pki = node.tree / "etc/kubernetes/pki/etcd"
    data = cp.base / "etcd"
    client = f"https://{node.address}:2379"
    log = (cp.base / "etcd.log").open("ab")
    process = subprocess.Popen(
        [
            str(BIN / "etcd"),
            "--name=etcd-0",
            f"--data-dir={data}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls=http://{node.address}:2380",
            f"--initial-advertise-peer-urls=http://{node.address}:2380",
            f"--initial-cluster=etcd-0=http://{node.address}:2380",
            f"--listen-metrics-urls=http://{node.address}:2381",
            f"--cert-file={pki / 'server.crt'}",
            f"--key-file={pki / 'server.key'}",
            f"--trusted-ca-file={pki / 'ca.crt'}",
            "--client-cert-auth=true",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    cp.processes.append(process)
    return client


@dataclass
class LoadBalancer:
    """HAProxy in TCP mode in front of the apiservers, checking /readyz over TLS, as users
    run it: a node leaves the pool when its /readyz fails, and comes back when it passes."""

    address: str
    config: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://{self.address}:6443"


def start_haproxy(cp: ControlPlane, nodes: list[Node]) -> LoadBalancer:
    cp.netns.add_address(LB_ADDRESS)
    servers = "\n".join(
        f"    server {n.name} {n.address}:{n.port} check check-ssl verify none" for n in nodes
    )
    config = cp.base / "haproxy.cfg"
    config.write_text(
        f"""global
    log stdout format raw local0 info
defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    # A node whose apiserver stopped listening refuses the connection before the health check
    # notices: try another server instead of failing the client.
    retries 3
    option redispatch 1
frontend apiserver
    bind {LB_ADDRESS}:6443
    default_backend apiservers
backend apiservers
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 1s fall 2 rise 2
{servers}
"""
    )
    log = (cp.base / "haproxy.log").open("ab")
    process = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    cp.processes.append(process)
    return LoadBalancer(LB_ADDRESS, config, process)


def boot_ha(
    cp: ControlPlane, count: int = 3, apiserver_args: Mapping[str, str] | None = None
) -> tuple[list[Node], LoadBalancer]:
    """``count`` control-plane nodes made by real kubeadm with one shared CA (as `kubeadm join
    --control-plane` copies it), external etcd, HAProxy in front; kube-controller-manager on the
    first node only. ``apiserver_args``: extra kube-apiserver flags, given to kubeadm as a user
    would (the bench sets --shutdown-delay-duration)."""
    nodes = [cp.add_node(i) for i in range(1, count + 1)]
    first = nodes[0]
    local = cluster_configuration("kube-audit-ha", {"controlPlaneEndpoint": f"{LB_ADDRESS}:6443"})
    first.write_kubeadm_config(local)
    first.init_phases(ETCD_PHASES_LOCAL)
    for node in nodes[1:]:
        for name in SHARED_PKI:
            target = node.tree / "etc/kubernetes/pki" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(first.tree / "etc/kubernetes/pki" / name, target)
    endpoint = start_etcd(cp, first)
    for node in nodes:
        node.write_kubeadm_config(
            _external_etcd_config(
                node, endpoint, controller_manager=node is first, apiserver_args=apiserver_args
            )
        )
        phases = [
            "certs all",
            "kubeconfig admin",
            "kubeconfig super-admin",
            "control-plane apiserver",
            "kubelet-start",
        ]
        if node is first:
            phases[3:3] = ["kubeconfig controller-manager", "control-plane controller-manager"]
        node.init_phases(phases)
    for node in nodes:
        node.start()
    for node in nodes:
        node.wait_ready()
    lb = start_haproxy(cp, nodes)
    bind_cluster_admins(cp, first)
    return nodes, lb
