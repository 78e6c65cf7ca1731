"""Operator settings the core needs: where files live, log rotation, the privilege guard."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

IdentityMode = Literal["token-file", "webhook"]
IDENTITY_MODES: tuple[IdentityMode, ...] = ("token-file", "webhook")


@dataclass(frozen=True)
class Settings:
    """Paths are as seen on the host (and, mounted at the same path, inside the apiserver)."""

    config_dir: str = "/etc/kubernetes/kube-audit"
    log_dir: str = "/var/log/kubernetes/audit"
    log_file: str = "audit.log"
    log_maxage: int = 30
    log_maxbackup: int = 10
    log_maxsize: int = 100
    # gzip rotated audit logs (--audit-log-compress); `who` reads .gz as well.
    log_compress: bool = False
    token_namespace: str = "kube-audit"
    allowed_system_groups: frozenset[str] = field(default_factory=frozenset)
    allowed_system_users: frozenset[str] = field(default_factory=frozenset)
    # How identities reach kube-apiserver: its --token-auth-file (a restart per change) or the
    # node-local TokenReview webhook (no restart per change).
    identity_mode: IdentityMode = "token-file"
    # --authentication-token-webhook-cache-ttl: how long a refused or removed token may still
    # be answered from the apiserver's cache (a Go duration).
    webhook_cache_ttl: str = "10s"
