"""The one gateway to the filesystem: atomic writes, backups, the host lock.

Every temporary name starts with ``.`` because kubelet runs every other file in the static pod
folder; a failed write removes its temporary file before the error leaves this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kube_audit.errors import HostError, LockBusy

_TMP_MARK = ".kube-audit-tmp"


def _describe(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "no space left on device"
    if error.errno == errno.EROFS:
        return "read-only file system"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return error.strerror or str(error)


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise HostError(f"cannot read {path}: {_describe(error)}") from None


def read_optional(path: Path) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise HostError(f"cannot read {path}: {_describe(error)}") from None


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime in ns, size): changes whenever the file is rewritten or replaced."""
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path, mode: int = 0o700) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
    except OSError as error:
        raise HostError(f"cannot create folder {path}: {_describe(error)}") from None


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *, sync_dir: bool = True) -> None:
    """Temporary dot-file in the same folder, fsync, rename over ``path``, fsync the folder.

    A reader sees the old bytes or the new bytes, never a mix; on any error the old file is
    untouched and the temporary file is gone.
    """
    tmp = path.with_name(f".{path.name}{_TMP_MARK}-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        if sync_dir:
            _fsync_dir(path.parent)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise HostError(f"cannot write {path}: {_describe(error)}; it was left as it was") from None


def remove_stale_temporaries(folder: Path) -> None:
    """Remove temporary files a killed writer left behind (only ours, by their mark)."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.startswith(".") and _TMP_MARK in entry.name:
            with contextlib.suppress(OSError):
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one step (renameat2 RENAME_EXCHANGE): replacing a folder that a running
    manifest names must never leave a moment without it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE):
        code = ctypes.get_errno()
        raise OSError(code, f"renameat2(RENAME_EXCHANGE): {os.strerror(code)}")


def write_folder_atomic(path: Path, files: dict[str, bytes], mode: int = 0o600) -> None:
    """Make folder ``path`` hold exactly ``files``, all at once: built aside, then renamed into
    place or, when ``path`` exists (a repair), swapped with it in one step."""
    tmp = path.with_name(f".{path.name}{_TMP_MARK}-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(mode=0o700)
        for name, data in files.items():
            write_atomic(tmp / name, data, mode, sync_dir=False)
        _fsync_dir(tmp)
        if path.exists():
            _exchange(tmp, path)
            _fsync_dir(path.parent)
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, path)
            _fsync_dir(path.parent)
    except OSError as error:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise HostError(f"cannot write {path}: {_describe(error)}") from None
    except HostError:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise


CAP_CHOWN = 0


def can_give_files() -> bool:
    """Whether this process may give files to another user: CAP_CHOWN in its effective set.
    The DaemonSet's container drops every capability, so there it may not."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_CHOWN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


def give_to(paths: list[Path], owner: tuple[int, int]) -> None:
    """chown each path (a folder: with its files) to (uid, gid), for a non-root apiserver."""
    uid, gid = owner
    try:
        for path in paths:
            if not path.exists():
                continue
            os.chown(path, uid, gid)
            if path.is_dir():
                for entry in path.iterdir():
                    if entry.is_file():
                        os.chown(entry, uid, gid)
    except OSError as error:
        raise HostError(f"cannot give {path} to uid {uid}: {_describe(error)}") from None


def read_folder(path: Path) -> dict[str, bytes] | None:
    """Regular files of a folder by name, or None if the folder does not exist."""
    if not path.is_dir():
        return None
    try:
        return {e.name: e.read_bytes() for e in sorted(path.iterdir()) if e.is_file()}
    except OSError as error:
        raise HostError(f"cannot read {path}: {_describe(error)}") from None


def list_dirs(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    return sorted(e for e in path.iterdir() if e.is_dir() and not e.name.startswith("."))


def remove_tree(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    except OSError as error:
        raise HostError(f"cannot remove {path}: {_describe(error)}") from None


@contextlib.contextmanager
def host_lock(path: Path, wait_seconds: float = 30.0) -> Iterator[None]:
    """An exclusive flock, so two writers (two pods, a pod and a person) never interleave."""
    deadline = time.monotonic() + wait_seconds

    def busy() -> bool:
        if time.monotonic() >= deadline:
            raise LockBusy(f"another kube-audit writer holds {path}; try again when it is done")
        time.sleep(0.05)
        return False

    fd = take_lock(path, busy)
    if fd is None:  # busy never gives up, it raises: for the type checker
        raise LockBusy(f"{path}: not taken")
    try:
        yield
    finally:
        os.close(fd)


def take_lock(path: Path, busy: Callable[[], bool]) -> int | None:
    """An exclusive flock, its descriptor returned: the caller closes it, or holds it for the
    rest of the process (the kernel lets go when the process ends, however it ends: one holder
    per node though two pods run there for a moment). ``busy`` is called while another process
    holds it and returns True to give up (a signal came): None then; what it raises is raised,
    the descriptor closed."""
    ensure_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise HostError(f"cannot open {path}: {_describe(error)}") from None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            try:
                given_up = busy()
            except BaseException:
                os.close(fd)
                raise
            if given_up:
                os.close(fd)
                return None
