"""From AuditUser objects and their Secrets to token file records, with every conflict named."""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from kube_audit.constants import FINGERPRINT_KEY, FINGERPRINT_KEY_SECRET, TOKEN_FOR_LABEL
from kube_audit.core.models import AuditUser, SecretData
from kube_audit.core.settings import Settings
from kube_audit.core.tokens import TokenRecord, fingerprint, name_problem, token_problem
from kube_audit.errors import Problem


@dataclass(frozen=True)
class UserResolution:
    """Records for the users that can be served, and the problems of those that cannot.

    An invalid user is left out without blocking the valid ones; ``problems`` says why per object.
    """

    records: tuple[TokenRecord, ...]
    accepted: tuple[str, ...]
    problems: tuple[Problem, ...] = field(default=())
    # (object name, fingerprint of the token it is served with; "" when disabled), accepted
    # users only: status says Ready only where a node serves this very token.
    tokens: tuple[tuple[str, str], ...] = field(default=())
    # Accepted users past their spec.expiresAt (served nowhere), and (name, expiresAt) of those
    # served until a time: the operator plans again at the earliest.
    expired: tuple[str, ...] = field(default=())
    expiries: tuple[tuple[str, datetime], ...] = field(default=())
    # The cluster's fingerprint key the ``tokens`` were made with (None: none in the inputs).
    fingerprint_key: bytes | None = None


# Groups outside 'system:' that make their members cluster-admin on every kubeadm cluster.
PRIVILEGED_GROUPS = frozenset({"kubeadm:cluster-admins"})
PRIVILEGED_WHY = {
    "system:masters": " (full cluster-admin, bypassing RBAC)",
    "kubeadm:cluster-admins": " (bound to cluster-admin by kubeadm 1.29+)",
}


# Generated token Secrets are named this plus the AuditUser's name, in the token namespace.
GENERATED_PREFIX = "audituser-"


def is_privileged_group(group: str) -> bool:
    """'system:' groups and the groups kubeadm binds to cluster-admin."""
    return group.startswith("system:") or group in PRIVILEGED_GROUPS


def secret_location(user: AuditUser, settings: Settings) -> tuple[str, str, str]:
    """(namespace, name, key) of the Secret holding this user's token."""
    ref = user.spec.token_secret_ref
    if ref is not None:
        return ref.namespace, ref.name, ref.key
    return settings.token_namespace, f"{GENERATED_PREFIX}{user.meta.name}", "token"


def generated_for(namespace: str, name: str, settings: Settings) -> str | None:
    """The AuditUser whose generated token Secret this is (by its reserved name), or None."""
    if namespace == settings.token_namespace and name.startswith(GENERATED_PREFIX):
        return name.removeprefix(GENERATED_PREFIX)
    return None


def identity_problems(user: AuditUser, settings: Settings) -> list[Problem]:
    """What kube-apiserver or our guard would refuse in the user name, uid and groups."""
    problems = []
    username_field = "spec.username" if user.spec.username is not None else "metadata.name"
    why = name_problem(user.username)
    if why:
        problems.append(Problem(user.ref, username_field, why))
    elif user.username.startswith("system:") and user.username not in settings.allowed_system_users:
        problems.append(
            Problem(
                user.ref,
                username_field,
                f"{user.username!r} is reserved for Kubernetes components; refused unless the "
                "operator's --allow-system-user (KUBE_AUDIT_ALLOW_SYSTEM_USERS) lists it",
            )
        )
    if user.spec.uid is not None:
        why = name_problem(user.spec.uid)
        if why:
            problems.append(Problem(user.ref, "spec.uid", why))
    for path, why in _group_problems(tuple(user.spec.groups), settings.allowed_system_groups):
        problems.append(Problem(user.ref, path, why))
    return problems


@functools.lru_cache(maxsize=4096)
def _group_problems(
    groups: tuple[str, ...], allowed: frozenset[str]
) -> tuple[tuple[str, str], ...]:
    """(field path, why) per bad group. Cached: many people share the same groups."""
    problems = []
    seen: set[str] = set()
    for i, group in enumerate(groups):
        path = f"spec.groups[{i}]"
        why = name_problem(group, is_group=True)
        if why:
            problems.append((path, why))
        elif group in seen:
            problems.append((path, f"duplicate group {group!r}"))
        elif is_privileged_group(group) and group not in allowed:
            extra = PRIVILEGED_WHY.get(group, "")
            problems.append(
                (
                    path,
                    f"{group!r} is a privileged system group{extra}; refused unless the "
                    "operator's --allow-system-group (KUBE_AUDIT_ALLOW_SYSTEM_GROUPS) lists it",
                )
            )
        seen.add(group)
    return tuple(problems)


def fingerprint_key(
    secrets: Mapping[tuple[str, str], SecretData], settings: Settings
) -> bytes | None:
    """The cluster's fingerprint key from its Secret in the token namespace; None before the
    operator has made it (or in a plan from files)."""
    secret = secrets.get((settings.token_namespace, FINGERPRINT_KEY_SECRET))
    value = secret.data.get(FINGERPRINT_KEY) if secret is not None else None
    return value if value and len(value) >= 32 else None


def _token(
    user: AuditUser,
    secrets: Mapping[tuple[str, str], SecretData],
    settings: Settings,
    unreadable: Collection[str],
) -> tuple[str | None, Problem | None]:
    namespace, name, key = secret_location(user, settings)
    path = "spec.tokenSecretRef" if user.spec.token_secret_ref is not None else "spec"
    if (namespace, name) == (settings.token_namespace, FINGERPRINT_KEY_SECRET):
        return None, Problem(
            user.ref,
            path,
            f"Secret {namespace}/{name} holds the key kube-audit makes token fingerprints with, "
            "not a token: name a Secret of your own",
        )
    owner = generated_for(namespace, name, settings)
    if owner is not None and owner != user.meta.name:
        return None, Problem(
            user.ref,
            path,
            f"Secret {namespace}/{name} is where the operator keeps AuditUser {owner}'s "
            "generated token: only that AuditUser uses it (name a Secret of your own)",
        )
    if namespace in unreadable and namespace == settings.token_namespace:
        return None, Problem(
            user.ref,
            path,
            f"kube-audit may not read Secrets in its token namespace {namespace}: its Role "
            "there (deploy/rbac.yaml: get, list, watch, create, patch Secrets) is missing",
        )
    if namespace in unreadable:
        return None, Problem(
            user.ref,
            path,
            f"kube-audit may not read Secrets in namespace {namespace} (no grant there): an "
            f"admin grants it with 'kube-audit grant-secrets {namespace} | kubectl apply -f -' "
            "(a Role and RoleBinding in that namespace: list and watch Secrets)",
        )
    secret = secrets.get((namespace, name))
    if namespace != settings.token_namespace and (
        secret is None or secret.token_for != user.meta.name
    ):
        # The same words whether or not the Secret exists: nothing to probe other Secrets with.
        return None, Problem(
            user.ref,
            path,
            f"Secret {namespace}/{name} is outside the token namespace "
            f"{settings.token_namespace}: it is used only if it exists and carries the label "
            f"{TOKEN_FOR_LABEL}={user.meta.name} (whoever can write Secrets in {namespace} "
            "consents by adding it)",
        )
    if secret is None:
        # Not yet: the operator makes it, or a secret manager, a SealedSecret or a person
        # will (often in the same sync). In progress, not failed: it goes live when it comes.
        generated = user.spec.token_secret_ref is None
        how = "the operator creates it" if generated else f"it is used once created, key {key!r}"
        return None, Problem(
            user.ref, path, f"Secret {namespace}/{name} does not exist yet ({how})", pending=True
        )
    raw = secret.data.get(key)
    if raw is None:
        return None, Problem(user.ref, path, f"Secret {namespace}/{name} has no key {key!r}")
    try:
        token = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, Problem(user.ref, path, f"Secret {namespace}/{name} key {key!r} is not UTF-8")
    why = token_problem(token)
    if why:
        return None, Problem(
            user.ref, path, f"token in Secret {namespace}/{name} key {key!r} {why}"
        )
    return token, None


def _age_key(user: AuditUser) -> tuple[str, str]:
    """Older objects win conflicts (RFC 3339 timestamps sort as text); name breaks ties."""
    return (user.meta.creation_timestamp or "~", user.meta.name)


def resolve_users(
    users: Iterable[AuditUser],
    secrets: Iterable[SecretData],
    settings: Settings,
    *,
    unreadable: Collection[str] = (),
    now: datetime | None = None,
) -> UserResolution:
    """Token records for every enabled, valid user not expired at ``now`` (None: expiry is
    not judged here); problems for the rest.

    When two objects claim the same username or token, the older keeps it and the newer is
    refused with a message naming both, so adding a bad object never locks out a working user.
    """
    by_ref = {(s.namespace, s.name): s for s in secrets}
    key = fingerprint_key(by_ref, settings)
    records: list[TokenRecord] = []
    accepted: list[str] = []
    problems: list[Problem] = []
    served: list[tuple[str, str]] = []
    expired: list[str] = []
    expiries: list[tuple[str, datetime]] = []
    owner_of_name: dict[str, AuditUser] = {}
    owner_of_token: dict[str, AuditUser] = {}
    for user in sorted(users, key=_age_key):
        own = identity_problems(user, settings)
        if own:
            problems.extend(own)
            continue
        other = owner_of_name.get(user.username)
        if other is not None:
            problems.append(
                Problem(
                    user.ref,
                    "spec.username",
                    f"username {user.username!r} is already claimed by {other.ref}",
                )
            )
            continue
        owner_of_name[user.username] = user
        expires = user.expires
        if user.spec.disabled or (expires is not None and now is not None and expires <= now):
            accepted.append(user.meta.name)
            served.append((user.meta.name, ""))
            if not user.spec.disabled:
                expired.append(user.meta.name)
            continue
        token, problem = _token(user, by_ref, settings, unreadable)
        if problem is not None or token is None:
            problems.extend([problem] if problem else [])
            continue
        holder = owner_of_token.get(token)
        if holder is not None:
            problems.append(
                Problem(
                    user.ref, "spec.tokenSecretRef", f"its token is already used by {holder.ref}"
                )
            )
            continue
        owner_of_token[token] = user
        accepted.append(user.meta.name)
        served.append((user.meta.name, fingerprint(token, key)))
        if expires is not None:
            expiries.append((user.meta.name, expires))
        records.append(
            TokenRecord(
                username=user.username,
                uid=user.uid,
                groups=tuple(user.spec.groups),
                token=token,
                expires_at=expires.isoformat() if expires is not None else "",
            )
        )
    return UserResolution(
        fingerprint_key=key,
        records=tuple(sorted(records)),
        accepted=tuple(sorted(accepted)),
        problems=tuple(sorted(problems)),
        tokens=tuple(sorted(served)),
        expired=tuple(sorted(expired)),
        expiries=tuple(sorted(expiries)),
    )
