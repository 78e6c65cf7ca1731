"""The same questions answered by ``who`` over the files and by ``who --store`` over the real
VictoriaLogs they were shipped to: more than a million events, rotated and gzipped as kube-apiserver
does, sent by the real ``kube-audit ship``."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.auditlog import generate
from tests.logwriter import RotatingLog
from tests.store.store import (
    KUBE_AUDIT,
    Server,
    ShipProcess,
    count_stored,
    require_store,
    shipped_all,
    single_node,
    wait_for,
)

REQUESTS = 510_000  # about 1,010,000 events: most requests are logged at two stages

QUESTIONS = [
    ["--user", "alice"],
    ["--group", "ops", "--verb", "delete,deletecollection"],
    ["--resource", "secrets", "--namespace", "team-3"],
    ["--resource", "crd", "--verb", "create,update,patch,delete"],
    ["--name", "obj-42", "--status", "4xx"],
    ["--user", "bob", "--since", "2026-11-01T10:00:00Z", "--until", "2026-11-01T16:30:00Z"],
]


class Shipped:
    def __init__(self, folder: Path, store: Server, events: int) -> None:
        self.folder = folder
        self.store = store
        self.events = events


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shipped]:
    require_store()
    work = tmp_path_factory.mktemp("parity")
    log = RotatingLog(work / "audit", max_bytes=100 * 1024 * 1024, compress=True)
    events = 0
    batch: list[bytes] = []
    for line in generate(REQUESTS):
        batch.append(line)
        if len(batch) == 10_000:
            log.write(batch)
            events += len(batch)
            batch = []
    log.write(batch)
    events += len(batch)
    assert events >= 1_000_000 and log.rotations >= 5
    with single_node(work) as store:
        ship = ShipProcess(work / "audit", work / "ship-state", store.url).start()
        started = time.monotonic()
        try:
            wait_for(f"{events} events in the store", shipped_all(store.url, events), 600)
        finally:
            ship.stop()
        print(f"shipped {events} events in {time.monotonic() - started:.1f} s")
        yield Shipped(work / "audit", store, events)


def _who(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KUBE_AUDIT), "who", *args], capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip


def _normal(value: Any) -> Any:
    """What the store keeps of an event: it stores no empty values (docs/audit-store.md), and
    ``who --store`` adds the node."""
    if isinstance(value, dict):
        out = {k: _normal(v) for k, v in value.items() if k != "kube-audit.io/node"}
        return {k: v for k, v in out.items() if v not in ("", {}, None) or k == "metadata"}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def test_the_store_holds_every_event_once(shipped: Shipped) -> None:
    assert count_stored(shipped.store.url) == (shipped.events, shipped.events)


@pytest.mark.parametrize("question", QUESTIONS, ids=[" ".join(q) for q in QUESTIONS])
def test_who_answers_the_same_from_the_store(shipped: Shipped, question: list[str]) -> None:
    files = _who(str(shipped.folder), "-o", "json", *question)
    store = _who("--store", shipped.store.url, "-o", "json", *question)
    assert files.returncode == 0, files.stderr
    assert store.returncode == 0, store.stderr
    expected = [_normal(json.loads(line)) for line in files.stdout.splitlines()]
    answered = [json.loads(line) for line in store.stdout.splitlines()]
    assert len(expected) > 10, "a question that finds nothing proves nothing"
    assert [e["annotations"]["kube-audit.io/node"] for e in answered] == ["cp-1"] * len(answered)
    assert [_normal(e) for e in answered] == expected


def test_the_table_is_the_files_table_with_a_node_column(shipped: Shipped) -> None:
    files = _who(str(shipped.folder), "--user", "carol", "--verb", "delete")
    store = _who("--store", shipped.store.url, "--user", "carol", "--verb", "delete")
    assert files.returncode == 0 and store.returncode == 0, files.stderr + store.stderr
    stripped = [line.split(None, 1)[1] for line in store.stdout.splitlines()]
    assert store.stdout.splitlines()[0].split()[0] == "NODE"
    assert [" ".join(x.split()) for x in stripped[1:]] == [
        " ".join(x.split()) for x in files.stdout.splitlines()[1:]
    ]
    assert len(stripped) > 10
