"""The whole job on a real kubeadm node: AuditUsers become working tokens of a restarted
kube-apiserver, AuditPolicies become its audit log, and every failure path ends verified.

The tests run in file order on one node and one operator process; each names what it expects
the cluster to hold when it starts.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.controlplane.cluster import (
    KUBE_AUDIT as KUBE_AUDIT_PATH,
    ROOT,
    ControlPlane,
    KubectlError,
    Node,
    OperatorProcess,
    install_operator,
    wait_for,
)
from tests.unit.test_crd import CASES

KUBE_AUDIT = str(KUBE_AUDIT_PATH)
USERS = "kube-audit.io/v1alpha1"
CI_TOKEN = "ci-deployer-0123456789abcdef0123456789abcdef"


@dataclass
class Job:
    cp: ControlPlane
    node: Node
    operator: OperatorProcess
    kubeadm_manifest: bytes

    def restarts_since(self, mark: int) -> int:
        return len(self.node.apiserver_events("start", since=mark))

    def mark(self) -> int:
        return len(self.node.records())


@pytest.fixture(scope="module")
def job(cp: ControlPlane) -> Iterator[Job]:
    node = cp.first
    kubeadm_manifest = node.manifest.read_bytes()
    kubeconfig = install_operator(cp)
    # The DaemonSet's settings, but a shorter health timeout: the rollback test waits it out.
    operator = OperatorProcess(cp, node, kubeconfig, env={"KUBE_AUDIT_TIMEOUT": "60"})
    operator.start()
    yield Job(cp, node, operator, kubeadm_manifest)
    if operator.process is not None:
        operator.stop()


def status_of(cp: ControlPlane, plural: str, name: str) -> dict[str, Any]:
    obj = cp.kubectl_json("get", plural, name)
    conditions = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}
    return {"generation": obj["metadata"]["generation"], "conditions": conditions, "obj": obj}


def is_ready(cp: ControlPlane, plural: str, name: str) -> bool:
    state = status_of(cp, plural, name)
    ready = state["conditions"].get("Ready") or {}
    return ready.get("status") == "True" and ready.get("observedGeneration") == state["generation"]


def wait_ready(cp: ControlPlane, plural: str, names: list[str], timeout: float = 120) -> None:
    wait_for(
        f"{plural} {', '.join(names)} Ready",
        lambda: all(is_ready(cp, plural, n) for n in names),
        timeout,
        interval=1,
    )


def token_of(cp: ControlPlane, user: str) -> str:
    secret = cp.kubectl_json("get", "secret", "-n", "kube-audit", f"audituser-{user}")
    return base64.b64decode(secret["data"]["token"]).decode()


def whoami(cp: ControlPlane, token: str, server: str | None = None) -> dict[str, Any] | str:
    """The apiserver's view of a bearer token: userInfo, or kubectl's error."""
    config = cp.token_kubeconfig(cp.base / "whoami.kubeconfig", token, server)
    result = cp.kubectl("auth", "whoami", "-o", "json", kubeconfig=config, check=False)
    if result.returncode != 0:
        if "Unauthorized" not in result.stderr:
            raise KubectlError(f"whoami: {result.stderr.strip()}")  # the apiserver is restarting
        return result.stderr.strip()
    return dict(json.loads(result.stdout)["status"]["userInfo"])


def as_user(cp: ControlPlane, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    config = cp.token_kubeconfig(cp.base / "user.kubeconfig", token)
    return cp.kubectl(*args, kubeconfig=config)


def who(node: Node, *args: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [KUBE_AUDIT, "who", str(node.audit_log_dir), "-o", "json", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_crds_are_enforced_by_the_apiserver(job: Job) -> None:
    cp = job.cp
    for kind, obj, refused in CASES:
        text = yaml.safe_dump(obj)
        result = cp.kubectl("apply", "--dry-run=server", "-f", "-", stdin=text, check=False)
        assert (result.returncode != 0) is refused, (kind, obj, result.stderr)
    for example in ("auditusers.yaml", "auditpolicy-starter.yaml"):
        cp.kubectl("apply", "--dry-run=server", "-f", str(ROOT / "examples" / example))
    explain = cp.kubectl("explain", "audituser.spec").stdout
    assert "groups" in explain and "tokenSecretRef" in explain


def test_people_get_their_identities_with_one_restart(job: Job) -> None:
    cp, node = job.cp, job.node
    mark = job.mark()
    cp.kubectl("create", "namespace", "team")
    cp.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "ci-deployer-token", "namespace": "kube-audit"},
                "stringData": {"token": CI_TOKEN},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "developers-edit", "namespace": "team"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "edit",
                },
                "subjects": [
                    {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "developer"}
                ],
            },
        ]
    )
    cp.kubectl(
        "apply",
        "-f",
        str(ROOT / "examples/auditusers.yaml"),
        "-f",
        str(ROOT / "examples/auditpolicy-starter.yaml"),
    )
    wait_ready(cp, "auditusers", ["alice", "bob", "ci-deployer", "dave"], timeout=180)
    wait_ready(cp, "auditpolicies", ["developers"])
    assert job.restarts_since(mark) == 1, node.records()[mark:]

    header = cp.kubectl("get", "auditusers").stdout.splitlines()[0].split()
    assert header == ["NAME", "USERNAME", "GROUPS", "DISABLED", "READY", "STATUS", "AGE"]

    alice = whoami(cp, token_of(cp, "alice"))
    assert isinstance(alice, dict), alice
    assert alice["username"] == "alice" and alice["uid"] == "alice@example.com"
    assert set(alice["groups"]) == {"developer", "system:authenticated"}
    bob = whoami(cp, token_of(cp, "bob"))
    assert isinstance(bob, dict) and set(bob["groups"]) >= {"developer", "ops"}
    ci = whoami(cp, CI_TOKEN)
    assert isinstance(ci, dict) and ci["username"] == "ci:deployer"
    assert "deployers" in ci["groups"]
    # dave was disabled from the start: no token was ever made for him.
    assert cp.kubectl("get", "secret", "-n", "kube-audit", "audituser-dave", check=False).returncode


def test_a_disabled_user_gets_401(job: Job) -> None:
    cp = job.cp
    cp.kubectl(
        "patch", "audituser", "ci-deployer", "--type=merge", "-p", '{"spec":{"disabled":true}}'
    )
    wait_for(
        "ci:deployer's token to stop working", lambda: isinstance(whoami(cp, CI_TOKEN), str), 180, 1
    )
    assert "Unauthorized" in str(whoami(cp, CI_TOKEN))
    assert isinstance(whoami(cp, token_of(cp, "alice")), dict)


def test_the_audit_log_answers_who_did_it(job: Job) -> None:
    cp, node = job.cp, job.node
    alice = token_of(cp, "alice")
    as_user(cp, alice, "create", "configmap", "alices-settings", "-n", "team")
    as_user(cp, alice, "get", "pods", "-n", "team")
    found = wait_for(
        "alice's ConfigMap create in the audit log",
        lambda: who(node, "--user", "alice", "--verb", "create", "--resource", "cm"),
        timeout=30,
    )
    assert any(e["objectRef"]["name"] == "alices-settings" for e in found), found
    # The starter policy logs writes and Secret/ConfigMap access only: a pod list is not logged.
    assert who(node, "--user", "alice", "--resource", "pods") == []


def test_a_deleted_user_loses_the_token_and_the_secret(job: Job) -> None:
    cp = job.cp
    token = token_of(cp, "bob")
    mark = job.mark()
    cp.kubectl("delete", "audituser", "bob")
    wait_for("bob's token to stop working", lambda: isinstance(whoami(cp, token), str), 120, 1)
    assert job.restarts_since(mark) == 1
    wait_for(
        "the garbage collector to delete bob's token Secret",
        lambda: (
            cp.kubectl("get", "secret", "-n", "kube-audit", "audituser-bob", check=False).returncode
            != 0
        ),
    )
    assert isinstance(whoami(cp, token_of(cp, "alice")), dict)


def test_a_burst_restarts_once_and_an_operator_restart_not_at_all(job: Job) -> None:
    cp = job.cp
    mark = job.mark()
    users = [
        {"apiVersion": USERS, "kind": "AuditUser", "metadata": {"name": f"burst-{i:03d}"}}
        for i in range(200)
    ]
    cp.apply(users, timeout=120)
    wait_for(
        "all 200 tokens to work",
        lambda: (
            isinstance(whoami(cp, token_of(cp, "burst-199")), dict)
            and isinstance(whoami(cp, token_of(cp, "burst-000")), dict)
        ),
        timeout=180,
        interval=2,
    )
    wait_ready(cp, "auditusers", ["burst-000", "burst-199"])
    assert job.restarts_since(mark) == 1, job.node.records()[mark:]

    mark = job.mark()
    assert job.operator.stop() == 0
    job.operator.start()
    before = job.operator.log.stat().st_size
    wait_for(
        "the restarted operator to find the node unchanged",
        lambda: "unchanged, the node runs config" in job.operator.log.read_text()[before:],
        timeout=120,
        interval=1,
    )
    assert job.restarts_since(mark) == 0


def test_a_config_the_apiserver_refuses_is_rolled_back(job: Job) -> None:
    """Auditing switched on where kube-apiserver cannot open its log (the path is a folder):
    only the apiserver finds out, at start-up. The agent rolls back to the config without
    audit, the objects say why, and repairing the host plus a new config goes through."""
    cp, node = job.cp, job.node
    alice = token_of(cp, "alice")
    cp.kubectl("delete", "auditpolicy", "developers")
    wait_for(
        "the audit flags to be gone and the apiserver ready",
        lambda: "--audit-policy-file" not in node.manifest.read_text() and node.readyz() == 200,
        timeout=180,
        interval=1,
    )
    wait_for("alice's token", lambda: isinstance(whoami(cp, alice), dict), 60, 1)
    log = node.audit_log_dir / "audit.log"
    saved = log.with_name("audit.log.saved")
    log.rename(saved)
    log.mkdir()
    mark = job.mark()
    cp.kubectl("apply", "-f", str(ROOT / "examples/auditpolicy-starter.yaml"))

    def failed() -> dict[str, Any] | None:
        """Ready=False for a failure (Pending, the CRD's default before the operator wrote, and
        Progressing while it rolls out, are Ready=False too)."""
        state = status_of(cp, "auditpolicies", "developers")
        ready = state["conditions"].get("Ready", {})
        return (
            state
            if ready.get("status") == "False" and ready["reason"] not in ("Pending", "Progressing")
            else None
        )

    state = wait_for("AuditPolicy developers failed after the rollback", failed, 300, 2)
    message = json.dumps(state["obj"]["status"])
    assert "rolled back" in message.lower() or "RolledBack" in message, message
    assert node.apiserver_events("exit", since=mark), "the new apiserver exited at start-up"
    assert "ensureLogFile" in node.apiserver_log()
    node.wait_ready()
    assert "--audit-policy-file" not in node.manifest.read_text()
    assert isinstance(whoami(cp, alice), dict), "the previous config runs again"

    # A person deleted while the refused policy is still in the cluster (issue 20, item 2):
    # the content without them carries that policy, so it is refused too; their token still
    # goes, taken away on the running config by itself.
    leaver = token_of(cp, "burst-199")
    before = job.operator.log.stat().st_size
    cp.kubectl("delete", "audituser", "burst-199")
    wait_for(
        "burst-199's token to stop working while the policy is refused",
        lambda: isinstance(whoami(cp, leaver), str),
        timeout=420,
        interval=2,
    )
    node.wait_ready()
    assert "--audit-policy-file" not in node.manifest.read_text(), "the running config's"
    assert isinstance(whoami(cp, alice), dict)
    said = job.operator.log.read_text()[before:]
    assert "taking away on their own the identities it removes" in said, said[-3000:]
    assert failed() is not None, "the policy change itself stays rolled back"

    log.rmdir()
    saved.rename(log)
    cp.kubectl(
        "patch",
        "auditpolicy",
        "developers",
        "--type=merge",
        "-p",
        '{"spec":{"omitManagedFields":true}}',
    )
    wait_ready(cp, "auditpolicies", ["developers"], timeout=240)
    assert "--audit-policy-file" in node.manifest.read_text()


def test_uninstall_restores_kubeadms_manifest(job: Job) -> None:
    node = job.node
    assert job.operator.stop() == 0
    result = subprocess.run(
        [KUBE_AUDIT, "node", "uninstall", "--host-root", str(node.tree)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert node.manifest.read_bytes() == job.kubeadm_manifest
    node.wait_ready()
    pid = node.apiserver_events("start")[-1]["pid"]
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert not [a for a in args if a.startswith((b"--token-auth-file", b"--audit-"))]


def test_identities_come_back_after_kubeadm_rewrites_the_manifest(job: Job) -> None:
    cp, node = job.cp, job.node
    before = job.operator.log.stat().st_size
    job.operator.start()
    alice = token_of(cp, "alice")
    wait_for("alice's token after reinstall", lambda: isinstance(whoami(cp, alice), dict), 180, 1)
    wait_for(
        "the operator to verify the reinstall",
        lambda: "unchanged, the node runs config" in job.operator.log.read_text()[before:],
        timeout=180,
    )
    node.kubeadm(
        "init", "phase", "control-plane", "apiserver", "--config", str(node.kubeadm_config)
    )
    rewritten = time.monotonic()
    wait_for("the rewrite to take alice's token away", lambda: isinstance(whoami(cp, alice), str))
    lost = time.monotonic()
    wait_for("alice's token to come back", lambda: isinstance(whoami(cp, alice), dict), 180, 1)
    back = time.monotonic()
    print(
        f"kubeadm rewrite: token gone {lost - rewritten:.1f}s after it, "
        f"missing for {back - lost:.1f}s"
    )
    assert "--token-auth-file" in node.manifest.read_text()


def test_the_admission_guard_cannot_be_switched_off_by_deleting_its_configmap(job: Job) -> None:
    cp = job.cp
    cp.kubectl("apply", "-k", str(ROOT / "deploy/admission"))
    eve = {"apiVersion": USERS, "kind": "AuditUser", "metadata": {"name": "eve"}}

    def write(user: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        text = yaml.safe_dump(user)
        return cp.kubectl("apply", "--dry-run=server", "-f", "-", stdin=text, check=False)

    said: list[str] = []

    def admitted() -> bool:
        done = write(eve)
        said.append(done.stderr.strip())
        return done.returncode == 0

    # Right after the previous test restarted kube-apiserver: once (one run in five, on a
    # loaded machine) writes were still refused after 60 s and the reason was not kept. Likely
    # the admission plugin loading its parameter informer after the restart (as in
    # kubernetes#141367). Wait longer, and say what kubectl said if it still fails.
    try:
        wait_for("the guard to admit a plain AuditUser", admitted, timeout=180)
    except AssertionError as error:
        raise AssertionError(f"{error}; kubectl said: {said[-1] if said else ''}") from None
    cp.kubectl("delete", "configmap", "-n", "kube-audit", "kube-audit-admission")
    denied = wait_for(
        "every AuditUser write to be denied without the ConfigMap",
        lambda: (r := write(eve)).returncode != 0 and r,
    )
    assert "kube-audit-no-system-identities" in denied.stderr, denied.stderr
    cp.kubectl("delete", "-k", str(ROOT / "deploy/admission"), "--ignore-not-found")
    wait_for("writes to be admitted without the guard", lambda: write(eve).returncode == 0)


def test_a_hardened_apiserver_takes_changes_without_a_rollback(job: Job, tmp_path: Path) -> None:
    """CIS 1.2.1 (``--anonymous-auth=false``), with kubelet's probes as tcpSocket by a kubeadm
    patch (anonymous httpGet probes would fail there; docs/install.md): /readyz answers 401 to
    an anonymous request, the operator proves each new apiserver with its own credentials and
    the mirror pod, and a change goes through with one restart and no rollback (issue 20,
    item 1). Last in the file: the node stays hardened."""
    cp, node = job.cp, job.node
    cp.apply([{"apiVersion": USERS, "kind": "AuditUser", "metadata": {"name": "hardy"}}])
    # Ready: the operator's own wait for that restart is over, so kubeadm's rewrite below is
    # not one that cuts it short (that case: tests/operator/test_holds.py).
    wait_ready(cp, "auditusers", ["hardy"], timeout=300)
    hardy = token_of(cp, "hardy")
    assert isinstance(whoami(cp, hardy), dict)

    init, cluster = yaml.safe_load_all(node.kubeadm_config.read_text())
    args = cluster.setdefault("apiServer", {}).setdefault("extraArgs", [])
    args.append({"name": "anonymous-auth", "value": "false"})
    patches = tmp_path / "patches"
    patches.mkdir()
    tcp = {"httpGet": None, "tcpSocket": {"host": node.address, "port": node.port}}
    probes = {p: tcp for p in ("livenessProbe", "readinessProbe", "startupProbe")}
    (patches / "kube-apiserver+strategic.yaml").write_text(
        yaml.safe_dump({"spec": {"containers": [{"name": "kube-apiserver", **probes}]}})
    )
    init["patches"] = {"directory": str(patches)}
    config = tmp_path / "hardened.yaml"
    config.write_text(yaml.safe_dump_all([init, cluster], sort_keys=False))
    before = job.operator.log.stat().st_size
    node.kubeadm("init", "phase", "control-plane", "apiserver", "--config", str(config))
    assert "--anonymous-auth=false" in node.manifest.read_text()
    wait_for(
        "hardy's token on the hardened apiserver",
        lambda: isinstance(whoami(cp, hardy), dict),
        420,
        2,
    )
    assert node.readyz() == 401, "anonymous requests are refused"
    manifest = node.manifest.read_text()
    assert "--anonymous-auth=false" in manifest and "--token-auth-file" in manifest

    mark = job.mark()
    cp.apply([{"apiVersion": USERS, "kind": "AuditUser", "metadata": {"name": "hardy-2"}}])
    wait_ready(cp, "auditusers", ["hardy-2"], timeout=300)
    assert isinstance(whoami(cp, token_of(cp, "hardy-2")), dict)
    assert job.restarts_since(mark) == 1, node.records()[mark:]
    said = job.operator.log.read_text()[before:]
    assert "rolled back" not in said and "blocked" not in said, said[-4000:]
