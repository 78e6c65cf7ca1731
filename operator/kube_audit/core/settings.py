"""Operator settings the core needs: where files live, log rotation, the privilege guard."""

from __future__ import annotations

from dataclasses import dataclass, field


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
