"""``kube-audit who``: stream audit logs, keep one result per request, print them in time order.

Memory stays bounded: results wait in a reorder window (by request time) so that a request's
later stages replace its earlier ones, and leave it oldest first once the window is full.
"""

from __future__ import annotations

import heapq
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import orjson

from kube_audit import hostfs
from kube_audit.constants import WHO_LAG_SECONDS, WHO_WINDOW
from kube_audit.core.audit_query import (
    HEADER,
    STAGE_RANK,
    WIDE_HEADER,
    GrowingTable,
    Query,
    is_compact,
    matches,
    may_match,
    table_row,
)
from kube_audit.errors import HostError, InvalidInput, PartialAnswer, Problem

WINDOW = WHO_WINDOW
LAG_SECONDS = WHO_LAG_SECONDS


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


@dataclass(frozen=True)
class _Search:
    """How to find the lines that may match, chosen once from the log's first block."""

    needles: tuple[tuple[bytes, ...], ...]
    anchor: bytes
    singles: tuple[bytes, ...]
    multis: tuple[tuple[bytes, ...], ...]

    @classmethod
    def for_log(cls, first: bytes, query: Query) -> _Search:
        """Keyed needles when the log's first line is compact JSON as the apiserver writes it,
        else the plain ones (a log someone re-formatted still matches)."""
        line = first[: first.find(b"\n") + 1 or len(first)]
        needles = query.keyed_needles if is_compact(line) else query.needles
        anchor = _anchor(first[: 1 << 16], needles) or b""
        return cls(
            needles=needles,
            anchor=anchor,
            singles=tuple(g[0] for g in needles if len(g) == 1 and g[0] != anchor),
            multis=tuple(group for group in needles if len(group) > 1),
        )

    def lines(self, block: bytes) -> Iterator[bytes]:
        """Lines that may match: found by a C-level search for one needle, then checked for
        all."""
        anchor, singles, multis = self.anchor, self.singles, self.multis
        if not anchor:
            for line in block.splitlines(keepends=True):
                if may_match(line, self.needles):
                    yield line
            return
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


_STAGE_TIME = re.compile(rb'"stageTimestamp":\s*"([^"]+)"')


def _log_time_cutoff(block: bytes, lag: float) -> str | None:
    """``lag`` seconds before the time the log has reached where ``block`` starts (its first
    line's stageTimestamp), written as kube-apiserver writes timestamps so that it compares
    with ``requestReceivedTimestamp`` as a string. None when the line carries no time."""
    found = _STAGE_TIME.search(block, 0, block.find(b"\n") + 1 or len(block))
    if found is None:
        return None
    try:
        at = datetime.fromisoformat(found.group(1).decode())
    except ValueError:
        return None
    return (at - timedelta(seconds=lag)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def find_requests(
    blocks: Iterable[bytes], query: Query, counters: Counters, lag: float = LAG_SECONDS
) -> Iterator[Result]:
    """Matching requests, one per auditID at its latest stage, in request-time order, each as
    soon as the log has moved ``lag`` seconds past it (so ``who | head`` answers at once).

    A request still running then (a long watch) is given at the stage it had reached. The hot
    loop of ``who``: locals are bound once, results kept as small lists.
    """
    pending: dict[str, list[Any]] = {}
    heap: list[tuple[str, str]] = []
    done: OrderedDict[str, None] = OrderedDict()
    loads, decode_error, rank_of = orjson.loads, orjson.JSONDecodeError, STAGE_RANK.get
    push = heapq.heappush
    search: _Search | None = None
    for block in blocks:
        if search is None:
            search = _Search.for_log(block, query)
        elif heap and (cutoff := _log_time_cutoff(block, lag)) is not None:
            while heap and heap[0][0] < cutoff:
                yield _pop(heap, pending, done)
        examined = corrupt = 0
        for line in search.lines(block):
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
                yield _pop(heap, pending, done)
        counters.lines += examined
        counters.corrupt += corrupt
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


def _read_logs(files: list[Path], skipped: list[str], out: TextIO) -> Iterator[bytes]:
    """Every file's blocks in turn. A file that is not an audit log, or a corrupt or truncated
    gzip, is named in ``skipped`` and the others still answered; ``out`` is flushed before each
    block is read, so rows reach a pipe (``who | head``) as they are found."""
    for path in files:
        try:
            for index, block in enumerate(hostfs.read_blocks(path)):
                if index == 0 and not looks_like_audit_log(block):
                    skipped.append(
                        f"{path}: not an audit log (its first line is not a kube-apiserver "
                        "audit event)"
                    )
                    break
                out.flush()
                yield block
        except HostError as error:
            skipped.append(f"{error}: the rest of that file is skipped")


def looks_like_audit_log(block: bytes) -> bool:
    """Whether a file's first line is an audit event (JSON with an auditID), or at least looks
    like a cut one: a log's first line is whole unless someone edited the file."""
    line = block[: block.find(b"\n") + 1 or len(block)]
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return b'"auditID"' in line
    return isinstance(event, dict) and "auditID" in event


def run_who(
    paths: Iterable[str], query: Query, *, output: str, out: TextIO, err: TextIO, log_file: str
) -> int:
    """Rows are printed as they are found (see ``find_requests``); a file that could not be
    read is named on ``err`` and ends in ``PartialAnswer`` after the others' answers."""
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
    skipped: list[str] = []
    results = find_requests(_read_logs(files, skipped, out), query, counters)
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
        table = GrowingTable(WIDE_HEADER if wide else HEADER)
        for result in results:
            if not counters.results:
                out.write(table.line(table.header))
            counters.results += 1
            out.write(table.line(table_row(orjson.loads(result.raw), wide)))
    out.flush()
    if counters.corrupt:
        err.write(
            f"kube-audit: skipped {counters.corrupt} corrupt or truncated line(s) among "
            f"{counters.lines} that could match, in {len(files)} file(s); results may miss them\n"
        )
    for why in skipped:
        err.write(f"kube-audit: warning: {why}\n")
    if not counters.results and output != "json":
        err.write(f"no matching requests in {len(files) - len(skipped)} file(s)\n")
    if skipped:
        raise PartialAnswer(
            f"partial answer: {len(skipped)} of {len(files)} file(s) could not be read in full"
        )
    return 0
