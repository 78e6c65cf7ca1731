"""Three control-plane nodes on one machine: real kubeadm, one shared etcd, HAProxy in front,
an operator per node talking through the load balancer, on the kubelet stand-in: ``who
--cluster`` finds a request served by each apiserver, an operator killed or deleted mid-wait
leaves its node verified, and a kubeadm rewrite of another node mid-rollout is not clobbered.

A change rolling over the nodes one at a time and a config refused on the first node only run
on three real kubelets (tests/realnode/test_ha.py). These stay here for time: each kills an
operator or rewrites a manifest at a precise moment of a rollout, which the stand-in's record
of every apiserver stop and start lets the test catch; on the real kubelet every apiserver
restart costs its fixed back-off and a slower start (about 55 s a node there against 34 s
here, measured in CI), so this file's four rollouts, 9.3 minutes here (CI, December 2026,
teardown included), would add well over that to the real node worker, already the longer one
(44 of `.ci/run`'s 47 minutes).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.controlplane.cluster import (
    ROOT,
    ControlPlane,
    LoadBalancer,
    Node,
    OperatorProcess,
    boot_ha,
    control_plane,
    install_operator,
    require_tier,
    run_operator_pods,
    wait_for,
)
from tests.controlplane.test_job import KUBE_AUDIT, USERS, is_ready, token_of, whoami


@dataclass
class HA:
    cp: ControlPlane
    nodes: list[Node]
    lb: LoadBalancer
    operators: dict[str, OperatorProcess]

    def marks(self) -> dict[str, int]:
        return {n.name: len(n.records()) for n in self.nodes}


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HA]:
    require_tier()
    if shutil.which("haproxy") is None:
        pytest.skip("needs HAProxy (Debian package haproxy; `make test` installs it as root)")
    with control_plane(tmp_path_factory.mktemp("ha")) as cp:
        nodes, lb = boot_ha(cp)
        kubeconfig = install_operator(cp)
        config = kubeconfig.read_text().replace(nodes[0].url, lb.url)
        kubeconfig.write_text(config)
        operators = {}
        for node in nodes:
            operators[node.name] = OperatorProcess(
                # HAProxy marks a server up after rise 2 x inter 1 s.
                cp,
                node,
                kubeconfig,
                env={"KUBE_AUDIT_TIMEOUT": "60", "KUBE_AUDIT_MIN_READY": "3"},
            )
            operators[node.name].start()
        yield HA(cp, nodes, lb, operators)


def down_windows(node: Node, since: int) -> list[tuple[str, str]]:
    """(stopping, ready) of each kube-apiserver restart on ``node`` after record ``since``."""
    windows, start = [], None
    for event in node.records()[since:]:
        if not event.get("pod", "").startswith("kube-apiserver-"):
            continue
        if event["event"] == "stopping" and start is None:
            start = event["time"]
        elif event["event"] == "ready" and start is not None:
            windows.append((start, event["time"]))
            start = None
    if start is not None:
        windows.append((start, "9999"))
    return windows


def assert_one_at_a_time(ha: HA, marks: dict[str, int]) -> list[tuple[str, str, str]]:
    """No two apiservers down at once; returns (stopping, ready, node) in time order."""
    spans = sorted((a, b, n.name) for n in ha.nodes for a, b in down_windows(n, marks[n.name]))
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        assert end < start, f"{first} and {second} were down at the same time: {spans}"
    return spans


def token_works_everywhere(ha: HA, user: str) -> bool:
    token = token_of(ha.cp, user)
    return all(isinstance(whoami(ha.cp, token, server=n.url), dict) for n in ha.nodes)


def test_who_in_cluster_mode_finds_a_request_served_by_each_apiserver(ha: HA) -> None:
    """``kube-audit who --cluster`` from the admin's machine asks the kube-audit pod on every
    node through the load balancer (pods/exec; the stand-in serves kubelet's exec API) and
    merges the answers: a request sent to each apiserver directly is found, with its node. A
    node whose pod is not running is named and the exit code says the answer is partial."""
    pods = run_operator_pods(ha.cp, ha.nodes)
    if ha.cp.kubectl("get", "auditpolicy", "developers", check=False).returncode != 0:
        ha.cp.kubectl("apply", "-f", str(ROOT / "examples/auditpolicy-starter.yaml"))
    wait_for(
        "the starter policy live everywhere",
        lambda: is_ready(ha.cp, "auditpolicies", "developers"),
        600,
        2,
    )
    for node in ha.nodes:
        ha.cp.kubectl("--server", node.url, "create", "configmap", f"who-{node.name}")
    names = ",".join(f"who-{n.name}" for n in ha.nodes)
    admin = str(ha.nodes[0].admin_kubeconfig)  # the load balancer's address, as users have it

    def ask(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [KUBE_AUDIT, "who", "--cluster", "--kubeconfig", admin, "--name", names, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def all_found() -> list[dict[str, Any]] | None:
        result = ask("--verb", "create", "-o", "json")
        assert result.returncode == 0, result.stderr
        events = [json.loads(line) for line in result.stdout.splitlines()]
        return events if len(events) == len(ha.nodes) else None

    events = wait_for("a create found on each node", all_found, 60, 2)
    for event in events:
        node = event["annotations"]["kube-audit.io/node"]
        assert event["objectRef"]["name"] == f"who-{node}", event
        assert event["user"]["username"] == "kubernetes-admin", "the starter logs the admin"
    table = ask("--verb", "create")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:2] == ["NODE", "TIME"], lines
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(pods), lines
    assert all(any(r["event"] == "exec" for r in n.records()) for n in ha.nodes), (
        "each node's stand-in served an exec"
    )

    last = ha.nodes[-1]
    ha.cp.kubectl(
        "patch", "pod", pods[last.name], "-n", "kube-audit", "--subresource=status",
        "--type=merge", "-p", '{"status":{"phase":"Pending"}}',
    )  # fmt: skip
    try:
        partial = ask("--verb", "create")
    finally:
        run_operator_pods(ha.cp, ha.nodes)
    assert partial.returncode == 7, partial
    assert f"{last.name}: not asked: its kube-audit pod {pods[last.name]} is Pending" in (
        partial.stderr
    )
    assert "partial answer: 2 of 3" in partial.stderr
    assert len(partial.stdout.splitlines()) == 1 + len(ha.nodes) - 1, partial.stdout


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_an_operator_stopped_mid_wait_leaves_its_node_verified(ha: HA, how: signal.Signals) -> None:
    """Killed (or deleted: SIGTERM) while its node's new apiserver starts; the DaemonSet's
    next pod on that node finishes the wait and the rollout goes on."""
    marks = ha.marks()
    name = f"ha-{how.name.lower()}"
    ha.cp.apply([{"apiVersion": USERS, "kind": "AuditUser", "metadata": {"name": name}}])

    def restarting() -> Node | None:
        for node in ha.nodes:
            if node.apiserver_events("stopping", since=marks[node.name]):
                return node
        return None

    node = wait_for("a node to start its restart", restarting, 300, 0.2)
    operator = ha.operators[node.name]
    assert operator.process is not None
    os.killpg(operator.process.pid, how)
    operator.process.wait(200)  # an apply in progress finishes its wait first
    ha.cp.processes.remove(operator.process)
    operator.process = None
    operator.start()
    wait_for(f"{name}'s token on every node", lambda: token_works_everywhere(ha, name), 600, 2)
    wait_for(f"{name} Ready", lambda: is_ready(ha.cp, "auditusers", name), 180, 1)
    state = json.loads((node.tree / "var/lib/kube-audit/state.json").read_text())
    assert state["pending"] is None, state
    assert_one_at_a_time(ha, marks)


def test_a_kubeadm_rewrite_of_another_node_mid_rollout_is_not_clobbered(ha: HA) -> None:
    """While one node restarts into a change, kubeadm rewrites another node's manifest (an
    upgrade: our flags gone, a new flag of its own). Nothing is clobbered: that node gets the
    change on top of kubeadm's manifest when its turn comes, and never again runs a manifest
    older than the one kubeadm wrote."""
    marks = ha.marks()
    ha.cp.apply([{"apiVersion": USERS, "kind": "AuditUser", "metadata": {"name": "ha-upgrade"}}])

    def restarting() -> Node | None:
        for node in ha.nodes:
            if node.apiserver_events("stopping", since=marks[node.name]):
                return node
        return None

    busy = wait_for("a node to start its restart", restarting, 300, 0.2)
    other = next(
        n
        for n in ha.nodes
        if n is not busy and not n.apiserver_events("stopping", since=marks[n.name])
    )
    log_start = len(ha.operators[other.name].log.read_text())
    init, cluster = yaml.safe_load_all(other.kubeadm_config.read_text())
    cluster["apiServer"]["extraArgs"].append({"name": "profiling", "value": "false"})
    other.kubeadm_config.write_text(yaml.safe_dump_all([init, cluster], sort_keys=False))
    seen: list[bytes] = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            seen.append(other.manifest.read_bytes())
            time.sleep(0.05)

    rewrite = len(other.records())
    other.kubeadm(
        "init", "phase", "control-plane", "apiserver", "--config", str(other.kubeadm_config)
    )
    assert b"--profiling=false" in other.manifest.read_bytes()
    assert b"--token-auth-file" not in other.manifest.read_bytes(), "kubeadm dropped our flags"
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        wait_for(
            "ha-upgrade's token on every node",
            lambda: token_works_everywhere(ha, "ha-upgrade"),
            900,
            2,
        )
        wait_for("ha-upgrade Ready", lambda: is_ready(ha.cp, "auditusers", "ha-upgrade"), 180, 1)
    finally:
        watching.set()
        watcher.join(5)
    final = other.manifest.read_bytes()
    assert b"--profiling=false" in final and b"--token-auth-file" in final
    assert all(b"--profiling=false" in version for version in seen), (
        "a manifest older than kubeadm's was written back"
    )
    assert "rolled back" not in ha.operators[other.name].log.read_text()[log_start:]
    # kubeadm's rewrite restarted that node's apiserver itself, whoever was down: only the
    # restarts kube-audit caused must be one at a time.
    kubeadm_ready = next(
        i
        for i, event in enumerate(other.records())
        if i >= rewrite and event["event"] == "ready" and event["pod"].startswith("kube-apiserver")
    )
    assert_one_at_a_time(ha, {**marks, other.name: kubeadm_ready + 1})
