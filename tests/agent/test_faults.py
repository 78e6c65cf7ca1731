"""Killed between any two steps, disk full, read-only, a second writer: never a mix."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kube_audit import hostfs
from kube_audit.agent.apply import apply_node
from kube_audit.agent.layout import HostLayout
from kube_audit.agent.rollback import rollback_node
from kube_audit.agent.uninstall import uninstall_node
from kube_audit.core.manifest import config_hash_of, flag_value, parse_manifest
from kube_audit.core.plan import DesiredState
from kube_audit.errors import HostError, LockBusy
from tests.agent.conftest import OTHER_PODS, desired

MUTATING = ("rename", "write", "mkdir", "unlink", "rmdir", "fsync", "open")


class Killed(BaseException):
    """Like SIGKILL: no except-clause of ours runs."""


@contextmanager
def kill_at(monkeypatch: pytest.MonkeyPatch, step: int | None) -> Iterator[list[str]]:
    """Count host-mutating system calls; raise Killed at call number ``step``."""
    calls: list[str] = []
    originals = {name: getattr(os, name) for name in MUTATING}

    def wrap(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def inner(*args: Any, **kwargs: Any) -> Any:
            if name == "open" and not (len(args) > 1 and args[1] & (os.O_WRONLY | os.O_RDWR)):
                return func(*args, **kwargs)
            if step is not None and len(calls) == step:
                raise Killed(f"killed before {name}")
            calls.append(name)
            return func(*args, **kwargs)

        return inner

    with monkeypatch.context() as m:
        for name, func in originals.items():
            m.setattr(os, name, wrap(name, func))
        yield calls


def _state_of(layout: HostLayout, choices: dict[str, DesiredState]) -> str:
    """Which desired state the host runs; fails if it is a mix."""
    manifest = parse_manifest(layout.manifest.read_text())
    found = config_hash_of(manifest)
    for name, want in choices.items():
        if found == want.config_hash:
            for flag, file in (
                ("--token-auth-file", "tokens.csv"),
                ("--audit-policy-file", "audit-policy.yaml"),
            ):
                path = flag_value(manifest, flag)
                assert path is not None
                assert layout.host(path).read_bytes() == want.files[file], f"{name}: {file} mixed"
            return name
    raise AssertionError(f"manifest runs unknown config {found}")


def _no_litter(layout: HostLayout) -> None:
    names = sorted(p.name for p in layout.static_pod_dir.iterdir())
    assert names == sorted([*OTHER_PODS, "kube-apiserver.yaml"]), names


def test_killed_between_any_two_steps(layout: HostLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = desired("alice"), desired("alice", "bob")
    apply_node(layout, old, None)
    pristine = {p: p.read_bytes() for p in layout.root.rglob("*") if p.is_file()}
    with kill_at(monkeypatch, None) as calls:
        apply_node(layout, new, None)
    total = len(calls)
    assert total > 10
    seen = set()
    for step in range(total):
        for p in list(layout.root.rglob("*"))[::-1]:
            if p.is_file() and p not in pristine:
                p.unlink()
            elif (
                p.is_dir()
                and not any(p.iterdir())
                and not any(q.is_relative_to(p) for q in pristine)
            ):
                p.rmdir()
        for p, data in pristine.items():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        with kill_at(monkeypatch, step), pytest.raises(Killed):
            apply_node(layout, new, None)
        seen.add(_state_of(layout, {"old": old, "new": new}))
        result = apply_node(layout, new, None)
        assert result.outcome in {"applied", "unchanged"}
        assert _state_of(layout, {"new": new}) == "new"
        _no_litter(layout)
        assert not [p for p in layout.root.rglob(".*kube-audit-tmp*")], "temporary files cleaned"
    assert seen == {"old", "new"}


@pytest.mark.parametrize(
    ("code", "words"), [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")]
)
@pytest.mark.parametrize("failing_call", [0, 2, 4, 6])
def test_disk_full_or_read_only(
    layout: HostLayout, monkeypatch: pytest.MonkeyPatch, code: int, words: str, failing_call: int
) -> None:
    old, new = desired("alice"), desired("alice", "bob")
    apply_node(layout, old, None)
    count = {"n": 0}
    real_write = os.write

    def failing_write(fd: int, data: Any) -> int:
        count["n"] += 1
        if count["n"] > failing_call:
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(HostError, match=words):
        apply_node(layout, new, None)
    monkeypatch.undo()
    assert _state_of(layout, {"old": old, "new": new}) in {"old", "new"}
    _no_litter(layout)
    assert not [p for p in layout.root.rglob(".*kube-audit-tmp*")]
    assert apply_node(layout, new, None).outcome == "applied"


def test_second_writer_waits_for_the_lock(layout: HostLayout) -> None:
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with hostfs.host_lock(layout.lock_file):
            held.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    try:
        with (
            pytest.raises(LockBusy, match="another kube-audit writer"),
            hostfs.host_lock(layout.lock_file, wait_seconds=0.2),
        ):
            pass
    finally:
        release.set()
        thread.join()
    with hostfs.host_lock(layout.lock_file, wait_seconds=0.2):
        pass


@pytest.mark.parametrize("operation", ["rollback", "uninstall"])
def test_rollback_and_uninstall_killed_midway(
    layout: HostLayout, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    first, second = desired("alice"), desired("alice", "bob")
    apply_node(layout, first, None)
    apply_node(layout, second, None)
    run = {
        "rollback": lambda: rollback_node(layout, None),
        "uninstall": lambda: uninstall_node(layout, None),
    }[operation]
    with kill_at(monkeypatch, 4), pytest.raises(Killed):
        run()
    manifest = parse_manifest(layout.manifest.read_text())
    assert config_hash_of(manifest) in {first.config_hash, second.config_hash, None}
    _no_litter(layout)
    run()
    _no_litter(layout)


def test_unwritable_manifest_folder(
    layout: HostLayout, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_rename = os.rename

    def refuse(src: Any, dst: Any) -> None:
        if str(dst) == str(layout.manifest):
            raise OSError(errno.EACCES, "Permission denied")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", refuse)
    before = layout.manifest.read_text()
    with pytest.raises(HostError, match=r"cannot write .*kube-apiserver.yaml: permission denied"):
        apply_node(layout, desired("alice"), None)
    assert layout.manifest.read_text() == before
    _no_litter(layout)


def test_repairing_a_content_folder_never_leaves_the_token_file_missing(
    layout: HostLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The running manifest names the folder: a repair swaps the folder in one step, so a kill
    at any point leaves the old or the new file there, never none."""
    want = desired("alice")
    apply_node(layout, want, None)
    path = flag_value(parse_manifest(layout.manifest.read_text()), "--token-auth-file")
    assert path is not None
    token_file = layout.host(path)
    token_file.write_bytes(b"damaged")
    with kill_at(monkeypatch, None) as calls:
        assert apply_node(layout, want, None).outcome == "applied"
    assert len(calls) > 3
    for step in range(len(calls)):
        token_file.write_bytes(b"damaged")
        with kill_at(monkeypatch, step), contextlib.suppress(Killed):
            apply_node(layout, want, None)  # later runs skip the backup: fewer steps
        assert token_file.read_bytes() in (b"damaged", want.files["tokens.csv"])
        assert apply_node(layout, want, None).outcome in ("applied", "unchanged")
        assert token_file.read_bytes() == want.files["tokens.csv"]
        assert not [p for p in layout.root.rglob(".*kube-audit-tmp*")], "temporaries cleaned"
