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
from tests.controlplane.cluster import ROOT, ControlPlane, control_plane, wait_for
from tests.realnode.node import HostState, RealNode, kubeadm_init, operator_archive, remove_cgroups

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

    def operator_pod(self) -> dict[str, Any]:
        pods = self.cp.kubectl_json("get", "pods", "-n", NAMESPACE, "-l",
                                    "app.kubernetes.io/name=kube-audit-operator")["items"]  # fmt: skip
        assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
        return dict(pods[0])

    def apiserver_container(self) -> str:
        """The running kube-apiserver's container ID, from its mirror pod: a new one is a
        restart."""
        mirror = self.cp.kubectl_json("get", "pod", "-n", "kube-system",
                                      f"kube-apiserver-{self.node.name}")  # fmt: skip
        return str(mirror["status"]["containerStatuses"][0].get("containerID") or "")

    def set_identity_mode(self, mode: str) -> None:
        """The identity mode set in the DaemonSet as docs/settings.md says; returns once the
        manifest names only that mode's authenticator and the replaced pod is Ready as kubelet
        reports it (every container, the mode in its environment)."""
        flag, gone = IDENTITY_FLAGS[mode], [f for m, f in IDENTITY_FLAGS.items() if m != mode]
        self.cp.kubectl("-n", NAMESPACE, "set", "env", "daemonset/kube-audit", "-c", "operator",
                        f"KUBE_AUDIT_IDENTITY_MODE={mode}")  # fmt: skip

        def switched() -> bool:
            manifest = self.node.manifest.read_bytes()
            return flag in manifest and not any(g in manifest for g in gone)

        wait_for(f"the manifest switched to {mode}", switched, 300, 1)

        def pod_ready() -> bool:
            pod = self.operator_pod()
            (operator,) = [c for c in pod["spec"]["containers"] if c["name"] == "operator"]
            env = {e["name"]: e.get("value") for e in operator.get("env", [])}
            statuses = pod["status"].get("containerStatuses") or []
            return (
                env.get("KUBE_AUDIT_IDENTITY_MODE") == mode
                and bool(statuses)
                and all(s["ready"] for s in statuses)
            )

        wait_for(f"the pod in {mode} mode Ready", pod_ready, 300, 2)


def install_with_local_image(cp: ControlPlane) -> str:
    """``kubectl apply -k`` of an overlay of deploy/ that only names the image built here."""
    version = operator_archive().name.removeprefix("kube-audit-operator-").removesuffix(".tar")
    overlay = cp.base / "overlay"
    overlay.mkdir(exist_ok=True)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
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
        )
    )
    cp.kubectl("apply", "-k", str(overlay))
    cp.kubectl("wait", "--for=condition=established", "--timeout=60s",
               "crd/auditusers.kube-audit.io", "crd/auditpolicies.kube-audit.io")  # fmt: skip
    return f"{LOCAL_IMAGE}:{version}"


def wait_operator_ready(cp: ControlPlane, timeout: float = 300) -> None:
    """Every scheduled pod of the DaemonSet Ready (``rollout status`` passes before the
    controller has made any); on timeout, what kubelet says of the pod."""

    def ready() -> bool:
        ds = cp.kubectl_json("get", "daemonset", "kube-audit", "-n", NAMESPACE)
        status = ds.get("status") or {}
        wanted = status.get("desiredNumberScheduled", 0)
        return (
            bool(wanted)
            and status.get("numberReady") == wanted == status.get("updatedNumberScheduled")
            and status.get("observedGeneration") == ds["metadata"]["generation"]
        )

    try:
        wait_for("the DaemonSet's pods Ready", ready, timeout, 2)
    except AssertionError as error:
        described = cp.kubectl("describe", "pods", "-n", NAMESPACE, check=False).stdout
        raise AssertionError(f"{error}\n{described[-3000:]}") from None


@contextlib.contextmanager
def real_node(base: Path) -> Iterator[Real]:
    """Boot, install, yield; then tear down and check the machine is as it was."""
    before = HostState.read()
    tier_net = ""
    try:
        with control_plane(base) as cp:
            tier_net = cp.netns.name
            node = kubeadm_init(cp)
            wait_for(f"{node.name} Ready", lambda: node_ready(cp, node.name), 180, 2)
            kubeadm_manifest = node.manifest.read_bytes()
            image = install_with_local_image(cp)
            wait_operator_ready(cp)
            yield Real(cp, node, image, cp.base / "overlay", kubeadm_manifest)
    finally:
        remove_cgroups(before.cgroups)
        left = before.differences(HostState.read(), tier_net)
        assert not left, "the real node tier left the machine changed:\n" + "\n".join(left)


def node_ready(cp: ControlPlane, name: str) -> bool:
    node = cp.kubectl_json("get", "node", name)
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in node["status"].get("conditions", []))  # fmt: skip
