"""A real kubeadm node: real ``kubeadm init``, the real kubelet and containerd running kubeadm's
static pods and the DaemonSet's pods from images built on this machine (no registry).

Each node's containerd and kubelet share one private mount namespace (kept alive by a holder
process), in which:

- /etc/kubernetes, /var/lib/{kubelet,etcd,kube-audit} and /var/log are the node's own folders
  (kubelet hard-codes /var/lib/kubelet/device-plugins and /var/log/containers);
- /run is a tmpfs (containerd 1.6 hard-codes its shim sockets under /run/containerd/s);
- the sysctls kubelet sets on start (vm.overcommit_memory, kernel.panic, ...) are plain files, so
  the host kernel keeps its values.

The network of a lone node is the tier's private network namespace (tests/controlplane/
cluster.py): the node's address on its ``lo``. Nodes of a cluster of several get a network
namespace each (their kubelet, etcd and pods' ports, and the pod's fixed 127.0.0.1 ports, would
collide in one), joined to the tier's by a veth, the tier's namespace routing between them. Each
gets what kube-proxy would add for the ``kubernetes`` Service (a DNAT of 10.96.0.1:443 to the
API), since hostNetwork pods reach the API through that address.
kubelet runs under a supervisor that restarts it as kubeadm's systemd unit does. Teardown
kills every container, containerd, kubelet and the holder, removes the cgroups containerd made,
and ``HostState`` checks that sysctls, mounts, cgroups and processes are as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kube_audit import __version__
from tests.controlplane.cluster import (
    BIN,
    ROOT,
    ControlPlane,
    LoadBalancer,
    Node,
    kubernetes_version,
    start_haproxy,
    stop_process,
    wait_for,
    why_unavailable as control_plane_problem,
)

IMAGE_DIR = ROOT / "build" / "image"
COMPONENT_IMAGES = ROOT / "build" / "realnode" / "images"
SERVICE_IP = "10.96.0.1"
SERVICE_CIDR = "10.96.0.0/12"
# Nodes with a network of their own reach each other (and the tier's load balancer) through the
# tier's namespace, which holds this address and forwards between the nodes' veths.
NODE_NETWORK = "198.18.0.0/24"
TIER_GATEWAY = "198.18.0.254"
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
# kubelet writes these on the host kernel when it starts (they are not namespaced).
SHADOWED_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
NODE_TOOLS = ("containerd", "runc", "ctr", "umoci", "skopeo", "iptables", "nsenter", "unshare")
REAL_PROGRAMS = ("kubelet", "kube-scheduler", "pause")


def operator_archive() -> Path:
    """The archive ``make image`` writes for the project's version."""
    return IMAGE_DIR / f"kube-audit-operator-{__version__}.tar"


def why_unavailable() -> tuple[str, bool] | None:
    """(reason, is_a_failure) when the real node tier cannot run here; None when it can."""
    problem = control_plane_problem()
    if problem is not None:
        return problem
    missing = [t for t in NODE_TOOLS if shutil.which(t) is None]
    if missing:
        return (
            f"the real node tier needs {', '.join(missing)} "
            "(Debian: containerd runc umoci skopeo iptables; `make test` installs them as root)",
            False,
        )
    unbuilt = [p for p in REAL_PROGRAMS if not (BIN / p).is_file()]
    if unbuilt:
        return f"{', '.join(unbuilt)} not built in {BIN}: run `make controlplane`", True
    if not operator_archive().is_file():
        return f"the operator image {operator_archive()} is not built: run `make image`", True
    return None


# --- images -----------------------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def binary_image(ref: str, binary: Path, entrypoint: list[str] | None = None) -> Path:
    """A one-layer image holding ``binary`` in /usr/local/bin (kubeadm's manifests call the
    programs by name), as a docker-archive tagged ``ref``. Cached by the binary's digest."""
    COMPONENT_IMAGES.mkdir(parents=True, exist_ok=True)
    name = ref.replace("/", "_").replace(":", "_")
    out = COMPONENT_IMAGES / f"{name}-{_digest(binary)}.tar"
    if out.is_file():
        return out
    work = COMPONENT_IMAGES / f"{name}.work"
    shutil.rmtree(work, ignore_errors=True)
    rootfs = work / "rootfs"
    (rootfs / "usr/local/bin").mkdir(parents=True)
    (rootfs / "tmp").mkdir(mode=0o1777)
    (rootfs / "tmp").chmod(0o1777)
    (rootfs / "etc").mkdir()
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/:/sbin/nologin\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    shutil.copy2(binary, rootfs / "usr/local/bin" / binary.name)
    layer = work / "layer.tar"
    subprocess.run(
        ["tar", "-cf", str(layer), "-C", str(rootfs), "--sort=name", "--numeric-owner",
         "--owner=0", "--group=0", "--mtime=@0", "."],
        check=True,
    )  # fmt: skip
    layout = f"{work / 'oci'}:image"
    config = ["--config.env", "PATH=/usr/local/bin:/usr/bin:/bin"]
    for arg in entrypoint or []:
        config += ["--config.entrypoint", arg]
    for command in (
        ["umoci", "init", "--layout", str(work / "oci")],
        ["umoci", "new", "--image", layout],
        ["umoci", "raw", "add-layer", "--no-history", "--image", layout, str(layer)],
        ["umoci", "config", "--no-history", "--image", layout, "--os", "linux",
         "--architecture", "amd64", "--created", "1970-01-01T00:00:00Z", *config],
        ["skopeo", "copy", "--quiet", f"oci:{layout}", f"docker-archive:{out}.tmp:{ref}"],
    ):  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
    Path(f"{out}.tmp").rename(out)
    shutil.rmtree(work)
    return out


# --- host state -------------------------------------------------------------------------------


def _cgroup_dirs() -> set[str]:
    found: set[str] = set()
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / "k8s.io"
        if top.is_dir():
            found.update(str(p) for p in [top, *top.rglob("*")] if p.is_dir())
    return found


def _mounts() -> set[tuple[str, str, str]]:
    rows = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, rest = before.split(), after.split()
        rows.add((fields[4], rest[0], rest[1]))
    return rows


def _processes() -> dict[int, str]:
    """Every live user process but this one: pid -> command line. Not zombies (gone but for
    their parent's wait), not kernel threads (children of kthreadd, pid 2, started by the
    kernel as it likes)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in (os.getpid(), 2):
            continue
        with contextlib.suppress(OSError):
            state, parent = (proc / "stat").read_text().rpartition(")")[2].split()[:2]
            if state == "Z" or parent == "2":
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found[int(proc.name)] = cmdline.strip()
    return found


def _in_mount_namespace(namespace: str) -> list[int]:
    """The processes in a mount namespace (the node's: containerd, its shims, kubelet)."""
    pids = []
    for pid in _processes():
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/ns/mnt") == namespace:
                pids.append(pid)
    return pids


@dataclass(frozen=True)
class HostState:
    """What the tier must leave as it found it on the machine."""

    sysctls: dict[str, str]
    mounts: frozenset[tuple[str, str, str]]
    cgroups: frozenset[str]
    processes: frozenset[int]

    @classmethod
    def read(cls) -> HostState:
        return cls(
            sysctls={k: Path("/proc/sys", k).read_text() for k in SHADOWED_SYSCTLS},
            mounts=frozenset(_mounts()),
            cgroups=frozenset(_cgroup_dirs()),
            processes=frozenset(_processes()),
        )

    def differences(self, after: HostState, tier_nets: frozenset[str] = frozenset()) -> list[str]:
        """What changed since; ``tier_nets``: the tier's own network namespaces."""
        out = [
            f"sysctl {k}: {v.strip()} -> {after.sysctls[k].strip()}"
            for k, v in self.sysctls.items()
            if after.sysctls[k] != v
        ]
        out += [f"mount left behind: {m}" for m in sorted(after.mounts - self.mounts)]
        out += [f"mount gone: {m}" for m in sorted(self.mounts - after.mounts)]
        out += [f"cgroup left behind: {c}" for c in sorted(after.cgroups - self.cgroups)]
        running = _processes()
        out += [
            f"process left running: {pid} {running.get(pid, '')[:160]}"
            for pid in sorted(after.processes - self.processes)
            if pid in running and _started_by_the_tier(pid, tier_nets)
        ]
        return out


def _started_by_the_tier(pid: int, tier_nets: frozenset[str]) -> bool:
    """The process or one of its ancestors is this test process or runs in one of the tier's
    network namespaces: the nodes' daemons, and containers orphaned to init (their shim ran
    there), but
    not what someone else started meanwhile, such as another tier's private namespace (the
    control-plane tier, run beside this one, once counted as this tier's leftover)."""
    seen = pid
    for _ in range(64):
        if seen == os.getpid():
            return True
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{seen}/ns/net") in tier_nets:
                return True
        try:
            seen = int(Path(f"/proc/{seen}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if seen <= 1:
            return False
    return False


# --- the node ---------------------------------------------------------------------------------


def _containerd_config(work: Path, pause: str) -> str:
    return f"""version = 2
root = "{work}/containerd/root"
state = "{work}/containerd/state"
[grpc]
  address = "{CONTAINERD_SOCKET}"
[ttrpc]
  address = "{work}/containerd/ttrpc.sock"
[debug]
  level = "warn"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # AppArmor is off on these machines; root lacks CAP_SYS_RESOURCE, so the negative
  # oom_score_adj kubelet asks for the sandboxes of critical pods cannot be set.
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{shutil.which("runc")}"
        Root = "{work}/containerd/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{work}/cni"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = ""
"""


# A network configuration, so that containerd reports the pod network ready and the node
# becomes Ready. Every pod of this tier uses the host's network; this is never invoked.
CNI_CONFIG = {
    "cniVersion": "1.0.0",
    "name": "tier",
    "plugins": [
        {
            "type": "bridge",
            "bridge": "tier0",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]]},
        }
    ],
}

# The mount namespace the node's containerd and kubelet share ($1: the node's folder).
NAMESPACE_SETUP = r"""
set -euo pipefail
node=$1
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/containerd
mount --bind "$node/host/etc/kubernetes" /etc/kubernetes
mount --bind "$node/host/var/log" /var/log
mount -t tmpfs -o mode=755 tmpfs /var/lib
for d in kubelet etcd kube-audit; do
  mkdir -p "/var/lib/$d" && mount --bind "$node/host/var/lib/$d" "/var/lib/$d"
done
for k in SYSCTLS; do
  f="$node/work/sysctl/${k//\//_}"
  cat "/proc/sys/$k" > "$f" && mount --bind "$f" "/proc/sys/$k"
done
echo ready > "$node/work/namespace.ready"
exec sleep infinity
"""


@dataclass
class RealNode(Node):
    """A control-plane node run by the real kubelet through containerd."""

    own_network: bool = False
    # The node's network namespace as /proc/PID/ns/net names it (own_network only).
    net_name: str = ""
    holder: subprocess.Popen[bytes] | None = None
    containerd: subprocess.Popen[bytes] | None = None
    kubelet: subprocess.Popen[bytes] | None = None
    _supervising: threading.Event = field(default_factory=threading.Event)
    _supervisor: threading.Thread | None = None

    @property
    def base(self) -> Path:
        return self.work.parent

    def in_namespace(self, *command: str) -> list[str]:
        """The node's mount namespace, and its network namespace if it has its own."""
        assert self.holder is not None
        spaces = ["-m", "-n"] if self.own_network else ["-m"]
        return ["nsenter", "-t", str(self.holder.pid), *spaces, "--", *command]

    def in_network(self, *command: str) -> list[str]:
        """The node's network (the tier's for a lone node), with the host's mounts."""
        if not self.own_network:
            return list(command)
        assert self.holder is not None
        return ["nsenter", "-t", str(self.holder.pid), "-n", "--", *command]

    def kubeadm_command(self, *args: str) -> list[str]:
        return self.in_namespace(str(BIN / "kubeadm"), *args)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.in_namespace("ctr", "--address", CONTAINERD_SOCKET, "-n", "k8s.io", *args),
            capture_output=True,
            text=True,
            timeout=300,
            check=check,
        )

    # -- start ---------------------------------------------------------------------------------

    def boot(self, images: list[Path], pause: str) -> None:
        """The namespace, containerd with the images imported, and kubelet supervised."""
        for path in ("etc/kubernetes", "var/log", "var/lib/kubelet", "var/lib/etcd",
                     "var/lib/kube-audit"):  # fmt: skip
            (self.tree / path).mkdir(parents=True, exist_ok=True)
        for path in ("sysctl", "cni", "containerd", "logs"):
            (self.work / path).mkdir(parents=True, exist_ok=True)
        for mount_point in ("/etc/kubernetes", "/var/lib"):
            Path(mount_point).mkdir(exist_ok=True)
        (self.work / "cni" / "10-tier.conflist").write_text(json.dumps(CNI_CONFIG))
        (self.work / "containerd.toml").write_text(_containerd_config(self.work, pause))
        script = NAMESPACE_SETUP.replace("SYSCTLS", " ".join(SHADOWED_SYSCTLS))
        with (self.work / "logs" / "namespace.log").open("ab") as log:
            self.holder = subprocess.Popen(
                ["unshare", "--mount", *(["--net"] if self.own_network else []),
                 "--propagation", "private", "--",
                 "bash", "-c", script, "namespace", str(self.base)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        wait_for("the node's mount namespace", (self.work / "namespace.ready").is_file, 20, 0.1)
        if self.own_network:
            self._wire()
        with (self.work / "logs" / "containerd.log").open("ab") as log:
            self.containerd = subprocess.Popen(
                self.in_namespace("containerd", "--config", str(self.work / "containerd.toml")),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for("containerd", lambda: self.ctr("version", check=False).returncode == 0, 30)
        for image in images:
            self.ctr("images", "import", str(image))
        self._supervising.set()
        self._supervisor = threading.Thread(target=self._supervise_kubelet, daemon=True)
        self._supervisor.start()

    def _wire(self) -> None:
        """A veth from the tier's namespace to the node's (its ``eth0``), the node's address on
        it, and routes both ways: the others and the load balancer through the tier's side."""
        assert self.holder is not None
        self.net_name = os.readlink(f"/proc/{self.holder.pid}/ns/net")
        peer = f"veth-{self.name}"
        for command in (
            ["ip", "link", "add", peer, "type", "veth", "peer", "name", "eth0",
             "netns", str(self.holder.pid)],
            ["ip", "link", "set", peer, "up"],
            ["ip", "route", "add", f"{self.address}/32", "dev", peer],
            self.in_network("ip", "link", "set", "lo", "up"),
            self.in_network("ip", "addr", "add", f"{self.address}/32", "dev", "eth0"),
            self.in_network("ip", "link", "set", "eth0", "up"),
            self.in_network("ip", "route", "add", NODE_NETWORK, "via", TIER_GATEWAY, "dev",
                            "eth0", "onlink", "src", self.address),
        ):  # fmt: skip
            subprocess.run(command, check=True, capture_output=True)

    def _kubelet_command(self) -> list[str]:
        """kubeadm's systemd drop-in: its flags file is read again at every start."""
        flags_env = self.tree / "var/lib/kubelet/kubeadm-flags.env"
        kubeadm_args = ""
        if flags_env.is_file():
            for line in flags_env.read_text().splitlines():
                if line.startswith("KUBELET_KUBEADM_ARGS="):
                    kubeadm_args = line.split("=", 1)[1].strip().strip('"')
        return self.in_namespace(
            str(BIN / "kubelet"),
            "--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf",
            "--kubeconfig=/etc/kubernetes/kubelet.conf",
            "--config=/var/lib/kubelet/config.yaml",
            *shlex.split(kubeadm_args),
            f"--node-ip={self.address}",
        )

    def _supervise_kubelet(self) -> None:
        """Restart=always: kubelet exits until kubeadm has written its config."""
        while self._supervising.is_set():
            if not (self.tree / "var/lib/kubelet/config.yaml").is_file():
                time.sleep(0.5)
                continue
            with (self.work / "logs" / "kubelet.log").open("ab") as log:
                self.kubelet = subprocess.Popen(
                    self._kubelet_command(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            while self._supervising.is_set() and self.kubelet.poll() is None:
                time.sleep(0.2)
            if self._supervising.is_set():
                time.sleep(2)

    # -- stop ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """kubelet, then every container, containerd and the namespace; cgroups removed."""
        self._supervising.clear()
        if self.kubelet is not None:
            stop_process(self.kubelet, grace=30)
        if self._supervisor is not None:
            self._supervisor.join(10)
        if self.containerd is not None and self.containerd.poll() is None:
            tasks = self.ctr("tasks", "ls", "-q", check=False).stdout.split()
            for task in tasks:
                self.ctr("tasks", "kill", "--all", "--signal", "SIGKILL", task, check=False)
            for task in tasks:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    for _ in range(50):
                        # containerd's CRI plugin deletes a killed container's task itself:
                        # "not found" is done too (retrying it cost 5 s per container).
                        deleted = self.ctr("tasks", "delete", "--force", task, check=False)
                        if deleted.returncode == 0 or "not found" in deleted.stderr:
                            break
                        time.sleep(0.1)
            for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
                self.ctr("containers", "rm", container, check=False)
            stop_process(self.containerd, grace=20)
        # What the kills above missed (a shim whose task was gone) lives in the node's mount
        # namespace: nothing of the host does.
        if self.holder is not None:
            with contextlib.suppress(OSError):
                namespace = os.readlink(f"/proc/{self.holder.pid}/ns/mnt")
                for pid in _in_mount_namespace(namespace):
                    if pid != self.holder.pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
            stop_process(self.holder, grace=5)
        self.holder = self.containerd = self.kubelet = None


def remove_cgroups(before: frozenset[str]) -> None:
    """runc leaves the /k8s.io parents (and a killed pod's cgroup) in every v1 hierarchy."""
    for path in sorted(_cgroup_dirs() - before, key=len, reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(path)


# --- the cluster ------------------------------------------------------------------------------


# kubeadm's join credentials of the tier's clusters of several nodes (test values, not secret:
# the cluster lives in the tier's namespaces for the length of a test module).
BOOTSTRAP_TOKEN = "kaudit.0123456789abcdef"
CERTIFICATE_KEY = hashlib.sha256(b"kube-audit real node tier").hexdigest()


def _node_registration(node: RealNode) -> dict[str, Any]:
    return {
        "name": node.name,
        "criSocket": f"unix://{CONTAINERD_SOCKET}",
        "ignorePreflightErrors": ["all"],
    }


# kubelet's disk eviction signals (all of them: a partial evictionHard does not merge defaults).
DISK_SIGNALS = ("nodefs.available", "nodefs.inodesFree", "imagefs.available", "imagefs.inodesFree")


def kubeadm_configuration(
    node: RealNode, cluster_name: str, endpoint: str | None = None
) -> list[dict[str, Any]]:
    """kubeadm init's configuration: the images built here, kubelet for this machine (cgroup v1,
    cgroupfs, no QoS cgroups), no kube-proxy or CoreDNS (no pod of the tier needs them).
    ``endpoint``: the load balancer of a cluster others will join (``--upload-certs``)."""
    init: dict[str, Any] = {
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "InitConfiguration",
        "localAPIEndpoint": {"advertiseAddress": node.address, "bindPort": node.port},
        "nodeRegistration": _node_registration(node),
        # preflight pulls images (from no registry) and checks the host, not the node.
        "skipPhases": ["preflight", "addon/coredns", "addon/kube-proxy"],
    }
    cluster: dict[str, Any] = {
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "ClusterConfiguration",
        "kubernetesVersion": kubernetes_version(),
        "clusterName": cluster_name,
        "imageRepository": "local",
        # As docs/install.md asks behind a load balancer: the old apiserver keeps serving
        # (not ready) for 5 s after kubelet stops it, so an API call made right after our
        # manifest switch (a DaemonSet update mid-apply) is still answered.
        "apiServer": {"extraArgs": [{"name": "shutdown-delay-duration", "value": "5s"}]},
    }
    if endpoint is None:
        # One node: no one to elect. With leader election both exit whenever the apiserver
        # is away longer than their renew deadline (every restart the tier makes), and
        # kubelet's crash back-off (up to 5 minutes) then holds DaemonSet rollouts and
        # scheduling: the tier would wait on that, not on the operator.
        for component in ("controllerManager", "scheduler"):
            cluster[component] = {"extraArgs": [{"name": "leader-elect", "value": "false"}]}
    else:
        init["bootstrapTokens"] = [{"token": BOOTSTRAP_TOKEN, "ttl": "4h"}]
        init["certificateKey"] = CERTIFICATE_KEY
        cluster["controlPlaneEndpoint"] = endpoint
    return [
        init,
        cluster,
        {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": ["none"],  # [] is defaulted to ["pods"] by kubeadm
            "failSwapOn": False,
            "makeIPTablesUtilChains": False,
            "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
            # The node's disk is the host's, shared with everything else on it, and the node
            # has no registry: kubelet must neither delete an image no container uses at the
            # moment (the apiserver's between two restarts, ours after an uninstall) nor
            # evict pods because the host's disk is full. 0% turns a disk signal off.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                **{signal: "0%" for signal in DISK_SIGNALS},
            },
        },
    ]


def kube_proxy_for_the_api(node: RealNode, address: str, port: int) -> None:
    """What kube-proxy does for hostNetwork pods' in-cluster config: 10.96.0.1:443 reaches
    the API at ``address:port``. In the node's network namespace (the tier's for a lone
    node) only."""
    route = ["dev", "lo"]
    if node.own_network:
        route = ["via", TIER_GATEWAY, "dev", "eth0", "onlink", "src", node.address]
    subprocess.run(node.in_network("ip", "route", "replace", SERVICE_CIDR, *route), check=True)
    subprocess.run(
        node.in_network("iptables", "-t", "nat", "-A", "OUTPUT", "-d", f"{SERVICE_IP}/32",
                        "-p", "tcp", "--dport", "443", "-j", "DNAT", "--to-destination",
                        f"{address}:{port}"),
        check=True,
    )  # fmt: skip


def kubeadm_join_configuration(node: RealNode, endpoint: str) -> dict[str, Any]:
    """``kubeadm join --control-plane`` as its docs give it: discovery through the load
    balancer with the bootstrap token, the certificates from the cluster (``--upload-certs``)."""
    return {
        "apiVersion": "kubeadm.k8s.io/v1beta4",
        "kind": "JoinConfiguration",
        "nodeRegistration": _node_registration(node),
        "skipPhases": ["preflight"],
        "discovery": {
            "bootstrapToken": {
                "apiServerEndpoint": endpoint,
                "token": BOOTSTRAP_TOKEN,
                "unsafeSkipCAVerification": True,
            }
        },
        "controlPlane": {
            "localAPIEndpoint": {"advertiseAddress": node.address, "bindPort": node.port},
            "certificateKey": CERTIFICATE_KEY,
        },
    }


def add_real_node(cp: ControlPlane, index: int, own_network: bool = False) -> RealNode:
    address = f"198.18.0.{index}"
    if not own_network:
        cp.netns.add_address(address)
    base = cp.base / f"node-{index}"
    node = RealNode(name=f"node-{index}", address=address, tree=base / "host", work=base / "work",
                    own_network=own_network)  # fmt: skip
    node.work.mkdir(parents=True, exist_ok=True)
    cp.nodes.append(node)
    return node


def kubeadm_init(cp: ControlPlane, index: int = 1) -> RealNode:
    """One node made by ``kubeadm init`` and run by the real kubelet."""
    node = add_real_node(cp, index)
    node.kubeadm_config.write_text(yaml.safe_dump_all(kubeadm_configuration(node, "kube-audit")))
    images, pause = _images_for(node.kubeadm_config)
    node.boot(images, pause)
    kube_proxy_for_the_api(node, node.address, node.port)
    node.kubeadm("init", "--config", str(node.kubeadm_config), "--v=1", timeout=600)
    return node


def kubeadm_ha(cp: ControlPlane, count: int) -> tuple[list[RealNode], LoadBalancer]:
    """``count`` nodes, each in a network namespace of its own: the first made by ``kubeadm
    init --upload-certs`` behind HAProxy (in the tier's namespace), the others by ``kubeadm
    join --control-plane`` through it, kubeadm's stacked etcd on each, as users build HA."""
    nodes = [add_real_node(cp, i, own_network=True) for i in range(1, count + 1)]
    cp.netns.add_address(TIER_GATEWAY)
    subprocess.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)  # the tier's only
    lb = start_haproxy(cp, list(nodes))
    endpoint = f"{lb.address}:6443"
    first = nodes[0]
    first.kubeadm_config.write_text(
        yaml.safe_dump_all(kubeadm_configuration(first, "kube-audit-ha", endpoint))
    )
    images, pause = _images_for(first.kubeadm_config)
    failures: list[BaseException] = []

    def boot(node: RealNode) -> None:
        try:
            node.boot(images, pause)
        except BaseException as error:  # re-raised by the caller
            failures.append(error)

    # Importing the images is most of a boot: the nodes do it at once.
    threads = [threading.Thread(target=boot, args=(n,)) for n in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    for node in nodes:
        kube_proxy_for_the_api(node, lb.address, 6443)
    first.kubeadm("init", "--config", str(first.kubeadm_config), "--upload-certs", "--v=1",
                  timeout=600)  # fmt: skip
    for node in nodes[1:]:
        node.kubeadm_config.write_text(yaml.safe_dump(kubeadm_join_configuration(node, endpoint)))
        node.kubeadm("join", "--config", str(node.kubeadm_config), "--v=1", timeout=600)
    return nodes, lb


def _images_for(kubeadm_config: Path) -> tuple[list[Path], str]:
    """The image archives the nodes import (kubeadm's images, built from our binaries, and the
    operator's) and the pause image's name. ``kubeadm config images list`` needs no node: it
    runs before any boots."""
    listed = subprocess.run(
        [str(BIN / "kubeadm"), "config", "images", "list", "--config", str(kubeadm_config)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    images, pause = [], ""
    refs = listed.stdout.split()
    for ref in refs:
        program = ref.rsplit("/", 1)[1].split(":")[0]
        if program in ("coredns", "kube-proxy"):  # their addon phases are skipped
            continue
        if program == "pause":
            pause = ref
            images.append(binary_image(ref, BIN / "pause", ["/usr/local/bin/pause"]))
        else:
            images.append(binary_image(ref, BIN / program))
    assert pause, f"kubeadm listed no pause image: {refs}"
    images.append(operator_archive())
    return images, pause
