"""``kube-audit ship``: this node's audit log, sent to the audit store, nothing lost.

kube-apiserver's log files are the buffer: nothing is copied to a second one, a position per
file (``core.shipping``) says how far the store has it, and the state file holding it is
rewritten atomically after each acknowledged batch. Whatever stops the shipper (SIGKILL, a
freeze while the log rotates, the store down), it resumes from what the store has kept.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from kube_audit import hostfs
from kube_audit.constants import SHIP_REPORT_FILE
from kube_audit.core.logsql import parse_store_time
from kube_audit.core.ship_report import ShipReport, render_ship_report
from kube_audit.core.shipping import (
    LogFile,
    ShipState,
    last_logged,
    parse_state,
    pending_bytes,
    plan_reads,
    record_ack,
    record_end,
    render_insert_params,
    render_state,
    settle,
    whole_lines,
)
from kube_audit.errors import HostError, StoreError
from kube_audit.logstore import LogStore

log = logging.getLogger(__name__)

STATE_FILE = "ship-state.json"
# How often the report is written while nothing changes: well within SHIP_STALLED_AFTER.
REPORT_EVERY = 5.0


@dataclass
class ShipMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.shipped_bytes = Counter(
            "kube_audit_ship_bytes", "Audit log bytes the store acknowledged", registry=r
        )
        self.lost_bytes = Counter(
            "kube_audit_ship_lost_bytes",
            "Audit log bytes removed from the node before the store had them (rotated away "
            "while the store was unreachable longer than the backups last)",
            registry=r,
        )
        self.lost_files = Counter(
            "kube_audit_ship_lost_files",
            "Audit log files removed from the node before they were shipped in full (a "
            "compressed one's missing bytes are not known: see kube_audit_ship_lost_bytes)",
            registry=r,
        )
        self.errors = Counter(
            "kube_audit_ship_errors", "Batches the store did not acknowledge", registry=r
        )
        self.pending = Gauge(
            "kube_audit_ship_pending_bytes",
            "Bytes of the node's audit log the store has not acknowledged",
            registry=r,
        )
        self.logged_until = Gauge(
            "kube_audit_ship_logged_until_seconds",
            "Event time (stageTimestamp, Unix seconds) of the last event the store acknowledged",
            registry=r,
        )
        self.last_success = Gauge(
            "kube_audit_ship_last_success_timestamp_seconds",
            "When the store last acknowledged a batch, or confirmed nothing was pending",
            registry=r,
        )


@dataclass(frozen=True)
class Held:
    """A file held open: its descriptor, and its name and first line when it was listed."""

    fd: int
    name: str
    first: bytes
    compressed: bool


@dataclass
class Shipper:
    """One node's shipper. ``monotonic`` and ``wall`` are injected: tests move time on."""

    folder: Path
    log_file: str
    state_dir: Path
    store: LogStore
    node: str
    cluster: str = ""
    keep_after: float = 10.0
    batch_bytes: int = 4 << 20
    metrics: ShipMetrics = field(default_factory=ShipMetrics)
    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    state: ShipState = field(init=False)
    resume_from_kept: bool = field(init=False, default=True)
    # What the report says (core.ship_report): the operator shows it on the AuditPolicies.
    last_error: str = field(init=False, default="")
    failing_since: float | None = field(init=False, default=None)
    logged_until: str = field(init=False, default="")
    pending: int = field(init=False, default=0)
    _reported: float | None = field(init=False, default=None)
    # Files not yet shipped in full, held open by fingerprint: a rotation that removes one
    # (--audit-log-maxbackup, -maxage, or the original of a .gz) while the store is down does
    # not take its content; their disk space is kept up to ``hold_max_bytes`` for removed ones.
    hold_max_bytes: int = 1 << 30
    _held: dict[str, Held] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        hostfs.ensure_dir(self.state_dir)
        path = self.state_dir / STATE_FILE
        try:
            self.state = parse_state(hostfs.read_optional(path))
        except ValueError as error:
            raise HostError(
                f"{path}: {error}; move it away to ship the folder from its start again"
            ) from None
        self.params = render_insert_params(self.node, self.cluster)
        self.logged_until = max(
            (p.logged_until for p in self.state.positions.values() if p.logged_until), default=""
        )

    def _listing(self) -> list[tuple[LogFile, Path, bytes]]:
        """The folder's files, oldest first, after the held ones it no longer lists."""
        found = hostfs.audit_log_identities(self.folder, self.log_file)
        listed = [
            (
                LogFile(
                    name=path.name,
                    fingerprint=hashlib.sha256(first).hexdigest()[:32],
                    size=size,
                    order=order,
                    compressed=path.name.endswith(".gz"),
                ),
                path,
                first,
            )
            for order, (path, first, size) in enumerate(found)
        ]
        present = {file.fingerprint for file, _, _ in listed}
        removed = [(f, h) for f, h in sorted(self._held.items(), key=lambda i: i[1].name)]
        removed = [(f, h) for f, h in removed if f not in present]
        held = [
            (
                LogFile(
                    name=held.name,
                    fingerprint=fingerprint,
                    size=-1 if held.compressed else hostfs.held_size(held.fd),
                    order=index - len(removed),
                    compressed=held.compressed,
                ),
                hostfs.held_path(held.fd),
                held.first,
            )
            for index, (fingerprint, held) in enumerate(removed)
        ]
        return held + listed

    def _hold(self, listing: list[tuple[LogFile, Path, bytes]]) -> None:
        """Hold open every file not shipped in full; let go of the others, and of the oldest
        removed ones past ``hold_max_bytes`` (they are then counted lost at the next look)."""
        in_folder = {f.fingerprint for f, path, _ in listing if path.parent == self.folder}
        for file, path, first in listing:
            position = self.state.positions.get(file.fingerprint)
            done = position is not None and 0 <= position.size <= position.acked
            held = self._held.get(file.fingerprint)
            if done and held is not None:
                hostfs.release_log(self._held.pop(file.fingerprint).fd)
            elif not done and held is None and path.parent == self.folder:
                fd = hostfs.hold_log(path, first, file.compressed)
                if fd is not None:
                    self._held[file.fingerprint] = Held(fd, file.name, first, file.compressed)
        listed = {f.fingerprint for f, _, _ in listing}
        gone = [f for f in self._held if f not in self.state.positions and f not in listed]
        for fingerprint in gone:
            hostfs.release_log(self._held.pop(fingerprint).fd)
        removed = [(f, h) for f, h in sorted(self._held.items(), key=lambda i: i[1].name)]
        removed = [(f, h) for f, h in removed if f not in in_folder]
        kept = sum(hostfs.held_size(h.fd) for _, h in removed)
        for fingerprint, held in removed:
            if kept <= self.hold_max_bytes:
                break
            log.error(
                "%s: removed by rotation before it was shipped; holding it would keep more "
                "than %d bytes of removed files: let go",
                held.name,
                self.hold_max_bytes,
            )
            kept -= hostfs.held_size(held.fd)
            hostfs.release_log(self._held.pop(fingerprint).fd)

    def poll(self) -> None:
        """Send everything new, oldest file first; ``StoreError`` when the store did not take
        a batch (sent again, from what the store has kept, at the next poll)."""
        listing = self._listing()
        files = [f for f, _, _ in listing]
        plan = plan_reads(files, self.state, resume_from_kept=self.resume_from_kept)
        self.resume_from_kept = False
        for name, missing in plan.lost:
            amount = (
                f"{missing} byte(s)" if missing >= 0 else "part (compressed: how much is not known)"
            )
            log.error("%s left %s before %s of it were shipped", name, self.folder, amount)
            self.metrics.lost_files.inc()
            self.metrics.lost_bytes.inc(max(missing, 0))
        self.state = plan.state
        where = {f.fingerprint: (path, first) for f, path, first in listing}
        try:
            # Before sending: a store that may have lost acknowledged rows since the last poll
            # (restarted, a storage node behind it failed) gets them again from the kept mark.
            self.store.check()
            for read in plan.reads:
                path, first = where[read.file.fingerprint]
                self._send(read.file, path, first, read.start)
        except StoreError:
            self.metrics.errors.inc()
            self.resume_from_kept = True
            raise
        finally:
            self.state = settle(self.state, self.monotonic(), self.keep_after)
            self._save()
            self._hold(listing)
            self.pending = pending_bytes(files, self.state)
            self.metrics.pending.set(self.pending)
        self.metrics.last_success.set(self.wall())

    def _send(self, file: LogFile, path: Path, first: bytes, start: int) -> None:
        """The file from ``start`` to its last whole line, batch by batch; a line the
        apiserver is still writing waits, and a line longer than a batch makes the batch grow."""
        with hostfs.open_log_reader(path, first, start, file.compressed) as reader:
            if reader is None:
                return  # renamed or compressed since the listing: the next poll finds it
            offset, pending, limit = start, b"", self.batch_bytes
            while True:
                data, at_end = reader.read(limit)
                block = pending + data
                lines = whole_lines(block)
                pending = block[len(lines) :]
                if lines:
                    self.store.insert(lines, self.params)
                    offset += len(lines)
                    until = last_logged(lines)
                    self.state = record_ack(
                        self.state, file.fingerprint, offset, self.monotonic(), until
                    )
                    self.metrics.shipped_bytes.inc(len(lines))
                    if until:
                        self.logged_until = until
                        self.metrics.logged_until.set(_unix(until))
                    self._save()
                if at_end:
                    break
        if file.compressed:  # read to its end: its content's size is known now
            self.state = record_end(self.state, file.fingerprint, offset)

    def _save(self) -> None:
        hostfs.write_atomic(self.state_dir / STATE_FILE, render_state(self.state), sync_dir=False)

    def run(
        self, stop: Callable[[], bool], sleep: Callable[[float], object], interval: float = 1.0
    ) -> None:
        """Poll until ``stop()``, every ``interval``; back off to 30 s while the store does not
        answer."""
        backoff = interval
        while not stop():
            try:
                self.poll()
                backoff = interval
                self._failed("")
            except StoreError as error:
                log.warning("%s; sending again from what the store has kept", error)
                self._failed(str(error))
                backoff = min(backoff * 2, 30.0)
                self._look_while_waiting(backoff, interval, stop, sleep)
                continue
            except HostError as error:
                log.error("%s", error)
                self._failed(str(error))
            sleep(interval)

    def _look_while_waiting(
        self,
        seconds: float,
        interval: float,
        stop: Callable[[], bool],
        sleep: Callable[[float], object],
    ) -> None:
        """Wait ``seconds`` for the store, looking at the folder every ``interval``: a file
        the rotation makes and removes meanwhile is held open before it goes."""
        waited = 0.0
        while waited < seconds and not stop():
            try:
                self._hold(self._listing())
            except HostError as error:
                log.error("%s", error)
            step = min(interval, seconds - waited)
            sleep(step)
            waited += step

    def _failed(self, error: str) -> None:
        """Note the outcome of a poll and write the report when it changed, or every
        REPORT_EVERY seconds (its age is how the cluster sees a shipper that stopped)."""
        changed = bool(error) != bool(self.last_error)
        self.last_error = error
        if not error:
            self.failing_since = None
        elif self.failing_since is None:
            self.failing_since = self.wall()
        now = self.monotonic()
        if changed or self._reported is None or now - self._reported >= REPORT_EVERY:
            self.write_report()
            self._reported = now

    def write_report(self) -> None:
        report = ShipReport(
            reported_at=self.wall(),
            logged_until=self.logged_until,
            pending_bytes=self.pending,
            last_error=self.last_error,
            failing_since=self.failing_since,
        )
        try:
            hostfs.write_atomic(
                self.state_dir / SHIP_REPORT_FILE, render_ship_report(report), sync_dir=False
            )
        except HostError as error:
            log.error("the ship report was not written: %s", error)


def read_ship_report(state_dir: Path) -> bytes | None:
    """The node's ship report as its shipper wrote it (None: no shipper on this node)."""
    try:
        return hostfs.read_optional(state_dir / SHIP_REPORT_FILE)
    except HostError as error:
        log.warning("the ship report was not read: %s", error)
        return None


def _unix(stage_timestamp: str) -> float:
    try:
        return parse_store_time(stage_timestamp).timestamp()
    except ValueError:
        return 0.0


def serve_metrics(metrics: ShipMetrics, address: str, port: int) -> None:
    start_http_server(port, addr=address, registry=metrics.registry)
