"""What the authn-webhook answers from, each re-read when its file changes: the identity snapshot
and when the operator last confirmed it, the client certificate it answers, and its serving TLS.

Every reader keeps the last good value when a new one does not read, and says so; the webhook's
loop only asks them to look (``refresh``), never learns their formats.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge

from kube_audit import hostfs
from kube_audit.constants import AUTHN_CONFIRMATION, AUTHN_DIGEST_KEY
from kube_audit.core.identities import (
    Identity,
    SnapshotError,
    parse_confirmation,
    parse_digest_key,
    parse_identity_snapshot,
    snapshot_digest,
    snapshot_is_keyed,
)
from kube_audit.errors import HostError

log = logging.getLogger("kube_audit.agent.authn_webhook")

Signature = tuple[int, int, int] | None


@dataclass(frozen=True)
class WebhookFiles:
    """Where the webhook reads what the node agent wrote, and the apiserver's client certificate."""

    snapshot: Path
    serving_cert: Path
    serving_key: Path
    client_ca: Path
    client_cert: Path

    @property
    def confirmation(self) -> Path:
        """When the operator last confirmed the snapshot current (beside it, written after it)."""
        return self.snapshot.with_name(AUTHN_CONFIRMATION)

    @property
    def digest_key(self) -> Path:
        """The node's secret the snapshot's digests are keyed with (beside it, written first)."""
        return self.snapshot.with_name(AUTHN_DIGEST_KEY)


class WebhookMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reviews = Counter(
            "kube_audit_authn_reviews",
            "TokenReviews answered, by result",
            ["result"],
            registry=self.registry,
        )
        self.snapshot_errors = Counter(
            "kube_audit_authn_snapshot_errors",
            "Identity snapshots that did not parse (the last good one was kept)",
            registry=self.registry,
        )
        self.identities = Gauge(
            "kube_audit_authn_identities",
            "Identities in the snapshot answered from",
            registry=self.registry,
        )
        self.refused_clients = Counter(
            "kube_audit_authn_refused_clients",
            "Requests refused: no client certificate, or not kube-apiserver's",
            registry=self.registry,
        )
        self.refused_connections = Counter(
            "kube_audit_authn_refused_connections",
            "Connections closed at once, or the oldest unproven one pushed out, at the caps",
            registry=self.registry,
        )
        self.timeouts = Counter(
            "kube_audit_authn_timeouts",
            "Connections closed for missing a deadline, by stage (handshake, request, write)",
            ["stage"],
            registry=self.registry,
        )
        self.connections = Gauge(
            "kube_audit_authn_connections", "Connections open", registry=self.registry
        )
        self.refresh_errors = Counter(
            "kube_audit_authn_refresh_errors",
            "Looks at the inputs that failed unexpectedly (the loop goes on; see the log)",
            registry=self.registry,
        )
        self.snapshot_age = Gauge(
            "kube_audit_authn_snapshot_age_seconds",
            "Seconds since the operator last confirmed the snapshot current (-1: never)",
            registry=self.registry,
        )


class IdentitySource:
    """The snapshot as last read whole (None until the first good read) and when the operator
    last confirmed it. ``digest`` names it (set after the identities, so it never names a
    snapshot not yet answered from)."""

    def __init__(self, files: WebhookFiles, metrics: WebhookMetrics) -> None:
        self.files = files
        self.metrics = metrics
        # The people and the key their digests are keyed with (None: a plain snapshot), swapped
        # as one pair: a request never looks up new people with the old key.
        self.loaded: tuple[Mapping[str, Identity], bytes | None] | None = None
        self.digest: str | None = None
        # Epoch seconds of the operator's last confirmation (None: never confirmed).
        self.confirmed: float | None = None
        self._seen: Signature = None
        self._confirmation_seen: Signature = None

    def refresh(self) -> None:
        self._refresh_snapshot()
        self._refresh_confirmation()

    def _refresh_snapshot(self) -> None:
        path = self.files.snapshot
        signature = hostfs.file_signature(path)
        if signature is None or signature == self._seen:
            return
        try:
            data = hostfs.read_bytes(path)
            identities = parse_identity_snapshot(data)
            key = (
                parse_digest_key(hostfs.read_bytes(self.files.digest_key))
                if snapshot_is_keyed(data)
                else None
            )
        except (HostError, SnapshotError) as error:
            self._seen = signature
            self.metrics.snapshot_errors.inc()
            kept = "none loaded yet" if self.loaded is None else "keeping the last good one"
            log.error("%s: %s (%s)", path, error, kept)
            return
        self._seen = signature
        self.loaded = (identities, key)  # one reference swap: a request sees old or new, whole
        self.digest = snapshot_digest(data)
        self.metrics.identities.set(len(identities))
        log.info("%s: %d identities loaded", path, len(identities))

    def _refresh_confirmation(self) -> None:
        path = self.files.confirmation
        signature = hostfs.file_signature(path)
        if signature is None or signature == self._confirmation_seen:
            return
        self._confirmation_seen = signature
        try:
            self.confirmed = parse_confirmation(hostfs.read_bytes(path))
        except (HostError, SnapshotError) as error:
            log.error("%s: %s (keeping the last confirmation)", path, error)

    @property
    def identities(self) -> Mapping[str, Identity] | None:
        return None if self.loaded is None else self.loaded[0]

    def age(self, now: float) -> float | None:
        """Seconds since the last confirmation; None if there never was one."""
        return None if self.confirmed is None else max(0.0, now - self.confirmed)

    def too_old(self, now: float, bound: float | None) -> str | None:
        """Why every token is refused (None: it is not): the snapshot was not confirmed within
        ``bound`` seconds (--refuse-after; None: never refused for its age)."""
        if bound is None:
            return None
        age = self.age(now)
        if age is not None and age <= bound:
            return None
        since = "never confirmed" if age is None else f"last confirmed {age:.0f} s ago"
        return (
            f"the identity snapshot is {since}, over this node's bound of {bound:.0f} s "
            "(--refuse-after): every token is refused until the operator on this node "
            "confirms it again"
        )


def _certificate(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


class ClientPin:
    """Who may ask for reviews: a client certificate with kube-apiserver's subject, from the
    issuer of the one kubeadm wrote (the TLS handshake has checked the chain and the dates).

    Not one exact certificate: kubeadm renews it in place, and kube-apiserver re-reads its
    files only every few minutes, so for a while it presents the old one while the file holds
    the new one (both have the same subject and issuer). Nothing but kubeadm signs that
    subject with the cluster CA."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name: tuple[x509.Name, x509.Name] | None = None
        self._seen: Signature = None
        self._known: dict[bytes, bool] = {}

    def refresh(self) -> None:
        signature = hostfs.file_signature(self.path)
        if signature is None or signature == self._seen:
            return
        try:
            cert = _certificate(hostfs.read_bytes(self.path))
        except (HostError, ValueError) as error:
            log.error("%s: cannot read the client certificate to pin: %s", self.path, error)
            return
        self._seen = signature
        self.name = (cert.subject, cert.issuer)
        self._known = {}

    def allows(self, der: bytes | None) -> bool:
        if der is None or self.name is None:
            return False
        known = self._known.get(der)
        if known is None:
            try:
                cert = x509.load_der_x509_certificate(der)
                known = (cert.subject, cert.issuer) == self.name
            except ValueError:
                known = False
            if len(self._known) > 16:
                self._known.clear()
            self._known[der] = known
        return known


class ServingTls:
    """The TLS context new connections get. A renewed serving certificate makes a new context
    (the one in use is never changed under a handshake); a broken one keeps the last good."""

    def __init__(self, files: WebhookFiles) -> None:
        self.files = files
        self.context: ssl.SSLContext | None = None
        self._seen: tuple[Any, ...] | None = None
        self._lock = threading.Lock()

    def refresh(self) -> None:
        inputs = (self.files.serving_cert, self.files.serving_key, self.files.client_ca)
        seen = tuple(hostfs.file_signature(path) for path in inputs)
        if seen == self._seen:
            return
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            # Optional, not required: a probe without a certificate may ask the health routes
            # (no body is ever read from it); every review needs kube-apiserver's.
            context.verify_mode = ssl.CERT_OPTIONAL
            context.load_verify_locations(cadata=hostfs.read_bytes(self.files.client_ca).decode())
            context.load_cert_chain(self.files.serving_cert, self.files.serving_key)
        except (OSError, ssl.SSLError, HostError, UnicodeDecodeError) as error:
            if self.context is None:
                raise HostError(
                    f"cannot load the serving certificate {self.files.serving_cert} or the "
                    f"client CA {self.files.client_ca}: {error}"
                ) from None
            log.error("%s: %s (keeping the last good one)", self.files.serving_cert, error)
            return
        with self._lock:
            self.context, self._seen = context, seen
