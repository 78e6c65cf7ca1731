"""Operator settings the core needs: where files live, log rotation, the privilege guard."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

# A Go time.Duration as kube-apiserver's flags take it (the webhook cache TTL).
GO_DURATION = re.compile(r"0|(?:[0-9]+(?:\.[0-9]*)?(?:ns|us|µs|ms|s|m|h))+")
_GO_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?)(ns|us|µs|ms|s|m|h)")
_GO_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}

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


def go_duration_seconds(value: str) -> float:
    """Seconds of a Go duration (``10s``, ``1m30s``, ``250ms``); ValueError if it is not one."""
    if not GO_DURATION.fullmatch(value):
        raise ValueError(f"{value!r} is not a Go duration (e.g. 10s, 1m30s)")
    return sum(float(amount) * _GO_UNIT[unit] for amount, unit in _GO_PART.findall(value))
