"""Readable plans: unified diffs of what a node would change, with tokens masked."""

from __future__ import annotations

import difflib

from kube_audit.core.identities import (
    KEYED,
    SnapshotError,
    parse_identity_snapshot,
    snapshot_is_keyed,
)
from kube_audit.core.tokens import TokenFileError, TokenRecord, fingerprint, parse_token_file


def mask_token_file(data: bytes | None) -> list[str]:
    """The token file as lines with each token replaced by its fingerprint."""
    if not data:
        return []
    try:
        records = parse_token_file(data)
    except TokenFileError as error:
        return [f"<unreadable token file: {error}>"]
    return [_masked(r) for r in records]


def mask_snapshot(data: bytes | None) -> list[str]:
    """The identity snapshot as the token file's masked lines: the digest's first 12 hex
    digits (keyed with the node's secret, as on the node: never the token's own SHA-256),
    person, uid and groups."""
    if not data:
        return []
    try:
        identities = parse_identity_snapshot(data)
    except SnapshotError as error:
        return [f"<unreadable identity snapshot: {error}>"]
    kind = KEYED if snapshot_is_keyed(data) else "sha256"
    return sorted(
        f"{kind}:{digest[:12]} {i.username} uid={i.uid} groups=[{','.join(i.groups)}]"
        for digest, i in identities.items()
    )


def _masked(record: TokenRecord) -> str:
    groups = f",{','.join(record.groups)}" if record.groups else ""
    return f"{fingerprint(record.token)} {record.username} uid={record.uid} groups=[{groups[1:]}]"


def unified(old: str | None, new: str | None, name: str) -> str:
    """A unified diff of two texts (None: the file does not exist)."""
    a = (old or "").splitlines(keepends=True)
    b = (new or "").splitlines(keepends=True)
    lines = difflib.unified_diff(
        a,
        b,
        fromfile=f"a/{name}" if old is not None else "/dev/null",
        tofile=f"b/{name}" if new is not None else "/dev/null",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def render_plan(
    *,
    manifest_old: str,
    manifest_new: str,
    policy_old: bytes | None,
    policy_new: bytes | None,
    tokens_old: bytes | None,
    tokens_new: bytes | None,
    identities_old: bytes | None = None,
    identities_new: bytes | None = None,
) -> str:
    """The whole plan as text; empty when nothing would change. ``identities_*``: webhook
    mode's snapshot, where identity changes are (None: not shown)."""
    parts = [
        unified(manifest_old, manifest_new, "kube-apiserver.yaml"),
        unified(
            policy_old.decode() if policy_old is not None else None,
            policy_new.decode() if policy_new is not None else None,
            "audit-policy.yaml",
        ),
        unified(
            "".join(f"{line}\n" for line in mask_token_file(tokens_old))
            if tokens_old is not None
            else None,
            "".join(f"{line}\n" for line in mask_token_file(tokens_new))
            if tokens_new is not None
            else None,
            "tokens.csv (tokens shown as fingerprints)",
        ),
    ]
    if identities_new is not None:
        parts.append(
            unified(
                "".join(f"{line}\n" for line in mask_snapshot(identities_old))
                if identities_old is not None
                else None,
                "".join(f"{line}\n" for line in mask_snapshot(identities_new)),
                "identities.json (webhook mode; tokens shown as fingerprints)",
            )
        )
    return "".join(p for p in parts if p)
