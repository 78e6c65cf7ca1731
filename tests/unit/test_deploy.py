"""What `kubectl apply -k deploy/` installs, the image's entry point, and the Argo CD health."""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from lupa import LuaRuntime

from kube_audit.cli import build_parser
from kube_audit.constants import AUTHN_WEBHOOK_PORT
from kube_audit.core.crd import render_crd
from kube_audit.core.rbac import render_secrets_grant
from kube_audit.core.status import (
    APPLIED,
    INVALID,
    PENDING,
    ROLLED_BACK,
    compute_conditions,
    node_entry,
)

REPO = Path(__file__).resolve().parents[2]
needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not installed"
)


def _build(path: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(REPO / path)], check=True, capture_output=True, text=True
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    return _build("deploy")


def _one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (kind, name)
    return found[0]


@needs_kubectl
def test_base_installs_what_it_should(objects: list[dict[str, Any]]) -> None:
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        ["Namespace", "CustomResourceDefinition", "CustomResourceDefinition", "ServiceAccount",
         "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Role", "RoleBinding",
         "Role", "RoleBinding", "DaemonSet"]
    )  # fmt: skip
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "CustomResourceDefinition"} == {
        "auditusers.kube-audit.io",
        "auditpolicies.kube-audit.io",
    }
    assert not [o for o in objects if o.get("apiVersion", "").startswith("kube-audit.io")], (
        "examples stay out"
    )


@needs_kubectl
def test_rbac_is_least_privilege(objects: list[dict[str, Any]]) -> None:
    for role in (o for o in objects if o["kind"] in ("ClusterRole", "Role")):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], role["metadata"][
                "name"
            ]
    cluster = _one(objects, "ClusterRole")
    assert not [r for r in cluster["rules"] if "secrets" in r["resources"]], (
        "no Secret of the cluster: granted per namespace"
    )
    token_role = _one(objects, "Role", "kube-audit-operator")
    (secrets,) = [r for r in token_role["rules"] if "secrets" in r["resources"]]
    assert set(secrets["verbs"]) == {"get", "list", "watch", "create", "patch"}
    assert token_role["metadata"]["namespace"] == "kube-audit"
    # The Leases: the rollout and status locks (get, create, update), each node's record
    # (patch), and every node's record read by the pod that writes conditions (list: without
    # it kube-apiserver refused that read and webhook mode never reconciled, found on the
    # real node tier; the emulator checks only Secrets).
    (leases,) = [r for r in token_role["rules"] if "leases" in r["resources"]]
    assert set(leases["verbs"]) == {"get", "list", "create", "update", "patch"}
    others = [o for o in objects if o["kind"] == "Role" and o is not token_role]
    assert not [r for o in others for r in o["rules"] if "secrets" in r["resources"]]


@needs_kubectl
def test_the_token_namespace_grant_is_what_grant_secrets_prints(tmp_path: Path) -> None:
    """deploy/token-namespace under a kustomization's `namespace:` (the subject stays the
    operator's ServiceAccount in kube-audit) and `kube-audit grant-secrets` give the same."""
    overlay = REPO / "build" / f"grant-overlay-{tmp_path.name}"
    overlay.mkdir(parents=True)
    try:
        (overlay / "kustomization.yaml").write_text(
            "namespace: team-a\nresources:\n  - ../../deploy/token-namespace\n"
        )
        built = _build(str(overlay.relative_to(REPO)))
    finally:
        shutil.rmtree(overlay)
    printed = [d for d in yaml.safe_load_all(render_secrets_grant(["team-a"])) if d]
    assert built == printed
    role, binding = printed
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"],
                              "verbs": ["list", "watch"]}]  # fmt: skip
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kube-audit", "namespace": "kube-audit"}
    ]
    assert (
        subprocess.run(
            ["kubectl", "kustomize", str(REPO / "deploy" / "token-namespace")],
            capture_output=True, text=True, check=True,
        ).stdout.count("namespace: kube-audit") == 1
    ), "the base names no namespace of its own but the subject's"  # fmt: skip


@needs_kubectl
def test_daemonset(objects: list[dict[str, Any]]) -> None:
    ds = _one(objects, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"node-role.kubernetes.io/control-plane": ""}
    assert {t["key"] for t in pod["tolerations"]} >= {"node-role.kubernetes.io/control-plane"}
    assert pod["hostNetwork"] is True and pod["priorityClassName"] == "system-node-critical"
    # A surge update: the node's old webhook serves until the new one answers (issue 36
    # finding 5); the new operator waits for the old one's node lock.
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    container, reader, _ = pod["containers"]
    assert container["name"] == "operator" and reader["name"] == "who"
    security = container["securityContext"]
    assert security["privileged"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert security["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["KUBE_AUDIT_HOST_ROOT"]["value"] == "/host"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # Health, readiness and metrics only on the node's loopback (the pod shares its network).
    assert container["livenessProbe"]["httpGet"] == {
        "host": "127.0.0.1",
        "path": "/healthz",
        "port": 10281,
    }
    assert container["readinessProbe"]["httpGet"] == {
        "host": "127.0.0.1",
        "path": "/readyz",
        "port": 10283,
    }
    assert env["KUBE_AUDIT_LIVENESS"]["value"] == "http://127.0.0.1:10281/healthz"
    assert env["KUBE_AUDIT_READINESS"]["value"] == "http://127.0.0.1:10283/readyz"
    assert env["KUBE_AUDIT_METRICS_ADDRESS"]["value"] == "127.0.0.1"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    host_paths = {
        volumes[n]["hostPath"]["path"]: m for n, m in mounts.items() if "hostPath" in volumes[n]
    }
    assert set(host_paths) == {
        "/etc/kubernetes/manifests",
        "/etc/kubernetes/kube-audit",
        "/var/log/kubernetes/audit",
        "/var/lib/kube-audit",
        "/var/lib/kubelet/config.yaml",
        "/etc/kubernetes/pki/ca.crt",
    }
    for path, mount in host_paths.items():
        assert mount["mountPath"] == "/host" + path
    assert host_paths["/var/lib/kubelet/config.yaml"]["readOnly"] is True
    assert volumes["static-pods"]["hostPath"]["type"] == "Directory"


@needs_kubectl
def test_admission_policy_builds() -> None:
    kinds = sorted(o["kind"] for o in _build("deploy/admission"))
    assert kinds == ["ConfigMap", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]


@needs_kubectl
def test_exec_guard_builds_for_the_kube_audit_namespace() -> None:
    docs = {o["kind"]: o for o in _build("deploy/exec-guard")}
    assert sorted(docs) == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    namespaces = docs["ValidatingAdmissionPolicy"]["spec"]["matchConstraints"]["namespaceSelector"]
    ours = yaml.safe_load((REPO / "deploy/namespace.yaml").read_text())["metadata"]["name"]
    assert namespaces["matchLabels"] == {"kubernetes.io/metadata.name": ours}
    ds = yaml.safe_load((REPO / "deploy/daemonset.yaml").read_text())
    containers = [c["name"] for c in ds["spec"]["template"]["spec"]["containers"]]
    assert "who" in containers, "the one container the guard lets people exec into"


def test_dockerfile_runs_the_daemonsets_entry_point() -> None:
    text = (REPO / "Dockerfile").read_text()
    entry = next(line for line in text.splitlines() if line.startswith("ENTRYPOINT"))
    entrypoint = json.loads(entry.split(None, 1)[1])
    ds = yaml.safe_load((REPO / "deploy/daemonset.yaml").read_text())
    command = ds["spec"]["template"]["spec"]["containers"][0]["command"]
    assert entrypoint == command[:1] == ["kube-audit"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kube-audit"] == "kube_audit.cli:main"
    assert build_parser().parse_args([*command[1:], "--node-name", "n"]).command == "operator"
    assert (REPO / ".dockerignore").is_file()


def test_the_dockerfile_describes_the_image_make_image_builds() -> None:
    """Two recipes for one image: people who build with Docker get what the tests ran."""
    docker = (REPO / "Dockerfile").read_text()
    script = (REPO / "image/build.sh").read_text()
    assert "FROM debian:bookworm-slim" in docker and "SUITE=bookworm" in script
    assert "VENV=/opt/venv" in script and "venv --without-pip /opt/venv" in docker
    assert "--config.entrypoint kube-audit --config.cmd operator" in script
    assert 'ENTRYPOINT ["kube-audit"]' in docker and 'CMD ["operator"]' in docker
    for setting in ("PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1", "kubernetes/aio",
                    "--invalidation-mode unchecked-hash"):  # fmt: skip
        assert setting in docker and setting in script, setting
    path = "PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert path in script and path.replace("$VENV", "/opt/venv") in docker


LUA = (REPO / "deploy/argocd/health.lua").read_text()


def _health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=True)
    table = _to_lua(lua, obj)
    result = lua.execute("local obj = ...\n" + LUA, table)
    return str(result["status"]), str(result["message"])


def _to_lua(lua: LuaRuntime, value: Any) -> Any:
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


def _cond(kind: str, status: str, message: str = "") -> dict[str, str]:
    return {"type": kind, "status": status, "reason": kind, "message": message}


@pytest.mark.parametrize(
    ("obj", "status"),
    [
        ({"metadata": {"generation": 1}}, "Progressing"),
        (
            {
                "metadata": {"generation": 2},
                "status": {"observedGeneration": 1, "conditions": [_cond("Ready", "True")]},
            },
            "Progressing",
        ),
        (
            {
                "metadata": {"generation": 1},
                "status": {
                    "observedGeneration": 1,
                    "conditions": [
                        _cond("Ready", "True", "live on all 3"),
                        _cond("Stalled", "False"),
                    ],
                },
            },
            "Healthy",
        ),
        (
            {
                "metadata": {"generation": 1},
                "status": {
                    "observedGeneration": 1,
                    "conditions": [
                        _cond("Ready", "False"),
                        _cond("Stalled", "True", "spec.groups[0]: refused"),
                    ],
                },
            },
            "Degraded",
        ),
        (
            {
                "metadata": {"generation": 1},
                "status": {
                    "observedGeneration": 1,
                    "conditions": [
                        _cond("Ready", "False"),
                        _cond("Reconciling", "True", "live on 1 of 3"),
                    ],
                },
            },
            "Progressing",
        ),
    ],
)
def test_argocd_health(obj: dict[str, Any], status: str) -> None:
    assert _health(obj)[0] == status


def test_argocd_health_message_carries_the_reason() -> None:
    obj = {
        "metadata": {"generation": 1},
        "status": {
            "observedGeneration": 1,
            "conditions": [_cond("Stalled", "True", "spec.groups[0]: refused")],
        },
    }
    assert _health(obj) == ("Degraded", "spec.groups[0]: refused")


def test_a_new_object_with_the_crds_status_default_is_progressing_in_argo_cd() -> None:
    crd = render_crd("AuditUser")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    default = crd["properties"]["status"]["default"]
    assert _health({"metadata": {"generation": 1}, "status": default}) == (
        "Progressing",
        "waiting for kube-audit to see it",
    )


def test_the_argocd_cm_patch_carries_the_health_check_as_shipped() -> None:
    """Pasted as is, the fragment in the docs had a placeholder and Argo showed Unknown."""
    patch = yaml.safe_load((REPO / "deploy/argocd/argocd-cm-patch.yaml").read_text())
    assert patch["kind"] == "ConfigMap" and patch["metadata"] == {
        "name": "argocd-cm",
        "namespace": "argocd",
        "labels": {"app.kubernetes.io/part-of": "argocd"},
    }
    for kind in ("AuditUser", "AuditPolicy"):
        assert patch["data"][f"resource.customizations.health.kube-audit.io_{kind}"] == LUA


FLUX = yaml.safe_load((REPO / "deploy/flux/health-check-exprs.yaml").read_text())


def _flux(kind: str, obj: dict[str, Any]) -> str:
    """Flux's order (RFC 0009, ``StatusEvaluator``): InProgress while ``status.observedGeneration``
    differs from the generation, then failed, then current; neither is InProgress. tests/gitops
    checks this stand-in against Flux's own evaluator."""
    [check] = [c for c in FLUX["healthCheckExprs"] if c["kind"] == kind]
    observed = (obj.get("status") or {}).get("observedGeneration")
    if observed is not None and observed != (obj.get("metadata") or {}).get("generation"):
        return "InProgress"
    env = celpy.Environment()
    activation = {k: celpy.json_to_cel(obj.get(k, {})) for k in ("metadata", "spec", "status")}
    for verdict in ("failed", "current"):
        program = env.program(env.compile(check[verdict]))
        if program.evaluate(activation):
            return "Failed" if verdict == "failed" else "Current"
    return "InProgress"


@pytest.mark.parametrize("kind", ["AuditUser", "AuditPolicy"])
def test_flux_health_check_exprs_on_every_state_the_operator_writes(kind: str) -> None:
    crd = render_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    new = {"metadata": {"generation": 1}, "status": crd["properties"]["status"]["default"]}
    assert _flux(kind, new) == "InProgress", "never Current before kube-audit judged it"

    def judged(generation: int, outcome: str, observed: int | None = None) -> dict[str, Any]:
        entries = {"cp-1": node_entry(generation=observed or generation, outcome=outcome,
                                      message="m", time="2026-12-03T00:00:00Z")}  # fmt: skip
        obj = {"metadata": {"generation": generation}, "status": {"nodes": entries}}
        return {**obj, "status": {**obj["status"], **compute_conditions(obj, ["cp-1"], "t")}}

    assert _flux(kind, judged(1, APPLIED)) == "Current"
    assert _flux(kind, judged(1, INVALID)) == "Failed"
    assert _flux(kind, judged(1, ROLLED_BACK)) == "Failed"
    assert _flux(kind, judged(1, PENDING)) == "InProgress"
    changed = judged(1, APPLIED)
    changed["metadata"]["generation"] = 2
    assert _flux(kind, changed) == "InProgress", "a new generation not judged yet"
    fixed = judged(1, INVALID)
    fixed["metadata"]["generation"] = 2
    assert _flux(kind, fixed) == "InProgress", (
        "an invalid object fixed by the user is not Failed for the generation before"
    )


@needs_kubectl
def test_who_cluster_execs_into_a_read_only_container_without_a_token(
    objects: list[dict[str, Any]],
) -> None:
    """Issue 20 item 6: an auditor's exec lands where only the audit folder is, read-only,
    with no ServiceAccount token and a memory limit of its own; the operator keeps its token
    through the same projected volume kubelet would have mounted."""
    pod = _one(objects, "DaemonSet")["spec"]["template"]
    assert pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "operator"
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    operator, reader, _ = spec["containers"]
    assert reader["command"] == ["kube-audit", "standby"]
    assert reader["volumeMounts"] == [
        {"name": "audit-log", "mountPath": "/host/var/log/kubernetes/audit", "readOnly": True}
    ]
    assert reader["resources"]["limits"]["memory"] == "256Mi"
    security = reader["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == [
        "ALL"
    ]
    assert security["allowPrivilegeEscalation"] is False and security["privileged"] is False
    token = {m["name"]: m for m in operator["volumeMounts"]}["kube-api-access"]
    assert token == {"name": "kube-api-access", "readOnly": True,
                     "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}  # fmt: skip
    volume = {v["name"]: v for v in spec["volumes"]}["kube-api-access"]["projected"]
    sources = {next(iter(s)): s for s in volume["sources"]}
    assert sources["serviceAccountToken"]["serviceAccountToken"]["path"] == "token"
    assert sources["configMap"]["configMap"]["name"] == "kube-root-ca.crt"
    assert volume["defaultMode"] == 0o644


def test_the_authn_webhook_runs_apart_with_read_only_mounts_and_no_token(
    objects: list[dict[str, Any]],
) -> None:
    """Issue 21: the webhook keeps answering when the operator crashes; it can write nothing on
    the host, holds no API credential, and reads the apiserver's client certificate, never
    its key; nor its own CA's key or any backup (issue 36)."""
    spec = _one(objects, "DaemonSet")["spec"]["template"]["spec"]
    webhook = {c["name"]: c for c in spec["containers"]}["authn-webhook"]
    command = webhook["command"]
    assert build_parser().parse_args(command[1:]).command == "authn-webhook"
    mounts = {m["mountPath"]: m for m in webhook["volumeMounts"]}
    assert all(m.get("readOnly") for m in mounts.values()), mounts
    # Issue 36 finding 2: its own folder only (snapshot, serving pair), not the state folder
    # with the backups and the CA's key.
    assert set(mounts) == {"/host/var/lib/kube-audit/authn-webhook",
                           "/host/etc/kubernetes/pki/ca.crt",
                           "/host/etc/kubernetes/pki/apiserver-kubelet-client.crt"}  # fmt: skip
    volumes = {v["name"]: v for v in spec["volumes"]}
    paths = {volumes[m["name"]]["hostPath"]["path"] for m in mounts.values()}
    assert not any(path.endswith(".key") for path in paths)
    assert "/var/lib/kube-audit" not in paths
    assert webhook["resources"]["limits"]["memory"]
    security = webhook["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == [
        "ALL"
    ]
    assert spec["automountServiceAccountToken"] is False
    assert not any("serviceaccount" in m for m in mounts)
    # Issue 36 finding 5: kubelet probes it (HTTPS, no client certificate: bodiless routes).
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        get = webhook[probe]["httpGet"]
        assert (get["path"], get["port"], get["scheme"], get["host"]) == (
            path, AUTHN_WEBHOOK_PORT, "HTTPS", "127.0.0.1")  # fmt: skip


@needs_kubectl
def test_the_victorialogs_component_adds_a_shipper_that_can_write_only_its_position() -> None:
    """Issue 35: one component, named in an overlay (examples/audit-store), adds the ship
    container: the audit log read-only, its position on the host (pod restarts and upgrades
    lose nothing), no API credential, the store's address from a ConfigMap."""
    built = _build("examples/audit-store")
    spec = _one(built, "DaemonSet")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    assert set(containers) == {"operator", "who", "authn-webhook", "ship"}
    ship = containers["ship"]
    (named,) = yaml.safe_load((REPO / "deploy" / "kustomization.yaml").read_text())["images"]
    assert (
        ship["image"]
        == containers["operator"]["image"]
        == (f"{named['newName']}:{named['newTag']}")
    ), "the same image, as the base names it"
    parsed = build_parser().parse_args(ship["command"][1:])
    assert parsed.command == "ship"
    mounts = {m["mountPath"]: m for m in ship["volumeMounts"]}
    assert mounts["/host/var/log/kubernetes/audit"]["readOnly"] is True
    writable = [m for m in mounts.values() if not m.get("readOnly")]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert [volumes[m["name"]]["hostPath"]["path"] for m in writable] == [
        "/var/lib/kube-audit/ship"
    ]
    assert [m["mountPath"] for m in writable] == ["/host/var/lib/kube-audit/ship"]
    env = {e["name"]: e for e in ship["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["KUBE_AUDIT_HOST_ROOT"]["value"] == "/host"
    store = _one(built, "ConfigMap", "kube-audit-store")
    for name, key in (("KUBE_AUDIT_STORE", "url"), ("KUBE_AUDIT_CLUSTER_NAME", "cluster-name")):
        ref = env[name]["valueFrom"]["configMapKeyRef"]
        assert (ref["name"], ref["key"]) == ("kube-audit-store", key) and key in store["data"]
    assert store["data"]["cluster-name"] == "prod-eu-1"
    security = ship["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["capabilities"]["drop"] == [
        "ALL"
    ]
    assert ship["resources"]["limits"]["memory"] and spec["automountServiceAccountToken"] is False
    assert not any("serviceaccount" in m for m in mounts)
    base = _one(_build("deploy"), "DaemonSet")["spec"]["template"]["spec"]
    assert "ship" not in {c["name"] for c in base["containers"]}, "shipping is optional"
