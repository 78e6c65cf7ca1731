"""``kube-audit who``: stream audit logs, keep one result per request, print them in time order.

Memory stays bounded: results wait in a reorder window (by request time) so that a request's
later stages replace its earlier ones, and leave it oldest first once the window is full.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import orjson

from kube_audit import hostfs
from kube_audit.core.audit_query import (
    HEADER,
    STAGE_RANK,
    WIDE_HEADER,
    Query,
    is_compact,
    matches,
    may_match,
    render_table,
    table_row,
)
from kube_audit.errors import InvalidInput, Problem

WINDOW = 20_000


@dataclass
class Result:
    received: str
    rank: int
    raw: bytes


@dataclass
class Counters:
    """``lines``: lines examined (those the byte search found); ``corrupt``: unreadable ones."""

    lines: int = 0
    corrupt: int = 0
    results: int = 0


def log_files(paths: Iterable[str], log_file: str) -> list[Path]:
    files: list[Path] = []
    problems = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += hostfs.audit_log_files(path, log_file)
        elif path.is_file():
            files.append(path)
        else:
            problems.append(Problem(raw, "path", "no such audit log file or folder"))
    if problems:
        raise InvalidInput(problems)
    return files


def _anchor(sample: bytes, needles: tuple[tuple[bytes, ...], ...]) -> bytes | None:
    """The rarest single-valued needle in a sample: the one to search for, as grep would."""
    single = [group[0] for group in needles if len(group) == 1]
    return min(single, key=sample.count) if single else None


def candidate_lines(
    blocks: Iterable[bytes], needles: tuple[tuple[bytes, ...], ...]
) -> Iterator[bytes]:
    """Lines that may match: found by a C-level search for one needle, then checked for all."""
    anchor: bytes | None = None
    singles: tuple[bytes, ...] = ()
    multis = tuple(group for group in needles if len(group) > 1)
    for block in blocks:
        if anchor is None:
            anchor = _anchor(block[: 1 << 16], needles) or b""
            singles = tuple(g[0] for g in needles if len(g) == 1 and g[0] != anchor)
        if not anchor:
            for line in block.splitlines(keepends=True):
                if may_match(line, needles):
                    yield line
            continue
        pos, size, find, rfind = 0, len(block), block.find, block.rfind
        while (hit := find(anchor, pos)) >= 0:
            start = rfind(b"\n", 0, hit) + 1
            end = find(b"\n", hit)
            end = size if end < 0 else end + 1
            pos = end
            line = block[start:end]
            for needle in singles:
                if needle not in line:
                    break
            else:
                if not multis or may_match(line, multis):
                    yield line


def _needles(blocks: Iterator[bytes], query: Query) -> tuple[Iterator[bytes], tuple[Any, ...]]:
    """The keyed needles when the log's first line is compact JSON as the apiserver writes it,
    else the plain ones (a log someone re-formatted still matches)."""
    first = next(blocks, None)
    if first is None:
        return iter(()), query.needles
    line = first[: first.find(b"\n") + 1 or len(first)]
    needles = query.keyed_needles if is_compact(line) else query.needles
    return itertools.chain((first,), blocks), needles


def find_requests(blocks: Iterable[bytes], query: Query, counters: Counters) -> Iterator[Result]:
    """Matching requests, one per auditID at its latest stage, in request-time order.

    The hot loop of ``who``: locals are bound once, results kept as small lists.
    """
    pending: dict[str, list[Any]] = {}
    heap: list[tuple[str, str]] = []
    done: OrderedDict[str, None] = OrderedDict()
    loads, decode_error, rank_of = orjson.loads, orjson.JSONDecodeError, STAGE_RANK.get
    push = heapq.heappush
    examined = corrupt = 0
    blocks, needles = _needles(iter(blocks), query)
    for line in candidate_lines(blocks, needles):
        examined += 1
        try:
            event = loads(line)
        except decode_error:
            corrupt += bool(line.strip())
            continue
        if type(event) is not dict or "auditID" not in event:
            corrupt += 1
            continue
        if not matches(event, query):
            continue
        audit_id = event["auditID"]
        rank = rank_of(event.get("stage") or "", -1)
        seen = pending.get(audit_id)
        if seen is not None:
            if rank >= seen[1]:
                seen[1], seen[2] = rank, line
            continue
        if audit_id in done:
            continue
        received = event.get("requestReceivedTimestamp") or ""
        pending[audit_id] = [received, rank, line]
        push(heap, (received, audit_id))
        if len(pending) > WINDOW:
            counters.lines, counters.corrupt = examined, corrupt
            yield _pop(heap, pending, done)
    counters.lines, counters.corrupt = examined, corrupt
    while heap:
        yield _pop(heap, pending, done)


def _pop(
    heap: list[tuple[str, str]], pending: dict[str, list[Any]], done: OrderedDict[str, None]
) -> Result:
    _, audit_id = heapq.heappop(heap)
    done[audit_id] = None
    if len(done) > WINDOW:
        done.popitem(last=False)
    received, rank, raw = pending.pop(audit_id)
    return Result(received, rank, raw)


def run_who(
    paths: Iterable[str], query: Query, *, output: str, out: TextIO, err: TextIO, log_file: str
) -> int:
    paths = list(paths)
    files = log_files(paths, log_file)
    if not files:
        raise InvalidInput(
            [
                Problem(
                    ", ".join(paths),
                    "path",
                    f"holds no audit log files ({log_file} or its rotated copies): is this the "
                    "folder of --audit-log-path?",
                )
            ]
        )
    counters = Counters()
    blocks = (block for path in files for block in hostfs.read_blocks(path))
    results = find_requests(blocks, query, counters)
    if output == "json":
        sink = out.buffer if hasattr(out, "buffer") else None
        for result in results:
            counters.results += 1
            raw = result.raw if result.raw.endswith(b"\n") else result.raw + b"\n"
            if sink is not None:
                sink.write(raw)
            else:
                out.write(raw.decode("utf-8", "replace"))
    else:
        wide = output == "wide"
        rows = []
        for result in results:
            counters.results += 1
            rows.append(table_row(orjson.loads(result.raw), wide))
        if rows:
            out.write(render_table(rows, WIDE_HEADER if wide else HEADER))
    if counters.corrupt:
        err.write(
            f"kube-audit: skipped {counters.corrupt} corrupt or truncated line(s) among "
            f"{counters.lines} that could match, in {len(files)} file(s); results may miss them\n"
        )
    if not counters.results and output != "json":
        err.write(f"no matching requests in {len(files)} file(s)\n")
    return 0
