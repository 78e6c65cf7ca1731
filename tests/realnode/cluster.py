"""One node made by ``kubeadm init``, run by the real kubelet through containerd, with
kube-audit installed as users install it (the image, the DaemonSet's pod): for the tests and for
``make bench``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kube_audit.core.manifest import WEBHOOK_CONFIG_FLAG
from tests.controlplane.cluster import ROOT, ControlPlane, LoadBalancer, control_plane, wait_for
from tests.realnode.node import (
    HostState,
    RealNode,
    kubeadm_ha,
    kubeadm_init,
    operator_archive,
    remove_cgroups,
)
from tests.store.store import Server, why_no_store

NAMESPACE = "kube-audit"
LOCAL_IMAGE = "local/kube-audit-operator"
# What names each identity mode's authenticator in kube-apiserver's manifest.
IDENTITY_FLAGS = {
    "token-file": b"--token-auth-file=",
    "webhook": f"{WEBHOOK_CONFIG_FLAG}=".encode(),
}


@dataclass
class Real:
    cp: ControlPlane
    node: RealNode
    image: str
    overlay: Path
    kubeadm_manifest: bytes
    store: Server | None

    def operator_pod(self) -> dict[str, Any]:
        pods = self.cp.kubectl_json("get", "pods", "-n", NAMESPACE, "-l",
                                    "app.kubernetes.io/name=kube-audit-operator")["items"]  # fmt: skip
        assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
        return dict(pods[0])

    def apiserver_container(self) -> str:
        return apiserver_container(self.cp, self.node)

    def set_identity_mode(self, mode: str) -> None:
        set_identity_mode(self.cp, [self.node], mode)


def apiserver_container(cp: ControlPlane, node: RealNode) -> str:
    """The node's running kube-apiserver container ID, from its mirror pod: a new one is a
    restart ("" while kubelet reports none)."""
    mirror = cp.kubectl_json("get", "pod", "-n", "kube-system", f"kube-apiserver-{node.name}")
    statuses = mirror["status"].get("containerStatuses") or [{}]
    return str(statuses[0].get("containerID") or "")


def set_identity_mode(cp: ControlPlane, nodes: list[RealNode], mode: str) -> None:
    """The identity mode set in the DaemonSet as docs/settings.md says; returns once every
    node's manifest names only that mode's authenticator and every replaced pod is Ready as
    kubelet reports it (every container, the mode in its environment)."""
    flag, gone = IDENTITY_FLAGS[mode], [f for m, f in IDENTITY_FLAGS.items() if m != mode]
    cp.kubectl("-n", NAMESPACE, "set", "env", "daemonset/kube-audit", "-c", "operator",
               f"KUBE_AUDIT_IDENTITY_MODE={mode}")  # fmt: skip

    def switched() -> bool:
        manifests = [node.manifest.read_bytes() for node in nodes]
        return all(flag in m and not any(g in m for g in gone) for m in manifests)

    wait_for(f"the manifests switched to {mode}", switched, 300 * len(nodes), 1)

    def pods_ready() -> bool:
        pods = cp.kubectl_json("get", "pods", "-n", NAMESPACE, "-l",
                               "app.kubernetes.io/name=kube-audit-operator")["items"]  # fmt: skip
        if len(pods) != len(nodes):
            return False
        for pod in pods:
            (operator,) = [c for c in pod["spec"]["containers"] if c["name"] == "operator"]
            env = {e["name"]: e.get("value") for e in operator.get("env", [])}
            statuses = pod["status"].get("containerStatuses") or []
            if env.get("KUBE_AUDIT_IDENTITY_MODE") != mode or not statuses:
                return False
            if not all(s["ready"] for s in statuses):
                return False
        return True

    wait_for(f"the pods in {mode} mode Ready", pods_ready, 300, 2)


def install_with_local_image(
    cp: ControlPlane, env: dict[str, str] | None = None, store: str | None = None
) -> str:
    """``kubectl apply -k`` of an overlay of deploy/ that names the image built here and, as
    docs/settings.md shows, sets the operator container's ``env``; with ``store``, the
    VictoriaLogs component sending to it, as docs/audit-store.md shows."""
    version = operator_archive().name.removeprefix("kube-audit-operator-").removesuffix(".tar")
    overlay = cp.base / "overlay"
    overlay.mkdir(exist_ok=True)
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "deploy", overlay)],
        "images": [
            {
                "name": "ghcr.io/kube-audit/kube-audit-operator",
                "newName": LOCAL_IMAGE,
                "newTag": version,
            }
        ],
    }
    if env:
        patch = {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "kube-audit", "namespace": NAMESPACE},
            "spec": {"template": {"spec": {"containers": [
                {"name": "operator", "env": [{"name": k, "value": v} for k, v in env.items()]}
            ]}}},
        }  # fmt: skip
        kustomization["patches"] = [{"patch": yaml.safe_dump(patch)}]
    if store:
        kustomization["components"] = [
            os.path.relpath(ROOT / "deploy" / "components" / "victorialogs", overlay)
        ]
        config = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": "kube-audit-store", "namespace": NAMESPACE},
                  "data": {"url": store, "cluster-name": "realnode",
                           "query-url": f"http://{STORE_SERVICE}.{STORE_SERVICE_NAMESPACE}.svc:9428"}}  # fmt: skip
        kustomization.setdefault("patches", []).append({"patch": yaml.safe_dump(config)})
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    cp.kubectl("apply", "-k", str(overlay))
    cp.kubectl("wait", "--for=condition=established", "--timeout=60s",
               "crd/auditusers.kube-audit.io", "crd/auditpolicies.kube-audit.io")  # fmt: skip
    return f"{LOCAL_IMAGE}:{version}"


def wait_operator_ready(cp: ControlPlane, timeout: float = 300) -> None:
    """Every scheduled pod of the DaemonSet Ready and no other left (``rollout status`` passes
    before the controller has made any); on timeout, what kubelet says of the pod."""

    def ready() -> bool:
        ds = cp.kubectl_json("get", "daemonset", "kube-audit", "-n", NAMESPACE)
        status = ds.get("status") or {}
        wanted = status.get("desiredNumberScheduled", 0)
        # A surge update: the old pod, still ending beside the new one, is not counted.
        pods = cp.kubectl_json("get", "pods", "-n", NAMESPACE, "-l",
                               "app.kubernetes.io/name=kube-audit-operator")["items"]  # fmt: skip
        return (
            bool(wanted)
            and status.get("numberReady") == wanted == status.get("updatedNumberScheduled")
            and status.get("observedGeneration") == ds["metadata"]["generation"]
            and len(pods) == wanted
        )

    try:
        wait_for("the DaemonSet's pods Ready", ready, timeout, 2)
    except AssertionError as error:
        described = cp.kubectl("describe", "pods", "-n", NAMESPACE, check=False).stdout
        raise AssertionError(f"{error}\n{described[-3000:]}") from None


@contextlib.contextmanager
def host_left_as_found() -> Iterator[set[str]]:
    """Around a tier's life: afterwards its cgroups are removed and the machine must be as it
    was. Yields the set the tier adds its network namespaces to (a process running in one is
    the tier's)."""
    before = HostState.read()
    tier_nets: set[str] = set()
    try:
        yield tier_nets
    finally:
        remove_cgroups(before.cgroups)
        left = before.differences(HostState.read(), frozenset(tier_nets) - {""})
        assert not left, "the real node tier left the machine changed:\n" + "\n".join(left)


@contextlib.contextmanager
def real_node(base: Path) -> Iterator[Real]:
    """Boot, install, yield; then tear down and check the machine is as it was."""
    with host_left_as_found() as tier_nets, control_plane(base) as cp:
        tier_nets.add(cp.netns.name)
        node = kubeadm_init(cp)
        wait_for(f"{node.name} Ready", lambda: node_ready(cp, node.name), 180, 2)
        kubeadm_manifest = node.manifest.read_bytes()
        # The audit store in the node's network (the pod has the node's): its ship container
        # sends the real apiserver's events there from the start; who --cluster asks it as a
        # Service through kube-apiserver's proxy.
        store = None
        if why_no_store() is None:  # Go 1.24 and 1.25 run this tier, not VictoriaLogs
            store = Server("victoria-logs", base / "victorialogs", host=node.address).start()
        try:
            image = install_with_local_image(cp, store=store.url if store else None)
            if store is not None:
                cp.apply(store_service(node.name, node.address, store.port))
            wait_operator_ready(cp)
            yield Real(cp, node, image, cp.base / "overlay", kubeadm_manifest, store)
        finally:
            if store is not None:
                store.stop()


STORE_SERVICE = "victorialogs"
STORE_SERVICE_NAMESPACE = "kube-system"


def store_service(node: str, address: str, port: int) -> list[dict[str, Any]]:
    """The store as a Service. kube-apiserver's service proxy goes only to an address a pod of
    the Service's namespace has: the store runs on the node's network, as a hostNetwork pod
    would, so its endpoint names the node's kube-apiserver mirror pod, whose address it is."""
    meta = {"name": STORE_SERVICE, "namespace": STORE_SERVICE_NAMESPACE}
    target = {"kind": "Pod", "namespace": STORE_SERVICE_NAMESPACE, "name": f"kube-apiserver-{node}"}
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": meta,
         "spec": {"ports": [{"name": "http", "port": 9428, "targetPort": port}]}},
        {"apiVersion": "v1", "kind": "Endpoints", "metadata": meta,
         "subsets": [{"addresses": [{"ip": address, "targetRef": target}],
                      "ports": [{"name": "http", "port": port}]}]},
    ]  # fmt: skip


@dataclass
class RealHA:
    """Nodes made by ``kubeadm init`` and ``join --control-plane``, HAProxy in front."""

    cp: ControlPlane
    nodes: list[RealNode]
    lb: LoadBalancer
    image: str

    def apiserver_containers(self) -> dict[str, str]:
        return {node.name: apiserver_container(self.cp, node) for node in self.nodes}


@contextlib.contextmanager
def real_nodes(base: Path, count: int, env: dict[str, str]) -> Iterator[RealHA]:
    """``count`` real nodes with the operator's ``env``; torn down as ``real_node`` is."""
    with host_left_as_found() as tier_nets, control_plane(base) as cp:
        tier_nets.add(cp.netns.name)
        try:
            nodes, lb = kubeadm_ha(cp, count)
        finally:
            tier_nets.update(n.net_name for n in cp.nodes if isinstance(n, RealNode))
        wait_for("every node Ready", lambda: all(node_ready(cp, n.name) for n in nodes), 180, 2)
        image = install_with_local_image(cp, env)
        wait_operator_ready(cp)
        yield RealHA(cp, nodes, lb, image)


def node_ready(cp: ControlPlane, name: str) -> bool:
    node = cp.kubectl_json("get", "node", name)
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in node["status"].get("conditions", []))  # fmt: skip
