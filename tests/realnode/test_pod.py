"""The job as a user does it, on a node made by ``kubeadm init`` and run by the real kubelet:
the image built by ``make image``, the DaemonSet's pod with the shipped securityContext and
mounts, in-cluster credentials, and kube-apiserver restarted by kubelet on our change."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.controlplane.cluster import ROOT, wait_for
from tests.controlplane.test_job import is_ready, token_of, whoami
from tests.realnode.conftest import NAMESPACE, Real


def _container_spec(real: Real, pod: dict[str, Any]) -> dict[str, Any]:
    """The OCI runtime spec containerd gave runc for the pod's container."""
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    info = json.loads(real.node.ctr("containers", "info", container_id).stdout)
    return dict(info["Spec"])


def test_the_daemonset_pod_runs_the_image_as_shipped(real: Real) -> None:
    """Ready through its own probes, on in-cluster credentials (the ServiceAccount token the
    client's in-cluster loader reads; once sent as 'Bearer bearer', 401 and a crash loop),
    read-only root filesystem, no capability, no privilege escalation."""
    pod = real.operator_pod()
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"], status
    assert status["restartCount"] == 0, real.cp.kubectl("logs", "-n", NAMESPACE,
                                                        pod["metadata"]["name"], "--previous",
                                                        check=False).stdout  # fmt: skip
    assert status["image"].endswith(real.image), status
    logs = real.cp.kubectl("logs", "-n", NAMESPACE, pod["metadata"]["name"]).stdout
    assert "LoginError" not in logs and "401" not in logs, logs
    spec = _container_spec(real, pod)
    assert spec["root"].get("readonly") is True, spec["root"]
    caps = spec["process"].get("capabilities") or {}
    assert all(not caps.get(kind) for kind in ("bounding", "effective", "permitted")), caps
    assert spec["process"].get("noNewPrivileges") is True
    env = {e.split("=", 1)[0]: e.split("=", 1)[1] for e in spec["process"]["env"]}
    assert env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1", "in-cluster config, not a kubeconfig"
    assert "KUBECONFIG" not in env


def test_people_get_identities_through_the_pod(real: Real) -> None:
    """``kubectl apply -f examples/``: the pod writes the token file and the manifest, the real
    kubelet restarts kube-apiserver, the pod proves the new instance by its mirror pod, and
    alice's token works."""
    cp, node = real.cp, real.node
    kubeadm_manifest = node.manifest.read_bytes()
    started = time.monotonic()
    cp.kubectl("apply", "-f", str(ROOT / "examples" / "auditpolicy-starter.yaml"))
    cp.kubectl("apply", "-f", str(ROOT / "examples" / "auditusers.yaml"))
    wait_for("alice and bob Ready", lambda: all(is_ready(cp, "auditusers", n)
                                                 for n in ("alice", "bob")), 300, 2)  # fmt: skip
    token = token_of(cp, "alice")
    user = wait_for("alice's token accepted", lambda: _user(whoami(cp, token)), 60, 1)
    elapsed = time.monotonic() - started
    assert user["username"] == "alice" and user["groups"][:1] == ["developer"], user
    manifest = node.manifest.read_bytes()
    assert manifest != kubeadm_manifest
    assert b"--token-auth-file=" in manifest and b"--audit-policy-file=" in manifest
    mirror = cp.kubectl_json("get", "pod", "-n", "kube-system", f"kube-apiserver-{node.name}")
    assert "kube-audit.io/config-hash" in mirror["metadata"]["annotations"], mirror["metadata"]
    logs = cp.kubectl("logs", "-n", NAMESPACE, real.operator_pod()["metadata"]["name"]).stdout
    assert "new kube-apiserver" in logs or "ready" in logs, logs
    print(f"apply -> alice's token works through the pod: {elapsed:.1f}s")


def _user(answer: dict[str, Any] | str) -> dict[str, Any] | None:
    return answer if isinstance(answer, dict) else None
