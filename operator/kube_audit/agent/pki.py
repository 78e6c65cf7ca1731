"""The webhook's own certificate authority and serving certificate (webhook mode).

kube-apiserver reads the CA in the webhook kubeconfig once, at start-up, so the CA is long-lived
and dedicated (never the cluster's: its key would let us mint admin client certificates), and
the serving certificate it signs is renewed well before expiry with no apiserver restart. Keys
are ECDSA P-256: small, fast, and accepted by Go's TLS.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from ipaddress import ip_address, ip_network
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_LIFETIME = timedelta(days=3650)
SERVING_LIFETIME = timedelta(days=365)
# Renewed this long before it expires: a node that is off for weeks still comes back valid.
RENEW_BEFORE = timedelta(days=90)
# Certificates start a little in the past: a node clock slightly behind ours still accepts them.
BACKDATE = timedelta(minutes=5)


class KeyPair(NamedTuple):
    """A certificate and its private key, both PEM."""

    cert: bytes
    key: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# What a webhook CA may sign for: the node's loopback, where the webhook serves. Should its key
# ever leak, a certificate from it is good for nothing else (Go's TLS, kube-apiserver's
# client, enforces name constraints).
LOOPBACK_ONLY = (x509.IPAddress(ip_network("127.0.0.1/32")),)


def generate_ca(
    now: datetime,
    name: str = "kube-audit authn-webhook CA",
    constrained_to: tuple[x509.GeneralName, ...] = LOOPBACK_ONLY,
) -> KeyPair:
    """A CA of its own (``constrained_to`` the names it may sign for; the tests' stand-in for
    the cluster CA passes none)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.NameConstraints(permitted_subtrees=[*constrained_to], excluded_subtrees=None),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(
    ca: KeyPair,
    now: datetime,
    *,
    common_name: str,
    hosts: tuple[str, ...] = (),
    client: bool = False,
    lifetime: timedelta = SERVING_LIFETIME,
) -> KeyPair:
    """A leaf certificate signed by ``ca``: for serving ``hosts`` (IP addresses or DNS names), or
    for a client (the tests' stand-in for the apiserver's own client certificate)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an ECDSA key")
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + lifetime, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def not_after(cert_pem: bytes) -> datetime:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def needs_renewal(cert_pem: bytes | None, ca_pem: bytes, now: datetime) -> bool:
    """A serving certificate that is missing, unreadable, not signed by ``ca_pem`` or within
    RENEW_BEFORE of its end is issued again."""
    if not cert_pem:
        return True
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return True
    return cert.not_valid_after_utc - now < RENEW_BEFORE
