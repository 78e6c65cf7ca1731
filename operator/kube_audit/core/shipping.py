"""What ``kube-audit ship`` sends next, and what it may count as kept. Pure.

A log file is known by its first line (its ``fingerprint``), not by its name or inode:
kube-apiserver renames ``audit.log`` to ``audit-<time>.log`` at rotation, and gzips it to
``audit-<time>.log.gz`` (a new inode) with ``--audit-log-compress``; the first line, which holds
a unique auditID, stays. So a file is followed through both, however many rotations pass while
the shipper is stopped, frozen or behind, and a file is never sent twice for having moved.

An acknowledgement is not durability: VictoriaLogs keeps acknowledged rows in memory for up to
``-inmemoryDataFlushInterval`` (5 s) before a crash cannot lose them. Each file therefore has two
positions: ``acked`` (the store said yes) and ``kept`` (said yes at least ``keep_after`` ago).
After the store fails or the shipper restarts, sending resumes from ``kept``: a few seconds sent
twice, which ``who`` counts once, instead of rows lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

STATE_VERSION = 1


@dataclass(frozen=True)
class LogFile:
    """A file in the audit log folder as listed now: ``size`` is of its content (-1 for a
    ``.gz``: unknown until read), ``order`` its place from oldest (0) to the live file."""

    name: str
    fingerprint: str
    size: int
    order: int
    compressed: bool = False


@dataclass(frozen=True)
class Position:
    """How far one file is shipped. ``acks`` are (monotonic time, offset) of acknowledgements
    not yet counted as kept, oldest first."""

    fingerprint: str
    name: str
    kept: int = 0
    acked: int = 0
    acks: tuple[tuple[float, int], ...] = ()
    logged_until: str = ""
    # The file's content size when last seen (-1: a .gz not yet read to its end); ``final``
    # once a .gz was read to its end (an uncompressed file may still grow before rotation).
    size: int = -1
    final: bool = False


@dataclass(frozen=True)
class ShipState:
    positions: Mapping[str, Position] = field(default_factory=dict)


@dataclass(frozen=True)
class Read:
    """Send ``file`` from ``start`` on."""

    file: LogFile
    start: int


@dataclass(frozen=True)
class Plan:
    reads: tuple[Read, ...]
    # Files that left the folder before being shipped in full: (name, bytes never sent; -1
    # for a .gz not read to its end, whose size is not known).
    lost: tuple[tuple[str, int], ...]
    state: ShipState


def plan_reads(files: Sequence[LogFile], state: ShipState, *, resume_from_kept: bool) -> Plan:
    """What to send, oldest file first. A file not seen before is sent from its start (a new
    file, or the backlog at the first start); one no longer in the folder is forgotten, and
    named in ``lost`` when it was not shipped in full. ``resume_from_kept`` after a failure or
    a restart: acknowledgements not yet kept are sent again."""
    present: dict[str, LogFile] = {}
    for file in files:  # a .gz being written beside its original: the original is read
        if file.fingerprint not in present or present[file.fingerprint].compressed:
            present[file.fingerprint] = file
    files = list(present.values())
    positions: dict[str, Position] = {}
    lost = []
    for fingerprint, known in state.positions.items():
        current = present.get(fingerprint)
        if current is None:
            if known.size > known.acked:
                lost.append((known.name, known.size - known.acked))
            elif known.size < 0:  # a .gz removed before it was read to its end: how much
                lost.append((known.name, -1))  # is not known
            continue
        acked, acks = (known.kept, ()) if resume_from_kept else (known.acked, known.acks)
        # a compressed file's size is known only once it was read to its end
        size = current.size if not current.compressed else known.size if known.final else -1
        positions[fingerprint] = replace(
            known, name=current.name, size=size, acked=acked, acks=acks
        )
    reads = []
    for file in sorted(files, key=lambda f: f.order):
        position = positions.setdefault(
            file.fingerprint, Position(file.fingerprint, file.name, size=file.size)
        )
        if position.size < 0 or position.acked < position.size:
            reads.append(Read(file, position.acked))
    return Plan(tuple(reads), tuple(lost), ShipState(positions))


def record_end(state: ShipState, fingerprint: str, size: int) -> ShipState:
    """A compressed file was read to its end: its content is ``size`` bytes."""
    position = replace(state.positions[fingerprint], size=size, final=True)
    return ShipState({**state.positions, fingerprint: position})


def record_ack(
    state: ShipState, fingerprint: str, offset: int, now: float, logged_until: str
) -> ShipState:
    """The store acknowledged a file up to ``offset`` at ``now``."""
    position = state.positions[fingerprint]
    updated = replace(
        position,
        acked=offset,
        acks=(*position.acks, (now, offset)),
        logged_until=logged_until or position.logged_until,
    )
    return ShipState({**state.positions, fingerprint: updated})


def unsettled(state: ShipState) -> bool:
    """Whether some acknowledged lines are not yet counted as kept."""
    return any(p.acks for p in state.positions.values())


def settle(state: ShipState, now: float, keep_after: float) -> ShipState:
    """Acknowledgements older than ``keep_after`` count as kept."""
    positions = {}
    for fingerprint, position in state.positions.items():
        kept, acks = position.kept, list(position.acks)
        while acks and acks[0][0] <= now - keep_after:
            kept = max(kept, acks.pop(0)[1])
        positions[fingerprint] = replace(position, kept=kept, acks=tuple(acks))
    return ShipState(positions)


def whole_lines(block: bytes) -> bytes:
    """The block up to its last newline: a line the apiserver is still writing waits."""
    end = block.rfind(b"\n")
    return block[: end + 1] if end >= 0 else b""


def last_logged(block: bytes) -> str:
    """The last line's stageTimestamp (the event time the shipment reached), or ""."""
    end = len(block.rstrip(b"\n"))
    start = block.rfind(b"\n", 0, end) + 1
    line = block[start:end]
    marker = b'"stageTimestamp":"'
    at = line.rfind(marker)
    if at < 0:
        return ""
    value_start = at + len(marker)
    return line[value_start : line.find(b'"', value_start)].decode("ascii", "replace")


def render_insert_params(node: str, cluster: str) -> dict[str, str]:
    """The query of ``/insert/jsonline``: the event time is when the stage was logged, the node
    and cluster are stream fields on every row."""
    extra = [f"node={node}"] + ([f"cluster={cluster}"] if cluster else [])
    return {
        "_time_field": "stageTimestamp",
        "_stream_fields": "node,cluster" if cluster else "node",
        "extra_fields": ",".join(extra),
    }


def render_state(state: ShipState) -> bytes:
    """The state file: only what survives a restart (positions resume from ``kept``)."""
    positions = [
        {
            "fingerprint": p.fingerprint,
            "name": p.name,
            "kept": p.kept,
            "acked": p.acked,
            "size": p.size,
            "final": p.final,
            "loggedUntil": p.logged_until,
        }
        for p in sorted(state.positions.values(), key=lambda p: p.name)
    ]
    return orjson.dumps({"version": STATE_VERSION, "files": positions}, option=orjson.OPT_INDENT_2)


def parse_versioned(data: bytes | str, version: int, what: str) -> dict[str, Any]:
    """A JSON object of ours with its ``version``; ValueError saying what it is not."""
    try:
        raw: Any = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error}") from None
    if not isinstance(raw, dict) or raw.get("version") != version:
        raise ValueError(f"not a version {version} {what}")
    return raw


def parse_state(data: bytes | None) -> ShipState:
    """The state file back; ValueError when it is not one (the caller says where)."""
    if not data:
        return ShipState()
    raw = parse_versioned(data, STATE_VERSION, "ship state")
    positions = {}
    for item in raw.get("files") or []:
        try:
            p = _position(item)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"a bad file entry ({error!r})") from None
        positions[p.fingerprint] = p
    return ShipState(positions)


def _position(item: Any) -> Position:
    return Position(
        fingerprint=str(item["fingerprint"]),
        name=str(item["name"]),
        kept=int(item["kept"]),
        acked=int(item["acked"]),
        logged_until=str(item.get("loggedUntil") or ""),
        size=int(item.get("size", -1)),
        final=bool(item.get("final", False)),
    )


def pending_bytes(files: Iterable[LogFile], state: ShipState) -> int:
    """Bytes in the folder not yet acknowledged (compressed files not counted: size unknown)."""
    total = 0
    for file in files:
        position = state.positions.get(file.fingerprint)
        if not file.compressed:
            total += file.size - (position.acked if position else 0)
    return total


@dataclass(frozen=True)
class StoreVitals:
    """What the store's ``/metrics`` tells of failures an insert cannot see: when the process
    started, and (a vlinsert) how often sending to its storage nodes failed. A vlinsert answers
    an insert before its storage nodes have the rows, so a vlstorage killed with rows in memory
    shows only here. ``last_error_at`` is when they last grew (monotonic seconds)."""

    started: float
    send_errors: float
    last_error_at: float | None = None


ERRORS_QUIET = 30.0
"""Seconds without a new send error after which the next one is a new failure: a vlstorage
that is down adds errors each time the vlinsert tries it (every 10 s per block), and its rows
meanwhile go to the other nodes, lost by nobody."""


def parse_store_vitals(text: str) -> StoreVitals:
    started, errors = 0.0, 0.0
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == "process_start_time_seconds":
            started = _number(value)
        elif name.startswith("vl_insert_remote_send_errors_total"):
            errors += _number(value)
    return StoreVitals(started, errors)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def plan_store_failure(
    before: StoreVitals | None, now: StoreVitals, at: float
) -> tuple[StoreVitals, str]:
    """The vitals to keep and, when the store may have lost acknowledged rows since ``before``,
    why: it restarted, or its send errors began to grow (again, after ``ERRORS_QUIET``)."""
    if before is None:
        return now, ""
    increased = now.send_errors > before.send_errors
    kept = replace(now, last_error_at=at if increased else before.last_error_at)
    if now.started != before.started:
        return kept, f"the store restarted (started at {now.started:.0f}, was {before.started:.0f})"
    quiet = before.last_error_at is None or at - before.last_error_at > ERRORS_QUIET
    if increased and quiet:
        return kept, "a storage node behind the store failed (vl_insert_remote_send_errors_total)"
    return kept, ""
