"""The whole flow on a real kubeadm control plane (kind): install, identities, audit log,
disable, a broken object, uninstall. Run with `make e2e` where Docker and kind exist."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CLUSTER = os.environ.get("KIND_CLUSTER", "kube-audit-e2e")
IMAGE = "kube-audit-operator:e2e"
NODE = f"{CLUSTER}-control-plane"


def sh(
    *cmd: str, check: bool = True, input: str | None = None, env: dict[str, str] | None = None
) -> str:
    result = subprocess.run(
        cmd, check=False, capture_output=True, text=True, input=input, env=env, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def kubectl(*args: str, **kw: Any) -> str:
    return sh("kubectl", "--context", f"kind-{CLUSTER}", *args, **kw)


def wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except AssertionError:
            pass
        time.sleep(3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    logs = tmp_path_factory.mktemp("audit-logs")
    config = {
        "kind": "Cluster",
        "apiVersion": "kind.x-k8s.io/v1alpha4",
        "nodes": [
            {
                "role": "control-plane",
                "extraMounts": [{"hostPath": str(logs), "containerPath": "/var/log/kubernetes"}],
            }
        ],
    }
    config_file = logs.parent / "kind.yaml"
    config_file.write_text(yaml.safe_dump(config))
    image = os.environ.get("KIND_NODE_IMAGE")
    sh("kind", "delete", "cluster", "--name", CLUSTER, check=False)
    sh("kind", "create", "cluster", "--name", CLUSTER, "--config", str(config_file), "--wait", "180s",
       *(["--image", image] if image else []))  # fmt: skip
    try:
        yield logs
    finally:
        if not os.environ.get("KEEP_CLUSTER"):
            sh("kind", "delete", "cluster", "--name", CLUSTER, check=False)


def node_file(path: str) -> str:
    return sh("docker", "exec", NODE, "cat", path)


def ready(kind: str, name: str) -> bool:
    out = kubectl("get", kind, name, "-o", "json", check=False)
    if not out:
        return False
    obj = json.loads(out)
    conditions = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
    return (
        conditions.get("Ready", {}).get("status") == "True"
        and obj["status"].get("observedGeneration") == obj["metadata"]["generation"]
    )


def test_full_flow(cluster: Path, tmp_path: Path) -> None:
    kubeadm_manifest = node_file("/etc/kubernetes/manifests/kube-apiserver.yaml")
    sh("docker", "build", "-t", IMAGE, str(REPO))
    sh("kind", "load", "docker-image", IMAGE, "--name", CLUSTER)
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(REPO / "deploy", overlay)],
                "images": [
                    {
                        "name": "ghcr.io/kube-audit/kube-audit-operator",
                        "newName": "kube-audit-operator",
                        "newTag": "e2e",
                    }
                ],
            }
        )
    )
    kubectl("apply", "-k", str(overlay))
    kubectl("-n", "kube-audit", "rollout", "status", "ds/kube-audit", "--timeout=300s")

    kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "kube-audit.io/v1alpha1", "kind": "AuditUser", "metadata": {"name": "alice"},
         "spec": {"uid": "alice@example.com", "groups": ["developer"]}},
        {"apiVersion": "kube-audit.io/v1alpha1", "kind": "AuditPolicy", "metadata": {"name": "developers"},
         "spec": {"omitStages": ["RequestReceived"], "rules": [
             {"level": "Metadata", "userGroups": ["developer"],
              "verbs": ["create", "update", "patch", "delete", "deletecollection"]}]}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "developers-edit", "namespace": "default"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "developer"}]},
    ]))  # fmt: skip
    wait(lambda: ready("auditusers", "alice"), 600, "AuditUser alice Ready")
    assert "True" in kubectl("get", "auditusers")

    secret = json.loads(
        kubectl("-n", "kube-audit", "get", "secret", "audituser-alice", "-o", "json")
    )
    token = base64.b64decode(secret["data"]["token"]).decode()
    server = kubectl("config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}")
    as_alice = ("kubectl", "--server", server, "--insecure-skip-tls-verify", "--token", token,
                "--kubeconfig", "/dev/null")  # fmt: skip
    whoami = json.loads(
        wait(
            lambda: sh(*as_alice, "auth", "whoami", "-o", "json", check=False), 120, "alice's token"
        )
    )
    info = whoami["status"]["userInfo"]
    assert info["username"] == "alice" and "developer" in info["groups"]

    sh(*as_alice, "-n", "default", "create", "service", "clusterip", "alice-svc", "--tcp=80:80")

    def logged() -> bool:
        for path in (cluster / "audit").glob("audit*.log"):
            for line in path.read_text().splitlines():
                event = json.loads(line)
                if (event["user"]["username"] == "alice" and event["verb"] == "create"
                        and event.get("objectRef", {}).get("resource") == "services"):  # fmt: skip
                    return True
        return False

    wait(logged, 120, "alice's create in the audit log")

    kubectl("patch", "auditusers", "alice", "--type=merge", "-p", '{"spec":{"disabled":true}}')
    wait(lambda: ready("auditusers", "alice"), 600, "alice disabled and Ready")
    wait(
        lambda: (
            "Unauthorized"
            in subprocess.run(
                [*as_alice, "auth", "whoami"], capture_output=True, text=True, check=False
            ).stderr
        ),
        180,
        "alice's token refused",
    )

    refused = subprocess.run(
        ["kubectl", "--context", f"kind-{CLUSTER}", "apply", "-f", "-"],
        input=yaml.safe_dump({"apiVersion": "kube-audit.io/v1alpha1", "kind": "AuditPolicy", "metadata": {"name": "broken"},
                              "spec": {"rules": [{"level": "Metadata", "nonResourceURLs": ["healthz"]}]}}),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "non-resource URL" in refused.stderr
    kubectl("apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "kube-audit.io/v1alpha1", "kind": "AuditUser", "metadata": {"name": "ghost"},
         "spec": {"tokenSecretRef": {"namespace": "kube-audit", "name": "missing"}}}))  # fmt: skip

    def stalled() -> bool:
        obj = json.loads(kubectl("get", "auditusers", "ghost", "-o", "json"))
        conditions = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
        return (
            conditions.get("Stalled", {}).get("status") == "True"
            and "missing" in conditions["Stalled"]["message"]
        )

    wait(stalled, 300, "the broken object to show its error")
    assert kubectl("get", "--raw", "/readyz").strip() == "ok", "the apiserver stayed up"

    kubectl("-n", "kube-audit", "delete", "ds", "kube-audit", "--wait=true")
    kubectl("debug", f"node/{NODE}", "--profile=sysadmin", f"--image={IMAGE}", "--attach=true",
            "--", "kube-audit", "node", "uninstall", "--host-root", "/host", "--no-wait")  # fmt: skip
    wait(
        lambda: node_file("/etc/kubernetes/manifests/kube-apiserver.yaml") == kubeadm_manifest,
        60,
        "kubeadm's manifest back",
    )
