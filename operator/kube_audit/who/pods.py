"""``kube-audit who --cluster``: ask the kube-audit pod on every control-plane node, merge.

Each kube-apiserver writes its own audit log on its own node, so the whole answer is the union of
every node's. The question goes to each node's pod through pods/exec (``kube-audit who -o json``
in its ``who`` container, which mounts only the node's log folder, read-only, and holds no
ServiceAccount token): nothing listens on the network for it, and the apiserver checks the
caller's own right to exec there. A node that cannot be
asked is named, and the exit code says the answer is partial.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TextIO

from kube_audit.constants import WHO_CONTAINER
from kube_audit.core.audit_query import (
    NODE_HEADER,
    NODE_WIDE_HEADER,
    Query,
    merge_by_time,
    render_node_event,
    render_table,
    render_who_args,
    table_row,
)
from kube_audit.errors import ClusterError, PartialAnswer
from kube_audit.kube import KubeApi


@dataclass(frozen=True)
class Target:
    node: str
    pod: str | None
    why_not: str | None = None


def plan_targets(nodes: Sequence[str], pods: Sequence[Mapping[str, Any]]) -> list[Target]:
    """One pod per control-plane node: a running one, else the reason there is none."""
    by_node: dict[str, list[Mapping[str, Any]]] = {}
    for pod in pods:
        node = str((pod.get("spec") or {}).get("nodeName") or "")
        if node:
            by_node.setdefault(node, []).append(pod)
    targets = []
    for node in sorted(set(nodes) | set(by_node)):
        candidates = by_node.get(node, [])
        running = [
            p
            for p in candidates
            if (p.get("status") or {}).get("phase") == "Running"
            and not (p.get("metadata") or {}).get("deletionTimestamp")
        ]
        if running:
            newest = max(running, key=lambda p: str(p["metadata"].get("creationTimestamp") or ""))
            name = str(newest["metadata"]["name"])
            containers = (newest.get("spec") or {}).get("containers") or []
            if any(c.get("name") == WHO_CONTAINER for c in containers):
                targets.append(Target(node, name))
            else:  # never the operator's container, with its host write mounts and token
                why = (
                    f"its kube-audit pod {name} has no {WHO_CONTAINER!r} container (made "
                    "from an older DaemonSet: apply this release's install.yaml)"
                )
                targets.append(Target(node, None, why))
        elif candidates:
            pod = candidates[0]
            phase = (pod.get("status") or {}).get("phase") or "Unknown"
            name = pod["metadata"]["name"]
            targets.append(Target(node, None, f"its kube-audit pod {name} is {phase}"))
        else:
            targets.append(Target(node, None, "no kube-audit pod runs there"))
    return targets


def run_who_cluster(
    api: KubeApi,
    namespace: str,
    query: Query,
    *,
    output: str,
    out: TextIO,
    err: TextIO,
    timeout: float,
) -> int:
    targets = plan_targets(api.control_plane_nodes(), api.operator_pods(namespace))
    if not targets:
        raise ClusterError(
            f"no control-plane Nodes and no kube-audit Pods in namespace {namespace}: "
            "is kube-audit installed there (--operator-namespace)?"
        )
    argv = ["kube-audit", "who", "--output=json", *render_who_args(query)]
    askable = [t for t in targets if t.pod is not None]
    warnings = [f"{t.node}: not asked: {t.why_not}" for t in targets if t.pod is None]
    answers: dict[str, list[bytes]] = {}
    with ThreadPoolExecutor(max_workers=max(1, len(askable))) as pool:
        futures = {
            t: pool.submit(api.exec_in_pod, namespace, str(t.pod), WHO_CONTAINER, argv, timeout)
            for t in askable
        }
        for target, future in futures.items():
            result = future.result()
            for line in result.stderr.splitlines():
                if line.strip():
                    err.write(f"kube-audit: {target.node}: {line}\n")
            if result.failure is not None:
                warnings.append(f"{target.node}: not answered: {result.failure}")
            elif result.exit_code != 0:
                warnings.append(
                    f"{target.node}: not answered: kube-audit who in pod {target.pod} "
                    f"exited {result.exit_code}"
                )
            else:
                answers[target.node] = result.stdout.splitlines()
    merged = merge_by_time(answers)
    if output == "json":
        for node, event in merged:
            out.write(render_node_event(node, event).decode())
    elif merged:
        wide = output == "wide"
        rows = [[node, *table_row(event, wide)] for node, event in merged]
        out.write(render_table(rows, NODE_WIDE_HEADER if wide else NODE_HEADER))
    elif answers:
        err.write(f"no matching requests on {len(answers)} node(s)\n")
    for warning in warnings:
        err.write(f"kube-audit: warning: {warning}\n")
    if warnings:
        raise PartialAnswer(
            f"partial answer: {len(answers)} of {len(targets)} control-plane node(s) answered"
        )
    return 0
