"""``kube-audit ship``: this node's audit log to the audit store (the ``ship`` container)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from kube_audit.agent.layout import STATE_DIR
from kube_audit.agent.ship import Shipper, serve_metrics
from kube_audit.agent.succession import wait_for_node
from kube_audit.cli.common import store_access
from kube_audit.cli.env import env_str
from kube_audit.constants import SHIP_LOCK, SHIP_METRICS_PORT
from kube_audit.core.audit_query import parse_duration
from kube_audit.core.settings import Settings
from kube_audit.errors import InvalidInput, Problem
from kube_audit.logstore import LogStore

log = logging.getLogger(__name__)


def _seconds(flag: str, value: str, problems: list[Problem]) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as error:
        problems.append(Problem("ship", flag, str(error)))
        return 0.0
    if seconds <= 0:
        problems.append(Problem("ship", flag, f"{value!r}: must be more than 0"))
    return seconds


def cmd_ship(args: argparse.Namespace) -> int:
    problems: list[Problem] = []
    if not args.store:
        problems.append(Problem("ship", "--store", "required (or $KUBE_AUDIT_STORE)"))
    if not args.node:
        problems.append(Problem("ship", "--node", "required (or $NODE_NAME, the downward API)"))
    for flag, value in (("--node", args.node or ""), ("--cluster-name", args.cluster_name)):
        if any(c in value for c in ',="\n') or value != value.strip():
            problems.append(
                Problem("ship", flag, f"{value!r}: no commas, '=', quotes or outer spaces")
            )
    if args.store_token_file and args.store_user:
        problems.append(
            Problem("ship", "--store-user", "give either --store-user or --store-token-file")
        )
    keep_after = _seconds("--keep-after", args.keep_after, problems)
    interval = _seconds("--interval", args.interval, problems)
    timeout = _seconds("--request-timeout", args.request_timeout, problems)
    if problems:
        raise InvalidInput(problems)
    settings = Settings()
    root = Path(args.host_root)
    log_dir = Path(args.log_dir) if args.log_dir else root / settings.log_dir.lstrip("/")
    access = store_access(args, timeout, "ship")
    state_dir = Path(args.state_dir) if args.state_dir else root / STATE_DIR.lstrip("/") / "ship"
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        del signum, frame
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The node's previous ship container (a surge update) keeps the positions until it ends.
    metrics_at = (args.metrics_address, args.metrics_port)
    if wait_for_node(state_dir / SHIP_LOCK, [metrics_at], "ship", stop.wait) is None:
        return 0
    shipper = Shipper(
        folder=log_dir,
        log_file=settings.log_file,
        state_dir=state_dir,
        store=LogStore(access),
        node=args.node,
        cluster=args.cluster_name,
        keep_after=keep_after,
    )
    if args.metrics_port:
        serve_metrics(shipper.metrics, args.metrics_address, args.metrics_port)
    log.info("shipping %s to %s as node %s", log_dir, args.store, args.node)
    shipper.run(stop.is_set, stop.wait, interval)
    return 0


def add_parsers(sub: Any) -> None:
    cmd = sub.add_parser(
        "ship",
        help="send this node's audit log to the audit store (VictoriaLogs), nothing lost",
        description="Follow this node's audit log (rotations and gzip included) and send each "
        "event to VictoriaLogs' /insert/jsonline, with the node and cluster as stream fields. "
        "The position per file is kept under --state-dir; after a restart or a store failure, "
        "the last --keep-after of acknowledged events is sent again (who counts them once).",
    )
    cmd.add_argument(
        "--store",
        metavar="URL",
        default=env_str("KUBE_AUDIT_STORE", "") or None,
        help="VictoriaLogs' HTTP address: a single node or vlinsert ($KUBE_AUDIT_STORE)",
    )
    cmd.add_argument("--store-ca", metavar="FILE", help="the CA bundle of an https store")
    cmd.add_argument("--store-token-file", metavar="FILE", help="send the bearer token it holds")
    cmd.add_argument(
        "--store-user", metavar="USER", help="basic auth; password from $KUBE_AUDIT_STORE_PASSWORD"
    )
    cmd.add_argument(
        "--node",
        default=env_str("NODE_NAME", "") or None,
        help="the node name on every event ($NODE_NAME)",
    )
    cmd.add_argument(
        "--cluster-name",
        default=env_str("KUBE_AUDIT_CLUSTER_NAME", ""),
        help="a cluster name on every event, for a store several clusters share "
        "($KUBE_AUDIT_CLUSTER_NAME)",
    )
    cmd.add_argument(
        "--host-root",
        default=env_str("KUBE_AUDIT_HOST_ROOT", "/"),
        metavar="ROOT",
        help="where the host's / is mounted (default /, or $KUBE_AUDIT_HOST_ROOT)",
    )
    cmd.add_argument("--log-dir", help=f"the audit log folder (default ROOT{Settings().log_dir})")
    cmd.add_argument("--state-dir", help=f"where positions are kept (default ROOT{STATE_DIR}/ship)")
    cmd.add_argument(
        "--keep-after",
        default=env_str("KUBE_AUDIT_SHIP_KEEP_AFTER", "10s"),
        metavar="DURATION",
        help="how long after the store acknowledges events they count as kept: more than the "
        "store's -inmemoryDataFlushInterval (5s by default) (default 10s, or "
        "$KUBE_AUDIT_SHIP_KEEP_AFTER)",
    )
    cmd.add_argument("--interval", default="1s", metavar="DURATION", help="how often to look")
    cmd.add_argument("--request-timeout", default="30s", metavar="DURATION", help="per batch sent")
    cmd.add_argument("--metrics-address", default="127.0.0.1")
    cmd.add_argument(
        "--metrics-port",
        type=int,
        default=SHIP_METRICS_PORT,
        help=f"Prometheus metrics (default {SHIP_METRICS_PORT}; 0: none)",
    )
    cmd.set_defaults(func=cmd_ship)
