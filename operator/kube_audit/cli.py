"""``kube-audit``: the command line. Parses arguments, calls the layers, maps errors to exits."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kube_audit import __version__, hostfs
from kube_audit.agent.health import HealthCheck
from kube_audit.agent.layout import DEFAULT_KUBELET_CONFIG, HostLayout
from kube_audit.agent.node import (
    NodeResult,
    apply_node,
    health_check,
    plan_node,
    rollback_node,
    uninstall_node,
)
from kube_audit.core.audit_query import (
    Query,
    parse_status,
    parse_time,
    render_table,
    resource_plural,
)
from kube_audit.core.crd import CRD_FILES, render_crd_yaml
from kube_audit.core.kubeconfig import render_kubeconfig
from kube_audit.core.models import parse_audit_user
from kube_audit.core.plan import (
    POLICY_FILE,
    TOKEN_FILE,
    DesiredState,
    Inputs,
    collect_inputs,
    parse_documents,
    plan_desired,
)
from kube_audit.core.settings import Settings
from kube_audit.core.status import summarize
from kube_audit.core.users import secret_location
from kube_audit.errors import InvalidInput, KubeAuditError, Problem
from kube_audit.who import run_who

_YAML_SUFFIXES = (".yaml", ".yml", ".json")


def input_files(paths: Sequence[str], problems: list[Problem]) -> list[Path]:
    """Files named by ``-f``; a folder means its YAML/JSON files, as with ``kubectl apply -f``."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(sorted(p for p in path.iterdir() if p.suffix in _YAML_SUFFIXES))
        elif path.exists():
            out.append(path)
        else:
            problems.append(Problem(raw, "", "no such file or folder"))
    return out


def read_inputs(paths: Sequence[str]) -> Inputs:
    """Every object of every file; all problems together, so one run shows every mistake."""
    documents = []
    problems: list[Problem] = []
    for path in input_files(paths, problems):
        try:
            text = hostfs.read_bytes(path).decode("utf-8")
            documents.extend(parse_documents(text, str(path)))
        except UnicodeDecodeError:
            problems.append(Problem(str(path), "", "is not UTF-8 text"))
        except InvalidInput as error:
            problems.extend(error.problems)
    inputs = collect_inputs(documents)
    if problems:
        raise InvalidInput([*problems, *inputs.problems])
    return inputs


def settings_from_args(args: argparse.Namespace) -> Settings:
    problems = [
        Problem(
            "settings",
            f"--audit-log-{name} (KUBE_AUDIT_LOG_{name.upper()})",
            f"{value} is negative; kube-apiserver refuses to start with a negative value",
        )
        for name in ("maxage", "maxbackup", "maxsize")
        if (value := getattr(args, f"audit_log_{name}", 0)) < 0
    ]
    if problems:
        raise InvalidInput(problems)
    return Settings(
        allowed_system_groups=frozenset(getattr(args, "allow_system_group", None) or ()),
        allowed_system_users=frozenset(getattr(args, "allow_system_user", None) or ()),
        log_maxage=getattr(args, "audit_log_maxage", Settings.log_maxage),
        log_maxbackup=getattr(args, "audit_log_maxbackup", Settings.log_maxbackup),
        log_maxsize=getattr(args, "audit_log_maxsize", Settings.log_maxsize),
    )


def _valid_desired(args: argparse.Namespace, settings: Settings) -> DesiredState:
    """The desired state of ``-f`` inputs; refused when any object is invalid, or when there is
    nothing to manage at all (an empty or wrong folder would otherwise remove every token and
    the audit flags: the deliberate case is ``node uninstall``)."""
    inputs = read_inputs(args.file)
    if not inputs.users and not inputs.policies and not inputs.problems:
        where = ", ".join(args.file)
        raise InvalidInput(
            [
                Problem(
                    where,
                    "-f",
                    "holds no AuditUser or AuditPolicy; applying nothing would remove every token "
                    "and the audit flags. To remove kube-audit from a node on purpose, run "
                    "`kube-audit node uninstall`",
                )
            ]
        )
    desired = plan_desired(inputs, settings)
    if desired.problems:
        raise InvalidInput(desired.problems)
    return desired


def _layout(args: argparse.Namespace) -> HostLayout:
    return HostLayout.discover(Path(args.host_root), settings_from_args(args), args.kubelet_config)


def _health(args: argparse.Namespace, layout: HostLayout) -> HealthCheck | None:
    return health_check(layout, url=args.health_url, timeout=args.timeout, no_wait=args.no_wait)


def _report(result: NodeResult) -> int:
    print(result.message)
    return 0


def cmd_node_plan(args: argparse.Namespace) -> int:
    desired = _valid_desired(args, settings_from_args(args))
    layout = _layout(args)
    diff = plan_node(layout, desired)
    print(diff if diff else "no changes: the node already runs this configuration", end="")
    if diff:
        print(f"(static pod folder: {layout.static_pod_dir})")
    else:
        print()
    return 0


def cmd_node_apply(args: argparse.Namespace) -> int:
    desired = _valid_desired(args, settings_from_args(args))
    layout = _layout(args)
    return _report(apply_node(layout, desired, _health(args, layout), retry_failed=True))


def cmd_node_rollback(args: argparse.Namespace) -> int:
    layout = _layout(args)
    return _report(
        rollback_node(layout, _health(args, layout), allow_image_change=args.allow_image_change)
    )


def cmd_node_uninstall(args: argparse.Namespace) -> int:
    layout = _layout(args)
    return _report(uninstall_node(layout, _health(args, layout)))


def cmd_render(args: argparse.Namespace) -> int:
    desired = _valid_desired(args, settings_from_args(args))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidInput([Problem(str(out), "--out", "exists and is not a folder")])
    hostfs.ensure_dir(out)
    hostfs.write_atomic(out / TOKEN_FILE, desired.files.get(TOKEN_FILE, b""), mode=0o600)
    records = len(desired.users.records)
    print(f"wrote {out / TOKEN_FILE} ({records} user{'s' * (records != 1)})")
    policy = desired.files.get(POLICY_FILE)
    if policy is None:
        stale = out / POLICY_FILE
        print(
            "no AuditPolicy given: no audit policy written (a policy with 0 rules would stop "
            "kube-apiserver)" + (f"; {stale} is left from an earlier run" if stale.exists() else "")
        )
    else:
        hostfs.write_atomic(out / POLICY_FILE, policy, mode=0o644)
        print(f"wrote {out / POLICY_FILE}")
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    out = Path(args.out)
    hostfs.ensure_dir(out, 0o755)
    for kind, name in CRD_FILES.items():
        hostfs.write_atomic(out / name, render_crd_yaml(kind).encode(), mode=0o644)
        print(f"wrote {out / name}")
    return 0


def cmd_who(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    problems = []

    def convert(flag: str, values: list[str] | None, func: Any) -> frozenset[str]:
        out = set()
        for value in values or ():
            try:
                out.add(func(value))
            except ValueError as error:
                problems.append(Problem("who", flag, str(error)))
        return frozenset(out)

    since = convert("--since", [args.since] if args.since else None, lambda v: parse_time(v, now))
    until = convert("--until", [args.until] if args.until else None, lambda v: parse_time(v, now))
    query = Query(
        users=frozenset(args.user or ()),
        groups=frozenset(args.group or ()),
        verbs=frozenset(v.lower() for v in args.verb or ()),
        resources=frozenset(resource_plural(r) for r in args.resource or ()),
        namespaces=frozenset(args.namespace or ()),
        names=frozenset(args.name or ()),
        statuses=convert("--status", args.status, parse_status),
        since=next(iter(since), None),
        until=next(iter(until), None),
    )
    if problems:
        raise InvalidInput(problems)
    settings = Settings()
    paths = args.path or [str(Path(args.host_root) / settings.log_dir.lstrip("/"))]
    return run_who(
        paths, query, output=args.output, out=sys.stdout, err=sys.stderr, log_file=settings.log_file
    )


def _add_who_parser(sub: Any) -> None:
    cmd = sub.add_parser(
        "who",
        help="who did it? search the audit log",
        description="Search kube-apiserver audit logs: one line per request, newest last. "
        "Filters combine with AND; a repeated filter matches any of its values.",
    )
    cmd.add_argument("path", nargs="*", help="audit log files or folders (default: the agent's)")
    cmd.add_argument("--host-root", default=_env("KUBE_AUDIT_HOST_ROOT", "/"), metavar="ROOT")
    cmd.add_argument("--user", action="append", help="user name")
    cmd.add_argument("--group", action="append", help="one of the user's groups")
    cmd.add_argument("--verb", action="append", help="create, update, patch, delete, get, ...")
    cmd.add_argument("--resource", action="append", help="plural, singular or short (crd, ing)")
    cmd.add_argument("--namespace", "-n", action="append")
    cmd.add_argument("--name", action="append", help="object name")
    cmd.add_argument("--since", help="RFC 3339 or relative (2h, 30m, 7d); inclusive")
    cmd.add_argument("--until", help="RFC 3339 or relative; exclusive")
    cmd.add_argument("--status", action="append", help="HTTP code (403) or class (4xx)")
    cmd.add_argument("--output", "-o", choices=("table", "wide", "json"), default="table")
    cmd.set_defaults(func=cmd_who)


def _cluster_api(args: argparse.Namespace) -> Any:
    from kube_audit.kube import KubeApi, load_api_client  # noqa: PLC0415 - slow import

    return KubeApi(load_api_client(args.kubeconfig))


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    from kube_audit.kube import current_cluster  # noqa: PLC0415 - slow import

    api = _cluster_api(args)
    ref = f"AuditUser/{args.audituser}"
    try:
        body = api.get_object("auditusers", args.audituser)
    except KubeAuditError as error:
        raise InvalidInput([Problem(ref, "", f"cannot be read: {error}")]) from None
    user = parse_audit_user(body)
    if user.spec.disabled:
        raise InvalidInput([Problem(ref, "spec.disabled", "the user is disabled; no kubeconfig")])
    conditions = {c.get("type"): c for c in (body.get("status") or {}).get("conditions") or []}
    ready = conditions.get("Ready") or {}
    if ready.get("status") != "True":
        why = ready.get("message") or "the operator has not applied it yet"
        raise InvalidInput([Problem(ref, "status", f"not Ready ({why}); its token would not work")])
    namespace, name, key = secret_location(user, Settings())
    found = api.read_secret(namespace, name)
    token = found[0].data.get(key) if found else None
    if not token:
        raise InvalidInput([Problem(ref, "spec", f"Secret {namespace}/{name} key {key!r} missing")])
    cluster, server, ca_data, insecure = current_cluster(args.kubeconfig)
    text = render_kubeconfig(
        cluster=cluster or "kubernetes",
        server=args.server or server,
        ca_data=ca_data,
        insecure=insecure,
        user=user.username,
        token=token.decode(),
    )
    out = Path(args.output or f"{args.audituser}.kubeconfig")
    hostfs.write_atomic(out, text.encode(), mode=0o600)
    print(
        f"wrote {out} for {user.username} (mode 0600); try: kubectl --kubeconfig {out} auth whoami"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    api = _cluster_api(args)
    objects = [("AuditUser", o) for o in api.list_objects("auditusers")]
    objects += [("AuditPolicy", o) for o in api.list_objects("auditpolicies")]
    records = api.node_records(args.namespace)
    object_rows, node_rows = summarize(objects, api.control_plane_nodes(), records)
    if object_rows:
        print(render_table(object_rows, ["OBJECT", "READY", "LIVE ON", "LAST ERROR"]), end="")
    else:
        print("no AuditUser or AuditPolicy objects")
    print()
    print(
        render_table(node_rows, ["NODE", "CONFIG", "OUTCOME", "LAST APPLY", "LAST ROLLBACK"]),
        end="",
    )
    return 0


def _add_cluster_parsers(sub: Any) -> None:
    kc = sub.add_parser(
        "kubeconfig",
        help="write a kubeconfig for one AuditUser",
        description="Server and CA from the current kubeconfig (or --server), the user's token "
        "from its Secret, a context named after the user. Refuses disabled or not-Ready users.",
    )
    kc.add_argument("audituser", metavar="AUDITUSER")
    kc.add_argument("--server", help="API server URL people use (default: the current one)")
    kc.add_argument("-o", "--output", metavar="FILE", help="default: AUDITUSER.kubeconfig")
    kc.add_argument("--kubeconfig", default=None, help="the admin kubeconfig to read from")
    kc.set_defaults(func=cmd_kubeconfig)
    st = sub.add_parser("status", help="per object and per node: what is live where")
    st.add_argument("--kubeconfig", default=None)
    st.add_argument(
        "--namespace",
        default="kube-audit",
        help="where the operator runs (its node records live there; default: kube-audit)",
    )
    st.set_defaults(func=cmd_status)


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def cmd_operator(args: argparse.Namespace) -> int:
    # Imported here: kopf and the Kubernetes client take a second to import, and only the
    # operator needs them, not render or node.
    from kube_audit.controller import main as operator_main  # noqa: PLC0415
    from kube_audit.controller.config import OperatorConfig  # noqa: PLC0415
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
        debounce=args.debounce,
        max_debounce=args.max_debounce,
        min_ready=args.min_ready,
        resync=args.resync,
        health_url=args.health_url,
        timeout=args.timeout,
        no_wait=args.no_wait,
    )
    api = KubeApi(load_api_client(args.kubeconfig))
    return operator_main.main(
        config, api, (args.metrics_address, args.metrics_port), args.liveness, args.readiness
    )


def _add_operator_parser(sub: Any) -> None:
    cmd = sub.add_parser(
        "operator",
        help="run the operator (the DaemonSet's process)",
        description="Watch AuditUser and AuditPolicy objects and apply them to this node. "
        "Every flag falls back to an environment variable.",
    )
    cmd.add_argument("--host-root", default=_env("KUBE_AUDIT_HOST_ROOT", "/"), metavar="ROOT")
    cmd.add_argument("--kubelet-config", default=DEFAULT_KUBELET_CONFIG, metavar="PATH")
    cmd.add_argument("--node-name", default=_env("NODE_NAME", ""), help="default $NODE_NAME")
    cmd.add_argument("--namespace", default=_env("POD_NAMESPACE", "kube-audit"))
    cmd.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    cmd.add_argument(
        "--debounce",
        type=float,
        default=float(_env("KUBE_AUDIT_DEBOUNCE", "3")),
        metavar="SECONDS",
        help="quiet time before applying a burst of changes",
    )
    cmd.add_argument(
        "--max-debounce",
        type=float,
        default=float(_env("KUBE_AUDIT_MAX_DEBOUNCE", "30")),
        metavar="SECONDS",
        help="the longest a stream of changes may delay applying them",
    )
    cmd.add_argument(
        "--min-ready",
        type=float,
        default=float(_env("KUBE_AUDIT_MIN_READY", "10")),
        metavar="SECONDS",
        help="after a restart, how long the new apiserver must be ready before the next node "
        "restarts its own (at least your load balancer's time to mark a server healthy)",
    )
    cmd.add_argument(
        "--resync",
        type=float,
        default=float(_env("KUBE_AUDIT_RESYNC", "300")),
        metavar="SECONDS",
        help="re-check the host this often (repairs drift)",
    )
    cmd.add_argument("--health-url", default=os.environ.get("KUBE_AUDIT_HEALTH_URL"))
    cmd.add_argument("--timeout", type=float, default=float(_env("KUBE_AUDIT_TIMEOUT", "180")))
    cmd.add_argument(
        "--no-wait", action="store_true", default=_env("KUBE_AUDIT_NO_WAIT", "") == "true"
    )
    cmd.add_argument(
        "--metrics-port",
        type=int,
        default=int(_env("KUBE_AUDIT_METRICS_PORT", "9090")),
        help="Prometheus metrics port (0: none)",
    )
    cmd.add_argument(
        "--metrics-address",
        default=_env("KUBE_AUDIT_METRICS_ADDRESS", "127.0.0.1"),
        help="address the metrics listen on; the pod shares the node's network, so the "
        "default keeps them on the node",
    )
    cmd.add_argument(
        "--liveness",
        default=_env("KUBE_AUDIT_LIVENESS", "http://127.0.0.1:8080/healthz"),
        help="kopf's liveness endpoint (on the node only by default, as kubeadm's components)",
    )
    cmd.add_argument(
        "--readiness",
        default=_env("KUBE_AUDIT_READINESS", "http://127.0.0.1:8081/readyz"),
        help="ready once the node is settled: a DaemonSet update waits for it on each node",
    )
    for flag, default in (("maxage", 30), ("maxbackup", 10), ("maxsize", 100)):
        cmd.add_argument(
            f"--audit-log-{flag}",
            type=int,
            default=int(_env(f"KUBE_AUDIT_LOG_{flag.upper()}", str(default))),
        )
    _add_guard_flags(cmd)
    cmd.set_defaults(func=cmd_operator)


def _add_guard_flags(parser: argparse.ArgumentParser) -> None:
    env_groups = [g for g in os.environ.get("KUBE_AUDIT_ALLOW_SYSTEM_GROUPS", "").split(",") if g]
    parser.add_argument(
        "--allow-system-group",
        action="append",
        default=env_groups or None,
        metavar="GROUP",
        help="allow this exact system: group in AuditUsers (repeatable)",
    )
    parser.add_argument(
        "--allow-system-user",
        action="append",
        metavar="USER",
        help="allow this exact system: username in AuditUsers (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kube-audit",
        description="Per-person identities and audit logging for kubeadm clusters.",
    )
    parser.add_argument("--version", action="version", version=f"kube-audit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    render = sub.add_parser(
        "render",
        help="render tokens.csv and audit-policy.yaml from YAML files",
        description="Validate AuditUser, AuditPolicy and Secret objects and write the token "
        "file and audit policy kube-apiserver reads. Writes nothing if any input is invalid.",
    )
    render.add_argument("-f", "--file", action="append", required=True, metavar="FILE")
    render.add_argument("--out", required=True, metavar="DIR")
    _add_guard_flags(render)
    render.set_defaults(func=cmd_render)

    node = sub.add_parser("node", help="apply to this control-plane node's host").add_subparsers(
        dest="node_command", required=True
    )
    for name, func, text, needs_inputs, waits in (
        (
            "plan",
            cmd_node_plan,
            "show what apply would change (tokens as fingerprints)",
            True,
            False,
        ),
        (
            "apply",
            cmd_node_apply,
            "apply the objects to the node and wait for the apiserver",
            True,
            True,
        ),
        (
            "rollback",
            cmd_node_rollback,
            "go back to the last good state before the running one",
            False,
            True,
        ),
        (
            "uninstall",
            cmd_node_uninstall,
            "restore kubeadm's manifest; keep audit logs",
            False,
            True,
        ),
    ):
        cmd = node.add_parser(name, help=text, description=text)
        cmd.add_argument(
            "--host-root",
            default="/",
            metavar="ROOT",
            help="where the host's / is mounted (default /)",
        )
        cmd.add_argument(
            "--kubelet-config",
            default=DEFAULT_KUBELET_CONFIG,
            metavar="PATH",
            help="kubelet config holding staticPodPath (host path)",
        )
        if needs_inputs:
            cmd.add_argument("-f", "--file", action="append", required=True, metavar="FILE")
            _add_guard_flags(cmd)
            for flag, default, unit in (
                ("maxage", 30, "days"),
                ("maxbackup", 10, "files"),
                ("maxsize", 100, "MB"),
            ):
                cmd.add_argument(
                    f"--audit-log-{flag}",
                    type=int,
                    default=default,
                    help=f"audit log rotation, {unit} (default {default})",
                )
        if waits:
            cmd.add_argument(
                "--health-url",
                metavar="URL",
                help="readiness URL (default: https://ADVERTISE-ADDRESS:PORT/readyz)",
            )
            cmd.add_argument(
                "--timeout",
                type=float,
                default=180.0,
                metavar="SECONDS",
                help="how long to wait for the new apiserver (default 180)",
            )
            cmd.add_argument(
                "--no-wait",
                action="store_true",
                help="do not wait for the new apiserver to become ready",
            )
        if name == "rollback":
            cmd.add_argument(
                "--allow-image-change",
                action="store_true",
                help="allow restoring a backup whose kube-apiserver image differs from the "
                "running one (taken before a kubeadm upgrade: it would change the version)",
            )
        cmd.set_defaults(func=func)
    _add_operator_parser(sub)
    _add_who_parser(sub)
    _add_cluster_parsers(sub)
    crds = sub.add_parser("crds", help="write the CustomResourceDefinitions")
    crds.add_argument("--out", default="crds", metavar="DIR")
    crds.set_defaults(func=cmd_crds)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except InvalidInput as error:
        print(
            f"kube-audit: {len(error.problems)} invalid input(s), nothing written:", file=sys.stderr
        )
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return error.exit_code
    except KubeAuditError as error:
        print(f"kube-audit: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
