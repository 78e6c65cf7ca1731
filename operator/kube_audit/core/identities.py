"""Identities for the TokenReview webhook: the snapshot the node agent keeps, and the answers.

In webhook mode kube-apiserver asks us, with a TokenReview, who holds a bearer token. The node
agent writes the people it would have put in the token file as a snapshot; the webhook answers
from it. The snapshot holds tokens only as SHA-256 digests: a copy of the file (a backup, a
support bundle) gives nobody a credential. A lookup by digest compares digests, never tokens,
so a timing difference could tell at most a prefix of a SHA-256 digest, of no use to find a
token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

from kube_audit.constants import AUTHN_WEBHOOK_PATH, CREDENTIAL_ID
from kube_audit.core.models import parse_rfc3339
from kube_audit.core.tokens import TokenRecord, fingerprint, name_problem
from kube_audit.core.users import is_privileged_group
from kube_audit.errors import KubeAuditError

SNAPSHOT_API_VERSION = "kube-audit.io/v1alpha1"
SNAPSHOT_KIND = "IdentitySnapshot"
# The versions of TokenReview kube-apiserver may send (--authentication-token-webhook-version);
# the answer is in the version asked.
REVIEW_VERSIONS = ("authentication.k8s.io/v1", "authentication.k8s.io/v1beta1")
_DIGEST = re.compile(r"[0-9a-f]{64}")
# A snapshot whose digests are keyed with the node's secret says so; its entries name the
# keyed digest ``hmacSha256`` instead of ``sha256``.
KEYED = "hmac-sha256"
DIGEST_FIELDS = {None: "sha256", KEYED: "hmacSha256"}
DIGEST_KEY_BYTES = 32


class Identity(NamedTuple):
    username: str
    uid: str
    groups: tuple[str, ...]
    # Epoch seconds from which the token is refused (None: never).
    expires: float | None = None
    # The token's fingerprint as status shows it, keyed with the cluster's fingerprint key (the
    # webhook has no key of the cluster's); None in a snapshot written before it was carried.
    credential: str | None = None


class SnapshotError(KubeAuditError):
    """The identity snapshot cannot be read; the webhook keeps answering from the last good one."""


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def keyed_digest(key: bytes, digest: str) -> str:
    """A token's SHA-256 digest keyed with the node's secret: what a keyed snapshot holds."""
    return hmac.new(key, bytes.fromhex(digest), hashlib.sha256).hexdigest()


def lookup_digest(token: str, key: bytes | None) -> str:
    """What a snapshot is indexed by for ``token``: keyed with ``key``, or plain without one."""
    digest = token_digest(token)
    return digest if key is None else keyed_digest(key, digest)


def parse_digest_key(data: bytes) -> bytes:
    """The node's digest key file: 64 hex digits."""
    text = data.decode("ascii", "replace").strip()
    if not re.fullmatch(f"[0-9a-f]{{{2 * DIGEST_KEY_BYTES}}}", text):
        raise SnapshotError(f"digest key: not {2 * DIGEST_KEY_BYTES} lower-case hex digits")
    return bytes.fromhex(text)


def render_digest_key(key: bytes) -> bytes:
    return key.hex().encode() + b"\n"


def render_keyed_snapshot(data: bytes, key: bytes) -> bytes:
    """The plan's snapshot as the node keeps it: each SHA-256 digest keyed with the node's
    secret. The same plan and key give the same bytes."""
    document = json.loads(data)
    if document.get("digest") is not None:
        raise SnapshotError("identity snapshot: already keyed")
    keyed: dict[str, Any] = {
        "apiVersion": document["apiVersion"],
        "kind": document["kind"],
        "digest": KEYED,
    }
    keyed.update({k: v for k, v in document.items() if k not in keyed and k != "identities"})
    keyed["identities"] = [
        {"hmacSha256": keyed_digest(key, entry["sha256"]),
         **{k: v for k, v in entry.items() if k != "sha256"}}
        for entry in document["identities"]
    ]  # fmt: skip
    return (json.dumps(keyed, indent=1, ensure_ascii=False) + "\n").encode()


def snapshot_is_keyed(data: bytes) -> bool:
    """Whether the snapshot's digests are keyed (then the webhook needs the node's key)."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(document, dict) and document.get("digest") == KEYED


def snapshot_digest(data: bytes) -> str:
    """Names one snapshot's bytes: what the webhook says it answers from, and what the agent
    wrote."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def render_identity_snapshot(
    records: Iterable[TokenRecord], cached_for: float = 0, key: bytes | None = None
) -> bytes:
    """The snapshot of ``records``: sorted by person, so the same people give the same bytes.
    ``cached_for``: seconds kube-apiserver may still serve a success it cached (its webhook
    cache TTL, plus 10 s): an expiring token is refused that long before its expiresAt, so no
    request is accepted after it. ``key``: the cluster's fingerprint key, for each token's
    credential ID (without one, the webhook makes it from the token, as a plan from files has
    no key of the cluster's)."""
    identities = [
        {"sha256": token_digest(token), "username": username, "uid": uid, "groups": list(groups)}
        | ({"credentialId": credential_id(token, key)} if key is not None else {})
        | ({"expiresAt": expires_at} if expires_at else {})
        for username, uid, groups, token, expires_at in sorted(records)
    ]
    document: dict[str, Any] = {"apiVersion": SNAPSHOT_API_VERSION, "kind": SNAPSHOT_KIND}
    if cached_for > 0:
        document["refuseBeforeExpirySeconds"] = cached_for
    document["identities"] = identities
    return (json.dumps(document, indent=1, ensure_ascii=False) + "\n").encode()


def _identity(index: int, entry: Any, field: str) -> tuple[str, Identity]:
    where = f"identities[{index}]"
    if not isinstance(entry, dict):
        raise SnapshotError(f"identity snapshot: {where}: must be an object")
    digest = entry.get(field)
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise SnapshotError(f"identity snapshot: {where}.{field}: must be 64 lower-case hex digits")
    values: dict[str, str] = {}
    for key in ("username", "uid"):
        value = entry.get(key)
        if not isinstance(value, str):
            raise SnapshotError(f"identity snapshot: {where}.{key}: must be a string")
        problem = name_problem(value)
        if problem:
            raise SnapshotError(f"identity snapshot: {where}.{key}: {problem}")
        values[key] = value
    groups = entry.get("groups", [])
    if not isinstance(groups, list):
        raise SnapshotError(f"identity snapshot: {where}.groups: must be a list")
    for n, group in enumerate(groups):
        problem = name_problem(group, is_group=True) if isinstance(group, str) else "not a string"
        if problem:
            raise SnapshotError(f"identity snapshot: {where}.groups[{n}]: {problem}")
    expires_at = entry.get("expiresAt")
    expires = None
    if expires_at is not None:
        try:
            expires = parse_rfc3339(expires_at).timestamp() if isinstance(expires_at, str) else None
        except ValueError as error:
            raise SnapshotError(f"identity snapshot: {where}.expiresAt: {error}") from None
        if expires is None:
            raise SnapshotError(f"identity snapshot: {where}.expiresAt: must be a string")
    credential = entry.get("credentialId")
    if credential is not None and not (
        isinstance(credential, str)
        and re.fullmatch(r"kube-audit-token=[a-z0-9]+:[0-9a-f]{12}", credential)
    ):
        raise SnapshotError(f"identity snapshot: {where}.credentialId: not a token fingerprint")
    return digest, Identity(values["username"], values["uid"], tuple(groups), expires, credential)


def parse_identity_snapshot(data: bytes) -> dict[str, Identity]:
    """Identities by token digest; a snapshot that is not exactly what we write is refused whole,
    never half-used."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError) as error:
        raise SnapshotError(f"identity snapshot: not JSON: {error}") from None
    if not isinstance(document, dict):
        raise SnapshotError("identity snapshot: must be a JSON object")
    if (document.get("apiVersion"), document.get("kind")) != (SNAPSHOT_API_VERSION, SNAPSHOT_KIND):
        raise SnapshotError(
            f"identity snapshot: apiVersion/kind must be {SNAPSHOT_API_VERSION}/{SNAPSHOT_KIND}, "
            f"not {document.get('apiVersion')}/{document.get('kind')}"
        )
    kind = document.get("digest")
    if kind not in DIGEST_FIELDS:
        raise SnapshotError(f"identity snapshot: digest: must be {KEYED} or absent, not {kind!r}")
    field = DIGEST_FIELDS[kind]
    entries = document.get("identities")
    if not isinstance(entries, list):
        raise SnapshotError("identity snapshot: identities: must be a list")
    early = document.get("refuseBeforeExpirySeconds", 0)
    if not isinstance(early, int | float) or isinstance(early, bool) or early < 0:
        raise SnapshotError("identity snapshot: refuseBeforeExpirySeconds: must be 0 or more")
    identities: dict[str, Identity] = {}
    for index, entry in enumerate(entries):
        digest, identity = _identity(index, entry, field)
        if identity.expires is not None:
            identity = identity._replace(expires=identity.expires - early)
        if digest in identities:
            raise SnapshotError(
                f"identity snapshot: identities[{index}].{field}: the token of "
                f"{identities[digest].username} again (one token, one person)"
            )
        identities[digest] = identity
    return identities


def render_confirmation(digest: str, confirmed_at: datetime) -> bytes:
    """What the node agent writes beside the snapshot each time the operator has planned from
    a fresh list of the cluster: which snapshot, confirmed current when. The webhook's
    staleness bound counts from it."""
    stamp = confirmed_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (json.dumps({"snapshot": digest, "confirmedAt": stamp}) + "\n").encode()


def parse_confirmation(data: bytes) -> float:
    """Epoch seconds of a confirmation ``render_confirmation`` wrote."""
    try:
        document = json.loads(data)
        return parse_rfc3339(document["confirmedAt"]).timestamp()
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise SnapshotError(
            f"snapshot confirmation: not what the node agent writes: {error}"
        ) from None


def credential_id(token: str, key: bytes | None = None) -> str:
    """The token's fingerprint as the status shows it, as kube-apiserver's credential ID."""
    return "kube-audit-token=" + fingerprint(token, key)


class Allowed(NamedTuple):
    """The ``system:`` user names and groups the operator's guard flags allow (none by default)."""

    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()


NONE_ALLOWED = Allowed()


class ReviewAnswer(NamedTuple):
    """The HTTP status and JSON body the webhook sends back."""

    status: int
    body: dict[str, Any]


def _bad_request(message: str) -> ReviewAnswer:
    return ReviewAnswer(400, {"error": message})


def review_token(
    identities: Mapping[str, Identity] | None,
    body: bytes,
    now: float | None = None,
    refuse: str | None = None,
    allowed: Allowed = NONE_ALLOWED,
    *,
    key: bytes | None = None,
) -> ReviewAnswer:
    """kube-apiserver's question, answered (``now``: epoch seconds, for expiry).

    An unknown token: ``authenticated: false``, which the apiserver caches for its TTL. Nothing
    loaded yet, or ``refuse`` (why every token is refused now: a snapshot older than its
    bound): ``status.error``, which it never caches, so the answer after that is not held
    back. A ``system:`` user name, a ``system:`` group or kubeadm's admin group is never given,
    whatever the snapshot says, but for those the operator's guard flags name (``allowed``):
    an identity from us is never one of the cluster's own. The token's fingerprint goes out as
    its credential ID, which kube-apiserver writes into every audit event of the request.
    ``key``: the node's digest key, for a keyed snapshot.
    """
    try:
        review = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return _bad_request("the body is not JSON")
    if not isinstance(review, dict):
        return _bad_request("the body is not a TokenReview object")
    api_version = review.get("apiVersion")
    if api_version not in REVIEW_VERSIONS or review.get("kind") != "TokenReview":
        return _bad_request(
            f"expected a TokenReview of {' or '.join(REVIEW_VERSIONS)}, "
            f"got {review.get('kind')} {api_version}"
        )
    spec = review.get("spec")
    token = spec.get("token") if isinstance(spec, dict) else None
    if not isinstance(token, str):
        return _bad_request("spec.token must be a string")
    status: dict[str, Any]
    if identities is None or refuse is not None:
        why = refuse or "identities not loaded yet"
        status = {"authenticated": False, "error": f"kube-audit: {why}"}
    else:
        found = identities.get(lookup_digest(token, key)) if token else None
        if found is not None and found.expires is not None and now is not None:
            found = found if now < found.expires else None  # expired: as if unknown
        if found is not None and found.username.startswith("system:"):
            found = found if found.username in allowed.users else None
        if found is None:
            status = {"authenticated": False}
        else:
            groups = [g for g in found.groups if g in allowed.groups or not is_privileged_group(g)]
            credential = found.credential or credential_id(token)
            user = {"username": found.username, "uid": found.uid, "groups": groups,
                    "extra": {CREDENTIAL_ID: [credential]}}  # fmt: skip
            status = {"authenticated": True, "user": user}
    return ReviewAnswer(200, {"apiVersion": api_version, "kind": "TokenReview", "status": status})


def render_webhook_kubeconfig(
    ca_cert: bytes, port: int, client_cert: str, client_key: str
) -> bytes:
    """kube-apiserver's ``--authentication-token-webhook-config-file``: our webhook on the
    node's loopback, trusted through its own CA only (read once, at the apiserver's start), and
    the apiserver's client certificate as files, which it re-reads when kubeadm renews them.
    JSON, a YAML no resolver reads differently."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kube-audit-authn-webhook",
                "cluster": {
                    "server": f"https://127.0.0.1:{port}{AUTHN_WEBHOOK_PATH}",
                    "certificate-authority-data": base64.b64encode(ca_cert).decode(),
                },
            }
        ],
        "users": [
            {
                "name": "kube-apiserver",
                "user": {"client-certificate": client_cert, "client-key": client_key},
            }
        ],
        "contexts": [
            {
                "name": "webhook",
                "context": {"cluster": "kube-audit-authn-webhook", "user": "kube-apiserver"},
            }
        ],
        "current-context": "webhook",
    }
    return (json.dumps(config, indent=2) + "\n").encode()
