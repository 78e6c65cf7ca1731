"""The node agent's record of a node (``state.json``: last good hash, the wait in progress,
failures, an admin's rollback) and what each entry point reports."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from kube_audit import hostfs
from kube_audit.agent.layout import HostLayout
from kube_audit.constants import KEEP_FAILED
from kube_audit.core.retry import Failure

Outcome = Literal["unchanged", "applied", "rolled-back", "held", "uninstalled"]


@dataclass(frozen=True)
class NodeResult:
    outcome: Outcome
    config_hash: str
    message: str
    restarted: bool = False


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_state(layout: HostLayout) -> dict[str, Any]:
    """The agent's record of this node: last good hash, pending change, failed hashes."""
    data = hostfs.read_optional(layout.state_file)
    if data is None:
        return {}
    try:
        state = json.loads(data)
    except json.JSONDecodeError:
        return {}
    return state if isinstance(state, dict) else {}


def failures_of(state: dict[str, Any]) -> dict[str, Failure]:
    """Failed config hash -> its failures, oldest first. A plain ``failed`` list (written by
    0.1.0) counts as crashes: held until the inputs change, as that version did."""
    found: dict[str, Failure] = {
        h: Failure(1, 0.0, True, "recorded by an earlier version")
        for h in state.get("failed", [])
        if isinstance(h, str)
    }
    records = state.get("failures")
    for config_hash, record in (records if isinstance(records, dict) else {}).items():
        try:
            found[config_hash] = Failure(
                int(record["count"]),
                float(record["at"]),
                bool(record["crashed"]),
                str(record.get("reason", "")),
            )
        except (KeyError, TypeError, ValueError):
            continue
    return found


def with_failures(state: dict[str, Any], failures: dict[str, Failure]) -> dict[str, Any]:
    kept = list(failures.items())[-KEEP_FAILED:]
    rest = {k: v for k, v in state.items() if k != "failed"}
    return {**rest, "failures": {h: asdict(f) for h, f in kept}}


def record_failure(
    state: dict[str, Any], config_hash: str, *, crashed: bool, reason: str, at: float
) -> dict[str, Any]:
    failures = failures_of(state)
    earlier = failures.pop(config_hash, None)
    count = (earlier.count if earlier else 0) + 1
    failures[config_hash] = Failure(count, at, crashed, reason)
    return with_failures(state, failures)


def write_state(layout: HostLayout, state: dict[str, Any]) -> None:
    hostfs.ensure_dir(layout.state_dir)
    hostfs.write_atomic(layout.state_file, json.dumps(state, indent=2, sort_keys=True).encode())


def record(state: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**state, **changes}
