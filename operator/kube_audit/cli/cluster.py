"""``kube-audit kubeconfig``, ``rotate`` and ``status``: from the admin's machine, as kubectl."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kube_audit import hostfs
from kube_audit.cli.common import cluster_flags
from kube_audit.constants import (
    AUDIT_POLICY,
    AUDIT_USER,
    DEFAULT_INSTALL_NAMESPACE,
    PLURALS,
    ROTATE_ANNOTATION,
    ROTATED_FOR,
)
from kube_audit.core import yamlio
from kube_audit.core.audit_query import render_table
from kube_audit.core.kubeconfig import render_kubeconfig
from kube_audit.core.models import AuditUser, parse_audit_user
from kube_audit.core.settings import Settings
from kube_audit.core.status import summarize
from kube_audit.core.users import secret_location
from kube_audit.errors import ClusterError, InvalidInput, NotFound, Problem


def cluster_api(args: argparse.Namespace) -> Any:
    from kube_audit.kube import KubeApi, load_api_client  # noqa: PLC0415 - slow import

    return KubeApi(load_api_client(args.kubeconfig, args.context))


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    from kube_audit.kube import current_cluster  # noqa: PLC0415 - slow import

    out = None if args.output == "-" else Path(args.output or f"{args.audituser}.kubeconfig")
    if out is not None and out.exists() and not args.force:
        raise InvalidInput(
            [Problem(str(out), "-o", "exists; choose another file, or --force to replace it")]
        )
    api = cluster_api(args)
    ref = f"{AUDIT_USER}/{args.audituser}"
    try:
        body = api.get_object(PLURALS[AUDIT_USER], args.audituser)
    except NotFound:
        raise InvalidInput([Problem(ref, "", "no such AuditUser")]) from None
    user = parse_audit_user(body)
    if user.spec.disabled:
        raise InvalidInput([Problem(ref, "spec.disabled", "the user is disabled; no kubeconfig")])
    conditions = {c.get("type"): c for c in (body.get("status") or {}).get("conditions") or []}
    ready = conditions.get("Ready") or {}
    if ready.get("status") != "True":
        why = ready.get("message") or "the operator has not applied it yet"
        raise InvalidInput([Problem(ref, "status", f"not Ready ({why}); its token would not work")])
    settings = replace(Settings(), token_namespace=args.namespace)
    namespace, name, key = secret_location(user, settings)
    found = api.read_secret(namespace, name)
    token = found[0].data.get(key) if found else None
    if not token:
        raise InvalidInput([Problem(ref, "spec", f"Secret {namespace}/{name} key {key!r} missing")])
    cluster, server, ca_data, insecure = current_cluster(args.kubeconfig, args.context)
    text = render_kubeconfig(
        cluster=cluster or "kubernetes",
        server=args.server or server,
        ca_data=ca_data,
        insecure=insecure,
        user=user.username,
        token=token.decode(),
    )
    if out is None:
        sys.stdout.write(text)
        return 0
    hostfs.write_atomic(out, text.encode(), mode=0o600)
    print(
        f"wrote {out} for {user.username} (mode 0600); try: kubectl --kubeconfig {out} auth whoami"
    )
    return 0


def _rotated(api: Any, args: argparse.Namespace, user: AuditUser, nonce: str) -> str | None:
    """Why the rotation is not done yet (None: the new token is live on every node)."""
    name = args.audituser
    settings = replace(Settings(), token_namespace=args.namespace)
    namespace, secret, _ = secret_location(user, settings)
    found = api.read_secret(namespace, secret)
    annotations = ((found[1].get("metadata") or {}).get("annotations") or {}) if found else {}
    if annotations.get(ROTATED_FOR) != nonce:
        return "the operator has not replaced the token yet"
    body = api.get_object(PLURALS[AUDIT_USER], name)
    conditions = {c.get("type"): c for c in (body.get("status") or {}).get("conditions") or []}
    ready = conditions.get("Ready") or {}
    if ready.get("status") != "True":
        return str(ready.get("message") or "not Ready yet")
    return None


def cmd_rotate(args: argparse.Namespace) -> int:
    """A new token for a person: the operator replaces it in the generated Secret once per
    value of the rotate annotation, and every node then serves only the new one."""
    api = cluster_api(args)
    ref = f"{AUDIT_USER}/{args.audituser}"
    try:
        user = parse_audit_user(api.get_object(PLURALS[AUDIT_USER], args.audituser))
    except NotFound:
        raise InvalidInput([Problem(ref, "", "no such AuditUser")]) from None
    secret_ref = user.spec.token_secret_ref
    if secret_ref is not None:
        raise InvalidInput([Problem(ref, "spec.tokenSecretRef", (
            f"the token is kept in Secret {secret_ref.namespace}/{secret_ref.name}, which "
            "kube-audit does not write: put a new token there (the operator serves it once it "
            "changes)"))])  # fmt: skip
    nonce = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    api.annotate_object(PLURALS[AUDIT_USER], args.audituser, {ROTATE_ANNOTATION: nonce})
    print(f"{ref}: a new token asked for ({ROTATE_ANNOTATION}={nonce})")
    if args.wait:
        deadline = time.monotonic() + args.timeout
        why = _rotated(api, args, user, nonce)
        while why is not None:
            if time.monotonic() > deadline:
                raise ClusterError(f"{ref}: not rotated within {args.timeout:g}s: {why}")
            time.sleep(1)
            why = _rotated(api, args, user, nonce)
        print(f"{ref}: the new token is live on every control-plane node; the old one is refused")
    print(f"write the new kubeconfig: kube-audit kubeconfig {args.audituser} --force")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    api = cluster_api(args)
    objects = [(kind, o) for kind in (AUDIT_USER, AUDIT_POLICY) for o in _list(api, kind)]
    records = api.node_records(args.namespace)
    nodes = api.control_plane_nodes()
    object_rows, node_rows = summarize(objects, nodes, records)
    if args.output in ("json", "yaml"):
        report = {
            "objects": [
                dict(zip(("object", "ready", "liveOn", "lastError"), row, strict=True))
                for row in object_rows
            ],
            "nodes": [
                dict(
                    zip(
                        ("node", "config", "outcome", "lastApply", "lastRollback", "confirmed"),
                        r,
                        strict=True,
                    )
                )
                for r in node_rows
            ],
        }
        if args.output == "json":
            print(json.dumps(report, indent=2))
        else:
            print(yamlio.dump(report), end="")
        return 0
    if object_rows:
        print(render_table(object_rows, ["OBJECT", "READY", "LIVE ON", "LAST ERROR"]), end="")
    else:
        print("no AuditUser or AuditPolicy objects")
    print()
    print(
        render_table(
            node_rows,
            ["NODE", "CONFIG", "OUTCOME", "LAST APPLY", "LAST ROLLBACK", "SNAPSHOT CONFIRMED"],
        ),
        end="",
    )
    return 0


def _list(api: Any, kind: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = api.list_objects(PLURALS[kind])
    return items


def _namespace_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--namespace",
        "-n",
        default=DEFAULT_INSTALL_NAMESPACE,
        help=f"where kube-audit is installed: {what} (default: {DEFAULT_INSTALL_NAMESPACE})",
    )


def add_parsers(sub: Any) -> None:
    kc = sub.add_parser(
        "kubeconfig",
        parents=[cluster_flags()],
        help="write a kubeconfig for one AuditUser",
        description="Server and CA from the current kubeconfig context (or --server), the "
        "user's token from its Secret, a context named after the user. Refuses disabled or "
        "not-Ready users; never replaces a file without --force.",
    )
    kc.add_argument("audituser", metavar="AUDITUSER")
    kc.add_argument("--server", help="API server URL people use (default: the current one)")
    kc.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="file to write, '-' for standard output (default: AUDITUSER.kubeconfig)",
    )
    kc.add_argument("--force", action="store_true", help="replace an existing file")
    _namespace_flag(kc, "the token Secrets it made live there")
    kc.set_defaults(func=cmd_kubeconfig, writes=True)
    rot = sub.add_parser(
        "rotate",
        parents=[cluster_flags()],
        help="give one AuditUser a new token",
        description="Asks the operator for a new token in the person's generated Secret (the "
        f"{ROTATE_ANNOTATION} annotation); every node then serves only the new one. A token "
        "in a Secret of your own (spec.tokenSecretRef) is rotated by writing that Secret.",
    )
    rot.add_argument("audituser", metavar="AUDITUSER")
    rot.add_argument(
        "--wait", action="store_true", help="wait until the new token is live on every node"
    )
    rot.add_argument(
        "--timeout", type=float, default=600, metavar="SECONDS", help="with --wait (default 600)"
    )
    _namespace_flag(rot, "the token Secrets it made live there")
    rot.set_defaults(func=cmd_rotate, writes=True)
    st = sub.add_parser(
        "status",
        parents=[cluster_flags()],
        help="per object and per node: what is live where",
    )
    _namespace_flag(st, "its node records live there")
    st.add_argument(
        "--output", "-o", choices=("table", "json", "yaml"), default="table", help="default: table"
    )
    st.set_defaults(func=cmd_status)
