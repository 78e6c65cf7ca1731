"""What the authn-webhook answers from, and what tells kube-apiserver where it is.

Written on every apply, in both identity modes: the webhook container then answers with this
node's people before a switch to webhook mode names it in the manifest, and in webhook mode an
identity change is this snapshot alone (no manifest change, no apiserver restart). Only what
changed is written; each file by atomic rename, so the webhook never reads half a file.
"""

from __future__ import annotations

import hashlib
import secrets
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from kube_audit import hostfs
from kube_audit.agent import pki
from kube_audit.agent.layout import HostLayout
from kube_audit.constants import (
    AUTHN_CONFIRMATION,
    AUTHN_DIGEST_KEY,
    AUTHN_SNAPSHOT_HEADER,
    AUTHN_WEBHOOK_PORT,
    KUBEADM_APISERVER_CLIENT_CERT,
    KUBEADM_APISERVER_CLIENT_KEY,
)
from kube_audit.core.identities import (
    DIGEST_KEY_BYTES,
    SnapshotError,
    parse_digest_key,
    render_confirmation,
    render_digest_key,
    render_keyed_snapshot,
    render_webhook_kubeconfig,
    snapshot_digest,
)
from kube_audit.core.plan import WEBHOOK_KUBECONFIG, DesiredState
from kube_audit.errors import NodeConfigError

SERVING_NAME = "kube-audit-authn-webhook"
# Where 0.1.x kept the snapshot (in the state folder, beside the backups).
EARLIER_SNAPSHOT = "identities.json"
# How often a webhook still on an older snapshot is asked again.
CATCH_UP_POLL = 0.1


def ca_files(layout: HostLayout) -> tuple[Path, Path]:
    return layout.webhook_ca_dir / "ca.crt", layout.webhook_ca_dir / "ca.key"


def on_this_node(layout: HostLayout, desired: DesiredState) -> DesiredState:
    """``desired`` with what only this node knows: in webhook mode, its webhook CA's
    fingerprint, which the manifest carries (a CA replaced on disk restarts the apiserver,
    which reads the CA only at its start; before, it refused every token while the node's
    status said live). Reads only."""
    if not desired.webhook_mode:
        return desired
    cert = hostfs.read_optional(ca_files(layout)[0])
    if cert is None:
        return desired
    return replace(desired, webhook_ca="sha256:" + hashlib.sha256(cert).hexdigest())


def _move_from_earlier_places(layout: HostLayout, written: list[str]) -> None:
    """0.1.x kept the CA beside the serving certificate and the snapshot beside the backups,
    all in the webhook's reach. The CA moves (the same CA: the apiserver trusts it from its
    start on), the old snapshot goes once the new one is written."""
    for name, target in zip(("ca.crt", "ca.key"), ca_files(layout), strict=True):
        old = layout.webhook_dir / name
        data = hostfs.read_optional(old)
        if data is None:
            continue
        if hostfs.read_optional(target) is None:
            hostfs.write_atomic(target, data)
            written.append(name)
        hostfs.remove_tree(old)


def serving_files(layout: HostLayout) -> tuple[Path, Path]:
    return layout.webhook_dir / "serving.crt", layout.webhook_dir / "serving.key"


def webhook_kubeconfig(layout: HostLayout) -> Path:
    return layout.config_dir / WEBHOOK_KUBECONFIG


def digest_key_file(layout: HostLayout) -> Path:
    return layout.webhook_dir / AUTHN_DIGEST_KEY


def digest_key(layout: HostLayout) -> bytes | None:
    """The node's digest key, if it has one yet (reads only)."""
    path = digest_key_file(layout)
    data = hostfs.read_optional(path)
    try:
        return None if data is None else parse_digest_key(data)
    except SnapshotError as error:
        # Not retried away: the node is Blocked with this until someone acts on it.
        raise NodeConfigError(
            f"{path}: {error}; remove it and the node makes a new key and keys its snapshot "
            "again (nothing else depends on it)"
        ) from None


def _ensure_digest_key(layout: HostLayout, written: list[str]) -> bytes:
    """The node's own secret the snapshot's digests are keyed with, made once. It never leaves
    the node and is written before any snapshot keyed with it."""
    key = digest_key(layout)
    if key is not None:
        return key
    key = secrets.token_bytes(DIGEST_KEY_BYTES)
    hostfs.write_atomic(digest_key_file(layout), render_digest_key(key))
    written.append(AUTHN_DIGEST_KEY)
    return key


def node_snapshot(layout: HostLayout, identities: bytes) -> bytes | None:
    """The plan's snapshot as this node keeps it (keyed with its digest key); None before the
    node has a key (nothing keyed with it is on disk then)."""
    key = digest_key(layout)
    return None if key is None else render_keyed_snapshot(identities, key)


def _write_if_changed(path: Path, data: bytes, written: list[str]) -> None:
    if hostfs.read_optional(path) != data:
        hostfs.write_atomic(path, data)
        written.append(path.name)


def _ensure_ca(layout: HostLayout, now: datetime, written: list[str]) -> pki.KeyPair:
    """The node's webhook CA, made once: the apiserver trusts it from its start-up on, so a new
    one would need a restart (it is made 10 years long for that reason)."""
    cert_path, key_path = ca_files(layout)
    cert, key = hostfs.read_optional(cert_path), hostfs.read_optional(key_path)
    if cert and key:
        return pki.KeyPair(cert, key)
    ca = pki.generate_ca(now)
    hostfs.write_atomic(key_path, ca.key)
    hostfs.write_atomic(cert_path, ca.cert)
    written.extend((key_path.name, cert_path.name))
    return ca


def write_identities(layout: HostLayout, desired: DesiredState, now: datetime) -> list[str]:
    """Bring the webhook's files to ``desired``: its CA and serving certificate (renewed well
    before expiry), the identity snapshot, and in webhook mode the apiserver's kubeconfig.
    Returns the names of the files written (none: nothing changed)."""
    written: list[str] = []
    hostfs.ensure_dir(layout.state_dir)
    hostfs.ensure_dir(layout.webhook_dir)
    hostfs.ensure_dir(layout.webhook_ca_dir, 0o700)
    _move_from_earlier_places(layout, written)
    ca = _ensure_ca(layout, now, written)
    cert_path, key_path = serving_files(layout)
    if pki.needs_renewal(hostfs.read_optional(cert_path), ca.cert, now):
        serving = pki.issue(ca, now, common_name=SERVING_NAME, hosts=("127.0.0.1",))
        hostfs.write_atomic(key_path, serving.key)
        hostfs.write_atomic(cert_path, serving.cert)
        written.extend((key_path.name, cert_path.name))
    key = _ensure_digest_key(layout, written)
    snapshot = render_keyed_snapshot(desired.identities, key)
    _write_if_changed(layout.identity_snapshot, snapshot, written)
    hostfs.remove_tree(layout.state_dir / EARLIER_SNAPSHOT)
    if desired.webhook_mode:
        hostfs.ensure_dir(layout.config_dir)
        kubeconfig = render_webhook_kubeconfig(
            ca.cert,
            AUTHN_WEBHOOK_PORT,
            KUBEADM_APISERVER_CLIENT_CERT,
            KUBEADM_APISERVER_CLIENT_KEY,
        )
        _write_if_changed(webhook_kubeconfig(layout), kubeconfig, written)
    return written


def write_confirmation(layout: HostLayout, now: datetime) -> None:
    """The snapshot on disk is current as of ``now``: the operator has just planned from a
    fresh list of the cluster. The webhook counts the snapshot's age from here."""
    snapshot = hostfs.read_optional(layout.identity_snapshot)
    if snapshot is not None:
        confirmation = render_confirmation(snapshot_digest(snapshot), now)
        hostfs.write_atomic(layout.webhook_dir / AUTHN_CONFIRMATION, confirmation)


def remove_identities(layout: HostLayout) -> None:
    """Uninstall: the snapshot, the webhook's certificates and its kubeconfig go."""
    hostfs.remove_tree(layout.identity_snapshot)
    hostfs.remove_tree(layout.webhook_dir)
    hostfs.remove_tree(layout.webhook_ca_dir)
    hostfs.remove_tree(layout.state_dir / EARLIER_SNAPSHOT)
    hostfs.remove_tree(webhook_kubeconfig(layout))


def _served_snapshot(url: str, context: ssl.SSLContext, timeout: float) -> tuple[str, str]:
    """(the snapshot digest the webhook names, "") or ("", why it did not answer)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:
            if answer.status != 200:
                return "", f"{url} answered HTTP {answer.status}"
            return str(answer.headers.get(AUTHN_SNAPSHOT_HEADER) or ""), ""
    except urllib.error.HTTPError as error:
        body = error.read(200).decode(errors="replace").strip()
        return "", f"{url} answered HTTP {error.code} ({body})"
    except (OSError, ssl.SSLError) as error:
        return "", f"{url}: {getattr(error, 'reason', error)}"


def webhook_answers(
    layout: HostLayout,
    port: int = AUTHN_WEBHOOK_PORT,
    timeout: float = 5.0,
    *,
    catch_up: float = 3.0,
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """Why the node's authn-webhook does not answer with the node's current people (None: it
    does). Asked over TLS against our own CA, so an impostor on the port does not pass. Its
    /healthz is 200 once it has read a snapshot and names the one it answers from: a token
    asked before the webhook reads the new snapshot is refused, and kube-apiserver keeps that
    answer for the whole cache TTL, so a person is live only once this says so. A webhook on an
    older snapshot is given ``catch_up`` seconds (it looks four times a second)."""
    ca = hostfs.read_optional(ca_files(layout)[0])
    if ca is None:
        return "the webhook's CA is not written yet"
    snapshot = hostfs.read_optional(layout.identity_snapshot)
    if snapshot is None:
        return f"{layout.identity_snapshot} is not written yet"
    wanted = snapshot_digest(snapshot)
    context = ssl.create_default_context(cadata=ca.decode())
    url = f"https://127.0.0.1:{port}/healthz"
    waited = 0.0
    while True:
        served, why = _served_snapshot(url, context, timeout)
        if why:
            return why
        if served == wanted:
            return None
        if waited >= catch_up:
            return (
                f"{url} still answers from another identity snapshot "
                f"({served[:19] or 'not named'}) {catch_up:g} s after "
                f"{layout.identity_snapshot} became {wanted[:19]}"
            )
        sleep(CATCH_UP_POLL)
        waited += CATCH_UP_POLL
