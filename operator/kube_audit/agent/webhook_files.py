"""What the authn-webhook answers from, and what tells kube-apiserver where it is.

Written on every apply, in both identity modes: the webhook container then answers with this
node's people before a switch to webhook mode names it in the manifest, and in webhook mode an
identity change is this snapshot alone (no manifest change, no apiserver restart). Only what
changed is written; each file by atomic rename, so the webhook never reads half a file.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

from kube_audit import hostfs
from kube_audit.agent import pki
from kube_audit.agent.layout import HostLayout
from kube_audit.constants import (
    AUTHN_WEBHOOK_PORT,
    KUBEADM_APISERVER_CLIENT_CERT,
    KUBEADM_APISERVER_CLIENT_KEY,
)
from kube_audit.core.identities import render_webhook_kubeconfig
from kube_audit.core.plan import WEBHOOK_KUBECONFIG, DesiredState

SERVING_NAME = "kube-audit-authn-webhook"


def ca_files(layout: HostLayout) -> tuple[Path, Path]:
    return layout.webhook_dir / "ca.crt", layout.webhook_dir / "ca.key"


def serving_files(layout: HostLayout) -> tuple[Path, Path]:
    return layout.webhook_dir / "serving.crt", layout.webhook_dir / "serving.key"


def webhook_kubeconfig(layout: HostLayout) -> Path:
    return layout.config_dir / WEBHOOK_KUBECONFIG


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
    ca = _ensure_ca(layout, now, written)
    cert_path, key_path = serving_files(layout)
    if pki.needs_renewal(hostfs.read_optional(cert_path), ca.cert, now):
        serving = pki.issue(ca, now, common_name=SERVING_NAME, hosts=("127.0.0.1",))
        hostfs.write_atomic(key_path, serving.key)
        hostfs.write_atomic(cert_path, serving.cert)
        written.extend((key_path.name, cert_path.name))
    _write_if_changed(layout.identity_snapshot, desired.identities, written)
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


def remove_identities(layout: HostLayout) -> None:
    """Uninstall: the snapshot, the webhook's certificates and its kubeconfig go."""
    hostfs.remove_tree(layout.identity_snapshot)
    hostfs.remove_tree(layout.webhook_dir)
    hostfs.remove_tree(webhook_kubeconfig(layout))


def webhook_answers(
    layout: HostLayout, port: int = AUTHN_WEBHOOK_PORT, timeout: float = 5.0
) -> str | None:
    """Why the node's authn-webhook cannot take over identities yet (None: it can). Asked over
    TLS against our own CA, so an impostor on the port does not pass; its /healthz is 200 only
    once it has read a snapshot."""
    ca = hostfs.read_optional(ca_files(layout)[0])
    if ca is None:
        return "the webhook's CA is not written yet"
    context = ssl.create_default_context(cadata=ca.decode())
    url = f"https://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:
            if answer.status == 200:
                return None
            return f"{url} answered HTTP {answer.status}"
    except urllib.error.HTTPError as error:
        return (
            f"{url} answered HTTP {error.code} ({error.read(200).decode(errors='replace').strip()})"
        )
    except (OSError, ssl.SSLError) as error:
        reason = getattr(error, "reason", error)
        return f"{url}: {reason}"
