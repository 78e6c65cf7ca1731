"""The host's audit log files, read: kube-apiserver's log and its rotated backups listed,
read forward from a position through gzip, and held open so that a rotation's removal does not
take content the shipper has not sent (part of the one gateway to the host's files)."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
from collections.abc import Iterator
from pathlib import Path

from kube_audit.errors import HostError
from kube_audit.hostfs.files import _describe


def audit_log_files(folder: Path, log_file: str = "audit.log") -> list[Path]:
    """The current audit log and its rotated backups, oldest first.

    kube-apiserver rotates ``audit.log`` to ``audit-<timestamp>.log`` (optionally gzip-compressed);
    the timestamp sorts as text, and the current file is the newest.
    """
    stem, dot, ext = log_file.rpartition(".")
    stem, ext = (stem, f".{ext}") if dot else (log_file, "")
    rotated = [
        p
        for p in folder.iterdir()
        if p.is_file()
        and p.name.startswith(f"{stem}-")
        and (p.name.endswith(ext) or p.name.endswith(f"{ext}.gz"))
    ]
    current = folder / log_file
    return sorted(rotated, key=lambda p: p.name) + ([current] if current.is_file() else [])


def read_blocks(path: Path, size: int = 1 << 22) -> Iterator[bytes]:
    """A (possibly gzip-compressed) file in blocks of whole lines, streamed.

    Each block ends with a newline except, when the file does, the very last one.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            while True:
                chunk = handle.read(size)
                if not chunk:
                    break
                if not chunk.endswith(b"\n"):
                    chunk += handle.readline()  # the cut line's rest: one copy, not two
                yield chunk
    except (OSError, EOFError) as error:
        raise HostError(f"cannot read {path}: {error}") from None


_FIRST_LINE_MAX = 1 << 20


def _first_line(handle: gzip.GzipFile | io.BufferedReader) -> bytes | None:
    line = handle.readline(_FIRST_LINE_MAX)
    return line if line.endswith(b"\n") else None


def _open_log(path: Path, compressed: bool | None = None) -> gzip.GzipFile | io.BufferedReader:
    gz = path.name.endswith(".gz") if compressed is None else compressed
    return gzip.GzipFile(path, "rb") if gz else open(path, "rb")


def hold_log(path: Path, first_line: bytes, compressed: bool) -> int | None:
    """A descriptor that keeps the file's content readable after kube-apiserver's rotation
    removes it (``held_path``), if the file at ``path`` is still the one beginning with
    ``first_line``; None when it is not (renamed or removed since it was listed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise HostError(f"cannot open {path}: {_describe(error)}") from None
    try:
        with _open_log(held_path(fd), compressed) as handle:
            if _first_line(handle) == first_line:
                return fd
    except (OSError, EOFError):
        pass
    os.close(fd)
    return None


def held_path(fd: int) -> Path:
    """The held file, removed from its folder or not (Linux: the descriptor's /proc link)."""
    return Path(f"/proc/self/fd/{fd}")


def held_size(fd: int) -> int:
    """Bytes the held file takes on disk (what holding it keeps from being freed)."""
    return os.fstat(fd).st_size


def release_log(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def audit_log_identities(folder: Path, log_file: str) -> list[tuple[Path, bytes, int]]:
    """Each audit log file with its first line and content size (-1 for a ``.gz``), oldest
    first; a file without a whole first line yet (just created) is left for the next look."""
    try:
        paths = audit_log_files(folder, log_file)
    except OSError as error:
        raise HostError(f"cannot list {folder}: {_describe(error)}") from None
    found = []
    for path in paths:
        try:
            with _open_log(path) as handle:
                first = _first_line(handle)
                size = -1 if path.name.endswith(".gz") else os.fstat(handle.fileno()).st_size
        except FileNotFoundError:
            continue  # rotated away or compressed since the listing
        except (OSError, EOFError) as error:
            raise HostError(f"cannot read {path}: {_describe_any(error)}") from None
        if first is not None:
            found.append((path, first, size))
    return found


class LogReader:
    """One audit log file read forward from a position, through gzip where it is compressed:
    kept open across batches, so a ``.gz`` is decompressed once, not again from its start for
    each batch."""

    def __init__(self, path: Path, handle: gzip.GzipFile | io.BufferedReader) -> None:
        self.path = path
        self.handle = handle

    def read(self, limit: int) -> tuple[bytes, bool]:
        """Up to ``limit`` bytes, and whether the file's end was reached."""
        try:
            data = self.handle.read(limit)
        except (OSError, EOFError) as error:
            raise HostError(f"cannot read {self.path}: {_describe_any(error)}") from None
        return data, len(data) < limit


@contextlib.contextmanager
def open_log_reader(
    path: Path, first_line: bytes, start: int, compressed: bool | None = None
) -> Iterator[LogReader | None]:
    """A reader of the file's content from ``start``; None when the file at ``path`` is no
    longer the one that begins with ``first_line`` (renamed or removed since it was listed:
    look again). ``compressed`` None: as its name says (a held file's path has none)."""
    reader: LogReader | None = None
    handle: gzip.GzipFile | io.BufferedReader | None = None
    try:
        handle = _open_log(path, compressed)
        if _first_line(handle) == first_line:
            handle.seek(start)
            reader = LogReader(path, handle)
    except FileNotFoundError:
        reader = None
    except (OSError, EOFError) as error:
        if handle is not None:
            handle.close()
        raise HostError(f"cannot read {path}: {_describe_any(error)}") from None
    try:
        yield reader
    finally:
        if handle is not None:
            handle.close()


def _describe_any(error: OSError | EOFError) -> str:
    return _describe(error) if isinstance(error, OSError) else f"cut short ({error})"
