"""``kube-audit render``, ``crds`` and ``grant-secrets``: files from YAML, no cluster, no host."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kube_audit import hostfs
from kube_audit.cli.common import guard_flags, input_flags, settings_from_args, valid_desired
from kube_audit.constants import DEFAULT_INSTALL_NAMESPACE
from kube_audit.core.crd import CRD_FILES, render_crd_yaml
from kube_audit.core.identities import Allowed
from kube_audit.core.plan import POLICY_FILE, TOKEN_FILE
from kube_audit.core.rbac import render_secrets_grant
from kube_audit.errors import InvalidInput, Problem

ONLY = {"tokens": TOKEN_FILE, "policy": POLICY_FILE}


def cmd_render(args: argparse.Namespace) -> int:
    desired = valid_desired(args, settings_from_args(args))
    if args.out == "-":
        return _print_one(args.only, desired.files)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidInput([Problem(str(out), "--out", "exists and is not a folder")])
    hostfs.ensure_dir(out)
    if args.only != "policy":
        hostfs.write_atomic(out / TOKEN_FILE, desired.files.get(TOKEN_FILE, b""), mode=0o600)
        records = len(desired.users.records)
        print(f"wrote {out / TOKEN_FILE} ({records} user{'s' * (records != 1)})")
    if args.only == "tokens":
        return 0
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


def _print_one(only: str | None, files: Mapping[str, bytes]) -> int:
    """One file on stdout, byte for byte what ``--out DIR`` writes: two files cannot share a
    stream without a separator, and the token file has no comment syntax to carry one."""
    if only is None:
        if len(files) > 1:
            raise InvalidInput(
                [
                    Problem(
                        "--out -",
                        "--only",
                        f"prints one file and the inputs make two ({TOKEN_FILE}, {POLICY_FILE}):"
                        " add --only tokens or --only policy",
                    )
                ]
            )
        only = next((k for k, name in ONLY.items() if name in files), "tokens")
    name = ONLY[only]
    if name not in files and only == "policy":
        raise InvalidInput(
            [Problem("--only policy", "-f", "no AuditPolicy given: there is no audit policy")]
        )
    sys.stdout.buffer.write(files.get(name, b""))
    sys.stdout.flush()
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    """To stdout by default (``kube-audit crds | kubectl apply -f -``), or files in a folder."""
    allowed = Allowed(
        frozenset(args.allow_system_user or ()), frozenset(args.allow_system_group or ())
    )
    if args.out in (None, "-"):
        docs = [render_crd_yaml(kind, allowed) for kind in CRD_FILES]
        sys.stdout.write("---\n".join(docs))
        return 0
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidInput([Problem(str(out), "--out", "exists and is not a folder")])
    hostfs.ensure_dir(out, 0o755)
    for kind, name in CRD_FILES.items():
        hostfs.write_atomic(out / name, render_crd_yaml(kind, allowed).encode(), mode=0o644)
        print(f"wrote {out / name}")
    return 0


def cmd_grant_secrets(args: argparse.Namespace) -> int:
    """Printed, not applied: granting Secrets is an admin's decision, made with their own
    credentials (``| kubectl apply -f -``) or committed to their GitOps repository."""
    sys.stdout.write(render_secrets_grant(args.namespaces, args.install_namespace))
    return 0


def add_parsers(sub: Any) -> None:
    render = sub.add_parser(
        "render",
        parents=[input_flags(), guard_flags()],
        help="render tokens.csv and audit-policy.yaml from YAML files",
        description="Validate AuditUser, AuditPolicy and Secret objects and write the token "
        "file and audit policy kube-apiserver reads. Writes nothing if any input is invalid.",
    )
    render.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder to write into, or - to print one file on stdout (see --only)",
    )
    render.add_argument(
        "--only",
        choices=tuple(ONLY),
        help=f"render only the token file ({TOKEN_FILE}) or the audit policy ({POLICY_FILE}); "
        "needed with --out - when the inputs make both",
    )
    render.set_defaults(func=cmd_render, writes=True)
    crds = sub.add_parser(
        "crds",
        parents=[guard_flags()],
        help="write the CustomResourceDefinitions",
        description="The CRDs of AuditUser and AuditPolicy. Their rules refuse system: user "
        "names and groups at apply time; to allow exact ones, give the same "
        "--allow-system-group/--allow-system-user here as to the operator.",
    )
    crds.add_argument(
        "--out",
        metavar="DIR",
        help="write one file per CRD into this folder; without it, or with -, print them on "
        "stdout (for kubectl apply -f -)",
    )
    crds.set_defaults(func=cmd_crds, writes=True)
    grant = sub.add_parser(
        "grant-secrets",
        help="print the Role and RoleBinding that let the operator read token Secrets in "
        "these namespaces",
        description="The operator holds no cluster-wide Secret access. An AuditUser whose "
        "tokenSecretRef points outside the token namespace needs this grant in that namespace "
        "(list and watch Secrets; only those with the consent label are ever asked for). "
        "Prints YAML: kube-audit grant-secrets team-a | kubectl apply -f -",
    )
    grant.add_argument("namespaces", nargs="+", metavar="NAMESPACE")
    grant.add_argument(
        "--install-namespace",
        default=DEFAULT_INSTALL_NAMESPACE,
        metavar="NS",
        help=f"where the operator's ServiceAccount is (default {DEFAULT_INSTALL_NAMESPACE})",
    )
    grant.set_defaults(func=cmd_grant_secrets)
