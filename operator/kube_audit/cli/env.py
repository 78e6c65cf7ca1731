"""Flags fall back to ``KUBE_AUDIT_*`` environment variables (the DaemonSet sets them). A value
that does not parse is one clear error naming the variable, never a traceback."""

from __future__ import annotations

import os

from kube_audit.errors import InvalidInput, Problem

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off", ""})


def _bad(name: str, value: str, want: str) -> InvalidInput:
    return InvalidInput([Problem("environment", name, f"{value!r} is not {want}")])


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise _bad(name, value, "a number of seconds (e.g. 180)") from None


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise _bad(name, value, "a whole number") from None


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    if value.strip().lower() in TRUE:
        return True
    if value.strip().lower() in FALSE:
        return False
    raise _bad(name, value, "a boolean (1/0, true/false, yes/no, on/off)")


def env_list(name: str) -> list[str] | None:
    """A comma-separated list; None when unset or empty."""
    items = [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]
    return items or None
