"""What several commands share: reading ``-f`` inputs, the settings they make, and the flag
groups built once (argparse parents) with their environment fallbacks."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from kube_audit import hostfs
from kube_audit.agent.layout import DEFAULT_KUBELET_CONFIG
from kube_audit.cli.env import env_bool, env_int, env_list, env_str
from kube_audit.core.settings import GO_DURATION, IDENTITY_MODES, IdentityMode, Settings
from kube_audit.errors import HostError, InvalidInput, Problem
from kube_audit.logstore import StoreAccess

if TYPE_CHECKING:
    from kube_audit.core.plan import DesiredState, Inputs

_YAML_SUFFIXES = (".yaml", ".yml", ".json")
ROTATION = (("maxage", "days"), ("maxbackup", "files"), ("maxsize", "MB"))


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
    from kube_audit.core.plan import collect_inputs, parse_documents  # noqa: PLC0415 - pydantic

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
        log_compress=bool(getattr(args, "audit_log_compress", False)),
        identity_mode=getattr(args, "identity_mode", Settings.identity_mode),
        webhook_cache_ttl=getattr(args, "webhook_cache_ttl", Settings.webhook_cache_ttl),
    )


def valid_desired(args: argparse.Namespace, settings: Settings) -> DesiredState:
    """The desired state of ``-f`` inputs; refused when any object is invalid, or when there is
    nothing to manage at all (an empty or wrong folder would otherwise remove every token and
    the audit flags: the deliberate case is ``node uninstall``)."""
    from kube_audit.core.plan import plan_desired  # noqa: PLC0415 - pydantic

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
    desired = plan_desired(inputs, settings, now=datetime.now(UTC))
    if desired.problems:
        raise InvalidInput(desired.problems)
    return desired


def input_flags() -> argparse.ArgumentParser:
    """``-f``: the objects to render or apply, as ``kubectl apply -f`` takes them."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "-f",
        "--file",
        action="append",
        required=True,
        metavar="FILE",
        help="a YAML/JSON file or a folder of them (repeatable)",
    )
    return parent


def guard_flags() -> argparse.ArgumentParser:
    """The privilege guard: which exact ``system:`` identities AuditUsers may use."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--allow-system-group",
        action="append",
        default=env_list("KUBE_AUDIT_ALLOW_SYSTEM_GROUPS"),
        metavar="GROUP",
        help="allow this exact system: group in AuditUsers (repeatable; default: none, or "
        "$KUBE_AUDIT_ALLOW_SYSTEM_GROUPS, comma-separated)",
    )
    parent.add_argument(
        "--allow-system-user",
        action="append",
        default=env_list("KUBE_AUDIT_ALLOW_SYSTEM_USERS"),
        metavar="USER",
        help="allow this exact system: username in AuditUsers (repeatable; default: none, or "
        "$KUBE_AUDIT_ALLOW_SYSTEM_USERS, comma-separated)",
    )
    return parent


def rotation_flags(from_env: bool) -> argparse.ArgumentParser:
    """Audit log rotation; the operator reads ``KUBE_AUDIT_LOG_*`` too."""
    parent = argparse.ArgumentParser(add_help=False)
    for flag, unit in ROTATION:
        builtin = int(getattr(Settings, f"log_{flag}"))
        name = f"KUBE_AUDIT_LOG_{flag.upper()}"
        default = env_int(name, builtin) if from_env else builtin
        parent.add_argument(
            f"--audit-log-{flag}",
            type=int,
            default=default,
            metavar=unit.upper(),
            help=f"audit log rotation, {unit} (default {builtin}"
            + (f", or ${name})" if from_env else ")"),
        )
    parent.add_argument(
        "--audit-log-compress",
        action="store_true",
        default=env_bool("KUBE_AUDIT_LOG_COMPRESS") if from_env else False,
        help="gzip rotated audit logs (kube-apiserver --audit-log-compress; `who` reads .gz; "
        "default off" + (", or $KUBE_AUDIT_LOG_COMPRESS=true)" if from_env else ")"),
    )
    return parent


def _identity_mode(value: str) -> IdentityMode:
    """A type, not ``choices``: argparse checks a default (here from the environment) only so."""
    for mode in IDENTITY_MODES:
        if value == mode:
            return mode
    raise argparse.ArgumentTypeError(
        f"{value!r} is not an identity mode: use {' or '.join(IDENTITY_MODES)}"
    )


def _go_duration(value: str) -> str:
    if not GO_DURATION.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a Go duration (e.g. 10s, 1m30s) as kube-apiserver's "
            "--authentication-token-webhook-cache-ttl takes it"
        )
    return value


def identity_flags(from_env: bool) -> argparse.ArgumentParser:
    """How identities reach kube-apiserver; the operator reads ``KUBE_AUDIT_IDENTITY_MODE``
    and ``KUBE_AUDIT_WEBHOOK_CACHE_TTL`` too."""
    parent = argparse.ArgumentParser(add_help=False)
    mode = env_str("KUBE_AUDIT_IDENTITY_MODE", Settings.identity_mode) if from_env else None
    parent.add_argument(
        "--identity-mode",
        type=_identity_mode,
        metavar="{" + ",".join(IDENTITY_MODES) + "}",
        default=mode or Settings.identity_mode,
        help="token-file: kube-apiserver's --token-auth-file, a restart per identity change; "
        "webhook: the node's authn-webhook answers TokenReviews, no restart per identity change "
        f"(default {Settings.identity_mode}"
        + (", or $KUBE_AUDIT_IDENTITY_MODE)" if from_env else ")"),
    )
    ttl = env_str("KUBE_AUDIT_WEBHOOK_CACHE_TTL", Settings.webhook_cache_ttl) if from_env else None
    parent.add_argument(
        "--webhook-cache-ttl",
        type=_go_duration,
        default=ttl or Settings.webhook_cache_ttl,
        metavar="DURATION",
        help="webhook mode: kube-apiserver's --authentication-token-webhook-cache-ttl, the "
        "longest a removed person's token may still be accepted, plus 10 s (default "
        f"{Settings.webhook_cache_ttl}"
        + (", or $KUBE_AUDIT_WEBHOOK_CACHE_TTL)" if from_env else ")"),
    )
    return parent


def host_flags(from_env: bool) -> argparse.ArgumentParser:
    """Where the host's / is, and the kubelet config naming the static pod folder."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--host-root",
        default=env_str("KUBE_AUDIT_HOST_ROOT", "/") if from_env else "/",
        metavar="ROOT",
        help="where the host's / is mounted (default /"
        + (", or $KUBE_AUDIT_HOST_ROOT)" if from_env else ")"),
    )
    parent.add_argument(
        "--kubelet-config",
        default=env_str("KUBE_AUDIT_KUBELET_CONFIG", DEFAULT_KUBELET_CONFIG)
        if from_env
        else DEFAULT_KUBELET_CONFIG,
        metavar="PATH",
        help=f"kubelet config holding staticPodPath, a host path (default "
        f"{DEFAULT_KUBELET_CONFIG}" + (", or $KUBE_AUDIT_KUBELET_CONFIG)" if from_env else ")"),
    )
    return parent


def cluster_flags() -> argparse.ArgumentParser:
    """How to reach the cluster, as kubectl: ``--kubeconfig`` wins over in-cluster
    credentials, then $KUBECONFIG, then ~/.kube/config; ``--context`` picks a context."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--kubeconfig",
        default=None,
        metavar="FILE",
        help="kubeconfig to use (default: in-cluster credentials inside a pod, else "
        "$KUBECONFIG or ~/.kube/config)",
    )
    parent.add_argument(
        "--context", default=None, help="kubeconfig context (default: the current one)"
    )
    return parent


def store_access(args: argparse.Namespace, timeout: float, command: str) -> StoreAccess:
    """How ``who --store`` and ``ship`` reach the store: the same flags, the password only
    from the environment (a flag would show in ``ps``)."""
    token = None
    if args.store_token_file:
        try:
            token = hostfs.read_bytes(Path(args.store_token_file)).decode().strip()
        except (HostError, UnicodeDecodeError) as error:
            raise InvalidInput([Problem(command, "--store-token-file", str(error))]) from None
        if not token:
            raise InvalidInput(
                [Problem(command, "--store-token-file", f"{args.store_token_file} is empty")]
            )
    return StoreAccess(
        url=args.store,
        ca_file=args.store_ca,
        token=token,
        user=args.store_user,
        password=env_str("KUBE_AUDIT_STORE_PASSWORD", "") or None,
        timeout=timeout,
        command=command,
    )
