"""The real programs run as a kubeadm node would: versions, static pods, mirror pods, GC."""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request

import kubernetes.client
import kubernetes.config

from kube_audit.agent.health import HealthCheck, HealthOutcome
from kube_audit.kube import KubeApi
from tests.controlplane.cluster import (
    KUBE_AUDIT,
    ROOT,
    ControlPlane,
    kubernetes_version,
    wait_for,
)


def test_apiserver_reports_the_built_version(cp: ControlPlane) -> None:
    version = cp.kubectl_json("version")["serverVersion"]
    assert version["gitVersion"] == kubernetes_version()


def test_static_pods_of_kubeadm_run_with_mirror_pods(cp: ControlPlane) -> None:
    node = cp.first

    def mirrors() -> dict[str, dict[str, object]]:
        pods = cp.kubectl_json("get", "pods", "-n", "kube-system")["items"]
        return {p["metadata"]["name"]: p for p in pods}

    names = {f"{c}-{node.name}" for c in ("etcd", "kube-apiserver", "kube-controller-manager")}
    found = wait_for("three ready mirror pods", lambda: names <= set(mirrors()) and mirrors())
    apiserver = found[f"kube-apiserver-{node.name}"]
    annotations = apiserver["metadata"]["annotations"]
    assert annotations["kubernetes.io/config.mirror"] == annotations["kubernetes.io/config.hash"]
    assert annotations["kubernetes.io/config.source"] == "file"
    assert apiserver["metadata"]["ownerReferences"][0]["kind"] == "Node"
    wait_for(
        "kube-apiserver's readiness probe to pass",
        lambda: mirrors()[f"kube-apiserver-{node.name}"]["status"]["containerStatuses"][0]["ready"],
    )
    starts = node.apiserver_events("start")
    assert len(starts) == 1, starts


def test_garbage_collector_deletes_dependents(cp: ControlPlane) -> None:
    owner = cp.kubectl_json("create", "configmap", "gc-owner", "-n", "default")
    cp.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": "gc-dependent",
                    "namespace": "default",
                    "ownerReferences": [
                        {
                            "apiVersion": "v1",
                            "kind": "ConfigMap",
                            "name": "gc-owner",
                            "uid": owner["metadata"]["uid"],
                        }
                    ],
                },
            }
        ]
    )
    cp.kubectl("delete", "configmap", "gc-owner", "-n", "default")
    wait_for(
        "the garbage collector to delete the dependent",
        lambda: (
            cp.kubectl("get", "configmap", "gc-dependent", "-n", "default", check=False).returncode
            != 0
        ),
    )


def test_the_health_probe_reads_a_real_apiservers_answer_to_credentials(cp: ControlPlane) -> None:
    """The agent's probe against the real kube-apiserver: a ServiceAccount token reads
    /readyz (200); a token the apiserver refuses gets 401 from its authentication layer, as
    every request without credentials does with --anonymous-auth=false. That means up, not
    "not ready": the probe must not roll a change back for it."""
    node = cp.first
    cp.kubectl("create", "serviceaccount", "health-probe", "-n", "default")
    token = cp.kubectl("create", "token", "health-probe", "-n", "default").stdout.strip()

    def check(credential: str) -> HealthOutcome:
        probe = HealthCheck(
            url=f"{node.url}/readyz", ca_file=node.ca, timeout=30, credentials=lambda: credential
        )
        return probe.wait_ready(require_restart=False)

    assert node.readyz("not-a-token-the-apiserver-knows") == 401, "the real answer"
    refused = check("not-a-token-the-apiserver-knows")
    assert refused.ready and "HTTP 401" in refused.reason, refused
    accepted = check(token)
    assert accepted.ready and "HTTP 401" not in accepted.reason, accepted


def test_the_apiserver_reads_the_bearer_scheme_as_the_emulator_does(cp: ControlPlane) -> None:
    """What the emulator's credential check copies (tests/operator/cluster.py bearer_token):
    the scheme in any case; ``Bearer bearer <token>`` (the in-cluster prefix doubled) is 401."""
    node = cp.first
    cp.kubectl("create", "serviceaccount", "scheme-check", "-n", "default")
    token = cp.kubectl("create", "token", "scheme-check", "-n", "default").stdout.strip()

    def status(header: str) -> int:
        request = urllib.request.Request(f"{node.url}/apis")
        request.add_header("Authorization", header)
        context = ssl.create_default_context(cafile=str(node.ca))
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    assert status(f"Bearer {token}") == 200
    assert status(f"bearer {token}") == 200
    assert status(f"Bearer bearer {token}") == 401
    assert status("Bearer wrong-token") == 401


def test_a_new_object_reads_reconciling_before_the_operator_wrote_anything(
    cp: ControlPlane,
) -> None:
    """The CRDs' status default, filled in by the real apiserver on read: without it a new
    AuditUser had no status, which Flux's kstatus reads as Current (wait: true passed at once)."""
    cp.kubectl("apply", "-k", str(ROOT / "crds"))
    cp.kubectl(
        "wait", "--for=condition=established", "--timeout=60s", "crd/auditusers.kube-audit.io"
    )
    user = {"apiVersion": "kube-audit.io/v1alpha1", "kind": "AuditUser",
            "metadata": {"name": "defaulted"}, "spec": {}}  # fmt: skip
    wait_for("AuditUsers served", lambda: cp.kubectl("get", "auditusers", check=False)
             .returncode == 0)  # fmt: skip
    cp.apply([user])
    try:
        got = cp.kubectl_json("get", "audituser", "defaulted")
        conditions = {c["type"]: c for c in got["status"]["conditions"]}
        assert conditions["Reconciling"]["status"] == "True", conditions
        assert (
            conditions["Ready"]["status"] == "False" and "observedGeneration" not in got["status"]
        )
        patched = cp.kubectl(
            "patch", "audituser", "defaulted", "--subresource=status", "--type=merge", "-p",
            '{"status":{"observedGeneration":1,"conditions":[{"type":"Ready","status":"True"}]}}',
        )  # fmt: skip
        assert patched.returncode == 0
        after = cp.kubectl_json("get", "audituser", "defaulted")["status"]
        assert after["conditions"] == [{"type": "Ready", "status": "True"}], "ours replace it"
    finally:
        cp.kubectl("delete", "audituser", "defaulted", "--ignore-not-found")


def test_the_sync_check_lists_metadata_only(cp: ControlPlane) -> None:
    """The list before every plan asks for PartialObjectMetadata: the real apiserver answers
    with names and uids, no spec and no status (10,000 bodies per plan per pod otherwise)."""
    cp.kubectl("apply", "-k", str(ROOT / "crds"))
    cp.kubectl(
        "wait", "--for=condition=established", "--timeout=60s", "crd/auditusers.kube-audit.io"
    )
    wait_for("AuditUsers served", lambda: cp.kubectl("get", "auditusers", check=False)
             .returncode == 0)  # fmt: skip
    users = [{"apiVersion": "kube-audit.io/v1alpha1", "kind": "AuditUser",
              "metadata": {"name": f"meta-{i}"}, "spec": {"groups": ["developer"]}}
             for i in range(3)]  # fmt: skip
    cp.apply(users)
    try:
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(
            config_file=str(cp.first.admin_kubeconfig), client_configuration=configuration
        )
        api = KubeApi(kubernetes.client.ApiClient(configuration))
        items = [
            i for i in api.list_metadata("auditusers") if i["metadata"]["name"].startswith("meta-")
        ]
        assert sorted(i["metadata"]["name"] for i in items) == ["meta-0", "meta-1", "meta-2"]
        assert all("spec" not in i and "status" not in i for i in items), items[0]
        assert {i.get("kind") for i in items} == {"PartialObjectMetadata"}
        uids = {u["metadata"]["name"]: u["metadata"]["uid"]
                for u in cp.kubectl_json("get", "auditusers")["items"]}  # fmt: skip
        listed = api.list_uids("auditusers")
        assert {n: listed[n] for n in ("meta-0", "meta-1", "meta-2")} == {
            n: uids[n] for n in ("meta-0", "meta-1", "meta-2")
        }
    finally:
        for user in users:
            cp.kubectl("delete", "audituser", user["metadata"]["name"], "--ignore-not-found")


def test_the_exec_guard_holds_people_to_the_who_container(cp: ControlPlane) -> None:
    """deploy/exec-guard on the real kube-apiserver. CONNECT admission runs before the pod is
    looked up, so exec into a pod that does not exist tells admitted (404) from denied (403);
    an ephemeral container needs a pod, one that no node runs."""
    cp.kubectl("apply", "-f", str(ROOT / "deploy/namespace.yaml"))
    guard = str(ROOT / "deploy/exec-guard")

    def connect(what: str, container: str, namespace: str = "kube-audit") -> str:
        query = "command=true&stdout=true" + (f"&container={container}" if container else "")
        path = f"/api/v1/namespaces/{namespace}/pods/no-such-pod/{what}?{query}"
        result = cp.kubectl("create", "--raw", path, "-f", "-", stdin="", check=False)
        assert result.returncode != 0, result.stdout
        return result.stderr

    cp.kubectl("apply", "-k", guard)
    try:
        denied = wait_for(
            "the guard to deny exec into the operator container",
            lambda: "kube-audit-exec-who-only" in (said := connect("exec", "kube-audit")) and said,
            timeout=60,
            interval=1,
        )
        assert "only the read-only `who` container" in denied, denied
        assert "kube-audit-exec-who-only" in connect("exec", ""), "the default container"
        assert "kube-audit-exec-who-only" in connect("attach", "kube-audit")
        for admitted in (connect("exec", "who"), connect("exec", "x", namespace="default")):
            assert "not found" in admitted and "kube-audit-exec-who-only" not in admitted
        meta = {"name": "exec-guard-target", "namespace": "kube-audit"}
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": {
                "nodeName": "no-such-node",
                "serviceAccountName": meta["name"],  # the tier runs no ServiceAccount controller
                "automountServiceAccountToken": False,
                "containers": [{"name": "kube-audit", "image": "registry.invalid/none"}],
            },
        }
        cp.apply([{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}, pod])
        debug = cp.kubectl(
            "debug",
            "-n",
            "kube-audit",
            "exec-guard-target",
            "--image=registry.invalid/debug",
            "--target=kube-audit",
            check=False,
        )
        assert debug.returncode != 0 and "no ephemeral containers" in debug.stderr, debug.stderr
    finally:
        cp.kubectl("delete", "-k", guard, "--ignore-not-found")
        cp.kubectl(
            "delete",
            "pod,serviceaccount",
            "-n",
            "kube-audit",
            "exec-guard-target",
            "--ignore-not-found",
            "--grace-period=0",
            "--force",
        )


def test_the_crds_let_through_the_system_names_the_guard_flags_allow(cp: ControlPlane) -> None:
    """Issue 37 item 5: ``kube-audit crds --allow-system-group`` on the real apiserver (its CEL
    compiler and its validation): the allowed group is taken, any other system: group still
    refused; the default CRDs are put back."""
    allowing = subprocess.run(
        [str(KUBE_AUDIT), "crds", "--allow-system-group", "system:monitoring",
         "--allow-system-user", "system:kube-audit-probe"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    cp.kubectl("apply", "-f", "-", stdin=allowing)

    def user(name: str, **spec: object) -> str:
        return json.dumps({"apiVersion": "kube-audit.io/v1alpha1", "kind": "AuditUser",
                           "metadata": {"name": name}, "spec": spec})  # fmt: skip

    def dry_run(text: str) -> subprocess.CompletedProcess[str]:
        return cp.kubectl("apply", "--dry-run=server", "-f", "-", stdin=text, check=False)

    try:
        wait_for("the allowing CRD served", lambda: dry_run(user(
            "mon", groups=["system:monitoring", "developer"])).returncode == 0)  # fmt: skip
        assert dry_run(user("probe", username="system:kube-audit-probe")).returncode == 0
        refused = dry_run(user("root", groups=["system:monitoring", "system:masters"]))
        assert refused.returncode != 0 and "'system:' groups" in refused.stderr, refused.stderr
        other = dry_run(user("sched", username="system:kube-scheduler"))
        assert other.returncode != 0 and "reserved for Kubernetes components" in other.stderr
    finally:
        cp.kubectl("apply", "-k", str(ROOT / "crds"))
    wait_for("the default CRD back", lambda: dry_run(user(
        "mon", groups=["system:monitoring"])).returncode != 0)  # fmt: skip
