"""The real audit store for the tests: VictoriaLogs built from its Go module (``make
victorialogs``), a single node or a cluster (vlstorage nodes, a vlinsert, a vlselect), on
127.0.0.1, and ``kube-audit ship`` as the process users run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.toolchain import go_1_26_or_newer

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "build" / "victorialogs" / "bin"
KUBE_AUDIT = Path(sys.executable).parent / "kube-audit"


def why_no_store() -> tuple[str, bool] | None:
    """(reason, is_a_failure) when VictoriaLogs is not here; None when it is. Go 1.26+ builds it
    (`make victorialogs`): where that Go is and the binary is not, it is a failure."""
    if (BIN / "victoria-logs").is_file():
        return None
    if go_1_26_or_newer():
        return f"{BIN / 'victoria-logs'} missing: run `make victorialogs`", True
    return "needs Go 1.26+ to build VictoriaLogs (`make victorialogs`)", False


def require_store() -> Path:
    """Skip with one line where the store cannot be built; fail where it could but was not."""
    problem = why_no_store()
    if problem is not None:
        reason, is_failure = problem
        if is_failure:
            pytest.fail(f"tests/store: {reason}", pytrace=False)
        pytest.skip(f"tests/store: {reason}")
    return BIN / "victoria-logs"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


class Server:
    """One victoria-logs process; its port and data folder survive a restart."""

    def __init__(
        self, name: str, work: Path, args: Sequence[str] = (), host: str = "127.0.0.1"
    ) -> None:
        self.name = name
        self.work = work
        self.host = host
        self.port = free_port()
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        work.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Server:
        log = open(self.work / "server.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [str(require_store()), f"-httpListenAddr={self.host}:{self.port}",
             f"-storageDataPath={self.work / 'data'}", "-retentionPeriod=100y",
             "-loggerLevel=WARN", *self.args],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        wait_for(f"{self.name} to answer /health", self.healthy, 30)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill does, nothing flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def single_node(work: Path) -> Iterator[Server]:
    server = Server("victoria-logs", work / "single").start()
    try:
        yield server
    finally:
        server.stop()


class Cluster:
    """Two vlstorage nodes, a vlinsert and a vlselect: the same binary in four roles."""

    def __init__(self, work: Path) -> None:
        self.storage = [Server(f"vlstorage-{i}", work / f"vlstorage-{i}") for i in range(2)]
        nodes = ",".join(f"127.0.0.1:{s.port}" for s in self.storage)
        self.insert = Server(
            "vlinsert", work / "vlinsert", [f"-storageNode={nodes}", "-select.disable"]
        )
        self.select = Server(
            "vlselect", work / "vlselect", [f"-storageNode={nodes}", "-insert.disable"]
        )

    def servers(self) -> list[Server]:
        return [*self.storage, self.insert, self.select]


@contextmanager
def cluster(work: Path) -> Iterator[Cluster]:
    made = Cluster(work)
    try:
        for server in made.servers():
            server.start()
        yield made
    finally:
        for server in made.servers():
            server.stop()


def query(url: str, logsql: str, timeout: float = 120.0) -> list[dict[str, str]]:
    body = urllib.parse.urlencode({"query": logsql}).encode()
    with urllib.request.urlopen(f"{url}/select/logsql/query", body, timeout=timeout) as answer:
        return [json.loads(line) for line in answer.read().splitlines() if line.strip()]


def count_stored(url: str) -> tuple[int, int]:
    """(rows, distinct auditID and stage): rows beyond the distinct ones are duplicates."""
    rows = query(url, "* | stats count() rows, count_uniq(auditID, stage) events")
    if not rows:
        return 0, 0
    return int(rows[0]["rows"]), int(rows[0]["events"])


class ShipProcess:
    """``kube-audit ship`` as the ``ship`` container runs it; its state under ``state``."""

    def __init__(self, log_dir: Path, state: Path, store: str, node: str = "cp-1") -> None:
        self.log_dir = log_dir
        self.state = state
        self.store = store
        self.node = node
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> ShipProcess:
        self.starts += 1
        log = open(self.state.parent / f"ship-{self.node}.log", "ab")  # noqa: SIM115
        env = {**os.environ, "NODE_NAME": self.node, "KUBE_AUDIT_STORE": self.store}
        self.proc = subprocess.Popen(
            [str(KUBE_AUDIT), "ship", "--log-dir", str(self.log_dir), "--state-dir",
             str(self.state), "--interval", "0.2s", "--request-timeout", "10s",
             "--metrics-port", "0"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        log.close()
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None and self.proc.poll() is None, "the shipper is not running"
        self.proc.send_signal(signum)
        if signum == signal.SIGKILL:
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(20)


def shipped_all(url: str, written: int) -> Callable[[], bool]:
    return lambda: count_stored(url)[1] >= written
