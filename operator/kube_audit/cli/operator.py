"""``kube-audit operator``: the DaemonSet's process. Every flag falls back to an environment
variable (the DaemonSet sets them); defaults come from ``OperatorConfig``."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from kube_audit.cli.common import (
    cluster_flags,
    guard_flags,
    host_flags,
    identity_flags,
    rotation_flags,
    settings_from_args,
)
from kube_audit.cli.env import env_bool, env_float, env_int, env_str
from kube_audit.controller.config import OperatorConfig
from kube_audit.errors import InvalidInput, Problem

SECONDS = (
    "debounce",
    "identity_debounce",
    "max_debounce",
    "min_ready",
    "resync",
    "snapshot_stale_after",
    "timeout",
)


def cmd_operator(args: argparse.Namespace) -> int:
    # Imported here: kopf and the Kubernetes client take a second to import, and only the
    # operator needs them, not render or node.
    from kube_audit.controller import main as operator_main  # noqa: PLC0415
    from kube_audit.kube import KubeApi, load_api_client  # noqa: PLC0415

    if not args.node_name:
        raise InvalidInput([Problem("operator", "--node-name", "is required (or set NODE_NAME)")])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    config = OperatorConfig(
        node_name=args.node_name,
        host_root=Path(args.host_root),
        kubelet_config=args.kubelet_config,
        # Token Secrets live where the operator is installed (a Role there grants writing).
        settings=replace(settings_from_args(args), token_namespace=args.namespace),
        namespace=args.namespace,
        health_url=args.health_url,
        no_wait=args.no_wait,
        **{name: getattr(args, name) for name in SECONDS},
    )
    api = KubeApi(load_api_client(args.kubeconfig, args.context))
    return operator_main.main(
        config, api, (args.metrics_address, args.metrics_port), args.liveness, args.readiness
    )


def _seconds(cmd: argparse.ArgumentParser, name: str, env: str, text: str) -> None:
    default = float(OperatorConfig.__dataclass_fields__[name].default)  # type: ignore[arg-type]
    cmd.add_argument(
        f"--{name.replace('_', '-')}",
        type=float,
        default=env_float(env, default),
        metavar="SECONDS",
        help=f"{text} (default {default:g}, or ${env})",
    )


def add_parsers(sub: Any) -> None:
    cmd = sub.add_parser(
        "operator",
        parents=[
            host_flags(from_env=True),
            cluster_flags(),
            guard_flags(),
            rotation_flags(True),
            identity_flags(True),
        ],
        help="run the operator (the DaemonSet's process)",
        description="Watch AuditUser and AuditPolicy objects and apply them to this node. "
        "Every flag falls back to an environment variable, named in its help.",
    )
    cmd.add_argument(
        "--node-name", default=env_str("NODE_NAME", ""), help="this node (default $NODE_NAME)"
    )
    cmd.add_argument(
        "--namespace",
        default=env_str("POD_NAMESPACE", "kube-audit"),
        help="where kube-audit is installed: token Secrets, Leases, node records "
        "(default kube-audit, or $POD_NAMESPACE)",
    )
    _seconds(cmd, "debounce", "KUBE_AUDIT_DEBOUNCE", "quiet time before applying a burst")
    _seconds(
        cmd,
        "identity_debounce",
        "KUBE_AUDIT_IDENTITY_DEBOUNCE",
        "webhook mode: quiet time before applying a burst of only AuditUser and token Secret "
        "changes (they restart nothing)",
    )
    _seconds(
        cmd, "max_debounce", "KUBE_AUDIT_MAX_DEBOUNCE", "the longest a burst may delay applying"
    )
    _seconds(
        cmd,
        "min_ready",
        "KUBE_AUDIT_MIN_READY",
        "after a restart, how long the new apiserver must be ready before the next node "
        "restarts its own (at least your load balancer's time to mark a server healthy)",
    )
    _seconds(cmd, "resync", "KUBE_AUDIT_RESYNC", "re-check the host this often (drift repair)")
    _seconds(
        cmd,
        "snapshot_stale_after",
        "KUBE_AUDIT_SNAPSHOT_STALE_AFTER",
        "webhook mode: a node whose operator has not confirmed its identity snapshot for this "
        "long makes every AuditUser not Ready (reason SnapshotStale) with a Warning Event on "
        "the Node; keep it above the resync",
    )
    _seconds(
        cmd, "timeout", "KUBE_AUDIT_TIMEOUT", "how long to wait for a new apiserver to be ready"
    )
    cmd.add_argument(
        "--health-url",
        default=env_str("KUBE_AUDIT_HEALTH_URL", "") or None,
        metavar="URL",
        help="readiness URL of the local apiserver (default: https://ADVERTISE-ADDRESS:PORT/"
        "readyz of its manifest, or $KUBE_AUDIT_HEALTH_URL)",
    )
    cmd.add_argument(
        "--no-wait",
        action="store_true",
        default=env_bool("KUBE_AUDIT_NO_WAIT"),
        help="do not wait for the new apiserver (tests, demos; default off, or "
        "$KUBE_AUDIT_NO_WAIT=1/true/yes)",
    )
    cmd.add_argument(
        "--metrics-port",
        type=int,
        default=env_int("KUBE_AUDIT_METRICS_PORT", 9090),
        help="Prometheus metrics port, 0 for none (default 9090, or $KUBE_AUDIT_METRICS_PORT)",
    )
    cmd.add_argument(
        "--metrics-address",
        default=env_str("KUBE_AUDIT_METRICS_ADDRESS", "127.0.0.1"),
        help="address the metrics listen on; the pod shares the node's network, so the "
        "default keeps them on the node (default 127.0.0.1, or $KUBE_AUDIT_METRICS_ADDRESS)",
    )
    cmd.add_argument(
        "--liveness",
        default=env_str("KUBE_AUDIT_LIVENESS", "http://127.0.0.1:8080/healthz"),
        help="kopf's liveness endpoint, empty for none (default http://127.0.0.1:8080/healthz, "
        "or $KUBE_AUDIT_LIVENESS)",
    )
    cmd.add_argument(
        "--readiness",
        default=env_str("KUBE_AUDIT_READINESS", "http://127.0.0.1:8081/readyz"),
        help="200 once the node is settled, for the DaemonSet's readinessProbe (default "
        "http://127.0.0.1:8081/readyz, or $KUBE_AUDIT_READINESS)",
    )
    cmd.set_defaults(func=cmd_operator)
