"""``kube-audit who``: who did it, from this node's audit log or (``--cluster``) every
control-plane node's."""

from __future__ import annotations

import argparse
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kube_audit.cli.common import cluster_flags, store_access
from kube_audit.cli.env import env_str
from kube_audit.constants import DEFAULT_INSTALL_NAMESPACE
from kube_audit.core.audit_query import (
    AUDIT_VERBS,
    Query,
    parse_duration,
    parse_status,
    parse_time,
    parse_verb,
    resource_plural,
)
from kube_audit.core.settings import Settings
from kube_audit.errors import InvalidInput, Problem
from kube_audit.who.files import run_who

DEFAULT_LOG_DIR = Settings().log_dir


def _values(given: list[str] | None) -> list[str]:
    """Repeated flags and comma lists alike: ``--verb create,delete`` = two ``--verb``."""
    return [v.strip() for item in given or () for v in item.split(",") if v.strip()]


def cmd_who(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    problems = []

    def convert(flag: str, values: list[str], func: Any) -> frozenset[str]:
        out = set()
        for value in values:
            try:
                out.add(func(value))
            except ValueError as error:
                problems.append(Problem("who", flag, str(error)))
        return frozenset(out)

    since = next(iter(convert("--since", [args.since] if args.since else [], _at(now))), None)
    until = next(iter(convert("--until", [args.until] if args.until else [], _at(now))), None)
    if since is not None and until is not None and since >= until:
        problems.append(
            Problem("who", "--since", f"{args.since!r} is not before --until {args.until!r}")
        )
    query = Query(
        users=frozenset(_values(args.user)),
        groups=frozenset(_values(args.group)),
        verbs=convert("--verb", _values(args.verb), parse_verb),
        resources=frozenset(resource_plural(r) for r in _values(args.resource)),
        namespaces=frozenset(_values(args.namespace)),
        names=frozenset(_values(args.name)),
        statuses=convert("--status", _values(args.status), parse_status),
        since=since,
        until=until,
    )
    if args.cluster and args.path:
        problems.append(Problem("who", "path", "--cluster asks every node's pod; give no paths"))
    if args.store and (args.path or args.cluster):
        what = "paths" if args.path else "--cluster"
        problems.append(Problem("who", "--store", f"asks the store alone; give no {what}"))
    if not args.cluster:
        for flag in ("kubeconfig", "context", "operator_namespace", "pods"):
            if getattr(args, flag) not in (None, False):
                name = "--" + flag.replace("_", "-")
                problems.append(Problem("who", name, "only used with --cluster"))
    if not args.cluster and not args.store and args.request_timeout is not None:
        problems.append(Problem("who", "--request-timeout", "only used with --cluster or --store"))
    if not args.store:
        for flag in ("store_ca", "store_token_file", "store_user"):
            if getattr(args, flag) is not None:
                name = "--" + flag.replace("_", "-")
                problems.append(Problem("who", name, "only used with --store"))
    if args.store_token_file and args.store_user:
        problems.append(
            Problem("who", "--store-user", "give either --store-user or --store-token-file")
        )
    timeout = _request_timeout(args.request_timeout, problems)
    if problems:
        raise InvalidInput(problems)
    if args.store:
        from kube_audit.logstore import LogStore  # noqa: PLC0415
        from kube_audit.who.store import run_who_store  # noqa: PLC0415

        return run_who_store(
            LogStore(store_access(args, timeout, "who")),
            query,
            output=args.output,
            out=sys.stdout,
            err=sys.stderr,
            now=now,
        )
    if args.cluster:
        from kube_audit.kube import KubeApi, load_api_client  # noqa: PLC0415 - slow import
        from kube_audit.who.pods import run_who_cluster  # noqa: PLC0415

        api = KubeApi(load_api_client(args.kubeconfig, args.context))
        namespace = args.operator_namespace or env_str("POD_NAMESPACE", DEFAULT_INSTALL_NAMESPACE)
        if not args.pods:
            from kube_audit.who.store import run_who_store  # noqa: PLC0415

            store = _installed_store(api, namespace, timeout)
            if store is not None:
                sys.stderr.write(f"kube-audit: asking the audit store, {store.url}\n")
                return run_who_store(
                    store, query, output=args.output, out=sys.stdout, err=sys.stderr, now=now
                )
        return run_who_cluster(
            api,
            namespace,
            query,
            output=args.output,
            out=sys.stdout,
            err=sys.stderr,
            timeout=timeout,
        )
    settings = Settings()
    paths = args.path or [str(Path(args.host_root) / settings.log_dir.lstrip("/"))]
    return run_who(
        paths, query, output=args.output, out=sys.stdout, err=sys.stderr, log_file=settings.log_file
    )


def _installed_store(api: Any, namespace: str, timeout: float) -> Any:
    """The store the install names (the VictoriaLogs component's ConfigMap), as ``who``
    reaches it: a Service through the API server's proxy, another address directly; None
    without one, or when the caller may not read the ConfigMap or ask through the proxy
    (then the pods answer, and the caller is told why)."""
    from kube_audit.core.logsql import parse_service_url  # noqa: PLC0415
    from kube_audit.errors import ClusterError  # noqa: PLC0415
    from kube_audit.logstore import LogStore, StoreAccess  # noqa: PLC0415
    from kube_audit.who.store import ProxiedStore  # noqa: PLC0415

    try:
        config = api.audit_store_config(namespace)
    except ClusterError as error:
        if error.status != 403:
            raise
        sys.stderr.write(f"kube-audit: {error}; asking the nodes' pods\n")
        return None
    url = (config or {}).get("query-url") or (config or {}).get("url") or ""
    if not url:
        return None
    address = parse_service_url(url)
    if address is not None:
        proxied = ProxiedStore(api, address, timeout)
        why = proxied.refusal()
        if why is not None:
            sys.stderr.write(f"kube-audit: {why}; asking the nodes' pods\n")
            return None
        return proxied
    return LogStore(StoreAccess(url=url, timeout=timeout))


def _request_timeout(given: str | None, problems: list[Problem]) -> float:
    """The flag, else $KUBE_AUDIT_REQUEST_TIMEOUT, else 5 minutes; durations as kubectl takes
    them. Unlike kubectl, 0 (no timeout) is refused: a node that never answers must be named."""
    flag = "--request-timeout" if given is not None else "KUBE_AUDIT_REQUEST_TIMEOUT"
    value = given if given is not None else env_str("KUBE_AUDIT_REQUEST_TIMEOUT", "5m")
    try:
        seconds = parse_duration(value)
    except ValueError as error:
        problems.append(Problem("who", flag, str(error)))
        return 0.0
    if seconds <= 0:
        problems.append(
            Problem("who", flag, f"{value!r}: must be more than 0 (a node that never answers)")
        )
    return seconds


def cmd_standby(args: argparse.Namespace) -> int:
    """The ``who`` container's main process: nothing but waiting, so ``who --cluster`` has a
    running container to exec into. Ends at once on SIGTERM: as PID 1 a signal without a
    handler is ignored, and the pod would wait out its long grace period. Blocked and waited
    for, so one arriving at any moment is never missed."""
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    signal.sigwait(signals)
    return 0


def _at(now: datetime) -> Any:
    return lambda value: parse_time(value, now)


def add_parsers(sub: Any) -> None:
    cmd = sub.add_parser(
        "who",
        parents=[cluster_flags()],
        help="who did it? search the audit log",
        description="Search kube-apiserver audit logs: one line per request, newest last. "
        "Filters combine with AND; a repeated filter (or a comma list) matches any of its values. "
        "On a node (or in its kube-audit pod) it reads that node's log; with --cluster, from "
        "anywhere kubectl works, it asks the kube-audit pod on every control-plane node "
        "(pods/exec) and merges their answers with a NODE column, or, when the install names an "
        "audit store, asks the store.",
    )
    cmd.add_argument(
        "path",
        nargs="*",
        help=f"audit log files or folders (default: ROOT{DEFAULT_LOG_DIR}, the folder "
        "kube-audit points --audit-log-path at)",
    )
    cmd.add_argument(
        "--host-root",
        default=env_str("KUBE_AUDIT_HOST_ROOT", "/"),
        metavar="ROOT",
        help="where the host's / is mounted (default /, or $KUBE_AUDIT_HOST_ROOT)",
    )
    cmd.add_argument(
        "--cluster",
        action="store_true",
        help="ask every control-plane node's kube-audit pod through the API (its read-only "
        "who container; needs list on Nodes and Pods, create on pods/exec in the operator's "
        "namespace); exits 7 with a warning per node when some node could not be asked",
    )
    cmd.add_argument(
        "--pods",
        action="store_true",
        help="with --cluster: ask the nodes' pods even when the install names an audit store "
        "(the kube-audit-store ConfigMap, which --cluster otherwise asks through the API "
        "server's service proxy: needs get on that ConfigMap and on services/proxy)",
    )
    cmd.add_argument(
        "--operator-namespace",
        metavar="NS",
        help=f"with --cluster: where kube-audit runs (default {DEFAULT_INSTALL_NAMESPACE}, "
        "or $POD_NAMESPACE)",
    )
    cmd.add_argument(
        "--request-timeout",
        metavar="DURATION",
        help="with --cluster or --store: give up on a node, or the store, that has not "
        "answered after this long, as "
        "kubectl takes it (30s, 1m, or a number of seconds; default 5m, or "
        "$KUBE_AUDIT_REQUEST_TIMEOUT)",
    )
    cmd.add_argument(
        "--store",
        metavar="URL",
        default=env_str("KUBE_AUDIT_STORE", "") or None,
        help="ask the audit store instead: VictoriaLogs' HTTP address, a single node or "
        "vlselect (http(s)://HOST:PORT, or $KUBE_AUDIT_STORE); every node's events, with a "
        "NODE column; exits 7 when the store does not answer in full",
    )
    cmd.add_argument("--store-ca", metavar="FILE", help="with --store: the CA bundle of https")
    cmd.add_argument(
        "--store-token-file",
        metavar="FILE",
        help="with --store: send the bearer token this file holds",
    )
    cmd.add_argument(
        "--store-user",
        metavar="USER",
        help="with --store: basic auth as USER, the password from $KUBE_AUDIT_STORE_PASSWORD",
    )
    cmd.add_argument("--user", action="append", help="user name")
    cmd.add_argument("--group", action="append", help="one of the user's groups")
    cmd.add_argument(
        "--verb", action="append", help=f"one of {', '.join(AUDIT_VERBS)}; repeat or comma-list"
    )
    cmd.add_argument("--resource", action="append", help="plural, singular or short (crd, ing)")
    cmd.add_argument("--namespace", "-n", action="append", help="namespace")
    cmd.add_argument("--name", action="append", help="object name")
    cmd.add_argument("--since", help="RFC 3339 or relative (2h, 1h30m, 7d); inclusive")
    cmd.add_argument("--until", help="RFC 3339 or relative; exclusive")
    cmd.add_argument("--status", action="append", help="HTTP code (403) or class (4xx)")
    cmd.add_argument(
        "--output",
        "-o",
        choices=("table", "wide", "json"),
        default="table",
        help="table (default), wide, or json: JSON Lines, one audit event per line as the "
        'apiserver wrote it (with --cluster, its node in annotations["kube-audit.io/node"])',
    )
    cmd.set_defaults(func=cmd_who)
    standby = sub.add_parser(
        "standby",
        help="wait for SIGTERM: the pod's read-only who container, which who --cluster execs into",
    )
    standby.set_defaults(func=cmd_standby)
