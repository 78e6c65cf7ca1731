"""An audit log written as kube-apiserver's lumberjack writes it: appended, rotated by size to
``audit-<time>.log`` (same inode), optionally gzipped (a new file, the original removed), the
oldest backups removed beyond a count. The tests of shipping drive it through their faults."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson


class RotatingLog:
    def __init__(
        self,
        folder: Path,
        max_bytes: int,
        *,
        compress: bool = False,
        max_backups: int | None = None,
    ) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.compress = compress
        self.max_backups = max_backups
        self.rotations = 0
        self._stamp = datetime(2026, 11, 1, tzinfo=UTC)
        folder.mkdir(parents=True, exist_ok=True)
        self.live = folder / "audit.log"
        self._handle = open(self.live, "ab")  # noqa: SIM115

    def write(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            if self._handle.tell() + len(line) > self.max_bytes and self._handle.tell():
                self.rotate()
            self._handle.write(line)
        self._handle.flush()

    def rotate(self) -> Path:
        """lumberjack's rotation: the live file renamed to a backup, a new one opened."""
        self._handle.close()
        self._stamp += timedelta(seconds=1)
        backup = self.folder / f"audit-{self._stamp.strftime('%Y-%m-%dT%H-%M-%S.000')}.log"
        os.rename(self.live, backup)
        self._handle = open(self.live, "ab")  # noqa: SIM115
        self.rotations += 1
        if self.compress:
            with open(backup, "rb") as src, gzip.open(f"{backup}.gz", "wb") as dst:
                dst.write(src.read())
            backup.unlink()
            backup = backup.with_name(backup.name + ".gz")
        if self.max_backups is not None:
            backups = sorted(p for p in self.folder.iterdir() if p.name.startswith("audit-"))
            for old in backups[: max(0, len(backups) - self.max_backups)]:
                old.unlink()
        return backup

    def close(self) -> None:
        self._handle.close()


def audit_ids(lines: Iterable[bytes]) -> set[str]:
    return {str(orjson.loads(line)["auditID"]) for line in lines if line.strip()}
