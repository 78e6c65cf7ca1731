"""``kube-audit node plan|apply|rollback|uninstall``: the node agent on this host."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kube_audit.agent.apply import apply_node, plan_node
from kube_audit.agent.health import HealthCheck
from kube_audit.agent.layout import HostLayout
from kube_audit.agent.node import health_check
from kube_audit.agent.records import NodeResult
from kube_audit.agent.rollback import rollback_node
from kube_audit.agent.uninstall import uninstall_node
from kube_audit.cli.common import (
    guard_flags,
    host_flags,
    identity_flags,
    input_flags,
    rotation_flags,
    settings_from_args,
    valid_desired,
)
from kube_audit.errors import InvalidInput


def _layout(args: argparse.Namespace) -> HostLayout:
    return HostLayout.discover(Path(args.host_root), settings_from_args(args), args.kubelet_config)


def _health(args: argparse.Namespace, layout: HostLayout) -> HealthCheck | None:
    return health_check(layout, url=args.health_url, timeout=args.timeout, no_wait=args.no_wait)


def _report(result: NodeResult) -> int:
    print(result.message)
    return 0


PLAN_CHANGES = 1
PLAN_INVALID = 2


def cmd_plan(args: argparse.Namespace) -> int:
    """Exits as ``kubectl diff`` does, so scripts and CI can branch on it: 0 no changes,
    1 changes, more than 1 an error (an invalid input is 2 here, not the usual 1)."""
    try:
        desired = valid_desired(args, settings_from_args(args))
    except InvalidInput as error:
        error.exit_code = PLAN_INVALID
        raise
    layout = _layout(args)
    diff = plan_node(layout, desired)
    print(diff if diff else "no changes: the node already runs this configuration", end="")
    if diff:
        print(f"(static pod folder: {layout.static_pod_dir})")
        return PLAN_CHANGES
    print()
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    desired = valid_desired(args, settings_from_args(args))
    layout = _layout(args)
    return _report(apply_node(layout, desired, _health(args, layout), retry_failed=True))


def cmd_rollback(args: argparse.Namespace) -> int:
    layout = _layout(args)
    return _report(
        rollback_node(layout, _health(args, layout), allow_image_change=args.allow_image_change)
    )


def cmd_uninstall(args: argparse.Namespace) -> int:
    layout = _layout(args)
    return _report(uninstall_node(layout, _health(args, layout)))


def _wait_flags() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--health-url",
        metavar="URL",
        help="readiness URL (default: https://ADVERTISE-ADDRESS:PORT/readyz of the manifest)",
    )
    parent.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        metavar="SECONDS",
        help="how long to wait for the new apiserver (default 180)",
    )
    parent.add_argument(
        "--no-wait", action="store_true", help="do not wait for the new apiserver to become ready"
    )
    return parent


def add_parsers(sub: Any) -> None:
    node = sub.add_parser("node", help="apply to this control-plane node's host").add_subparsers(
        dest="node_command", required=True, metavar="COMMAND"
    )
    host = host_flags(from_env=False)
    inputs = [
        input_flags(),
        guard_flags(),
        rotation_flags(from_env=False),
        identity_flags(from_env=False),
    ]
    wait = _wait_flags()
    commands: list[tuple[str, Any, str, list[argparse.ArgumentParser]]] = [
        (
            "plan",
            cmd_plan,
            "show what apply would change (tokens as fingerprints); exits as kubectl diff: "
            "0 no changes, 1 changes, 2 or more an error",
            inputs,
        ),
        ("apply", cmd_apply, "apply the objects, wait for the new apiserver", [*inputs, wait]),
        ("rollback", cmd_rollback, "go back to the last good state before this one", [wait]),
        ("uninstall", cmd_uninstall, "restore kubeadm's manifest; keep audit logs", [wait]),
    ]
    for name, func, text, parents in commands:
        cmd = node.add_parser(name, parents=[host, *parents], help=text, description=text)
        if name == "rollback":
            cmd.add_argument(
                "--allow-image-change",
                action="store_true",
                help="allow restoring a backup whose kube-apiserver image differs from the "
                "running one (taken before a kubeadm upgrade: it would change the version)",
            )
        cmd.set_defaults(func=func, writes=name != "plan")
