"""The real ``kube-audit operator`` process: it serves, and it stops cleanly on SIGTERM.

The DaemonSet's pods get SIGTERM on every rollout and node drain; the operator must stop its
own writes first, then kopf, and exit 0 well inside the pod's grace period.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from kube_audit.controller.main import KopfWatchTeardown
from tests.operator.conftest import Harness, eventually

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ready(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def test_sigterm_stops_the_operator_process(harness: Harness, tmp_path: Path) -> None:
    """Also: the pod's readiness turns 200 only once the node is settled."""
    host = tmp_path / "host"
    shutil.copytree(REPO / "examples/demo/host", host)
    kubeconfig = harness.cluster.write_kubeconfig(tmp_path / "kubeconfig")
    harness.add_control_plane("cp-1")
    for i in range(200):
        harness.apply_user(f"user-{i:03d}", groups=["developer"])
    log = tmp_path / "operator.log"
    readiness = f"http://127.0.0.1:{_free_port()}/readyz"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from kube_audit.cli import main; sys.exit(main(sys.argv[1:]))",
                "operator",
                "--host-root",
                str(host),
                "--node-name",
                "cp-1",
                "--no-wait",
                "--debounce",
                "0.5",
                "--metrics-port",
                "0",
                "--liveness",
                "",
                "--readiness",
                readiness,
            ],
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            manifest = host / "etc/kubernetes/manifests/kube-apiserver.yaml"
            eventually(lambda: _ready(readiness) == 200, 60, "the pod ready")
            assert "token-auth-file" in manifest.read_text(), "ready only once the node settled"
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=45)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    text = log.read_text()
    assert code == 0, text
    assert "SIGTERM: stopping" in text
    assert "did not stop" not in text
    assert "Traceback" not in text


def test_only_kopfs_watch_teardown_is_kept_out_of_the_log() -> None:
    """Seen one run in three under load: asyncio's record of finalizing kopf's watch-stream
    generator at exit, with a Traceback, after a clean SIGTERM."""
    keep = KopfWatchTeardown().filter

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)

    gen = "<async_generator object infinite_watch at 0x7f803fb51fc0>"
    assert not keep(record(f"an error occurred during closing of asynchronous generator {gen}"))
    other = "<async_generator object something_else at 0x1>"
    assert keep(record(f"an error occurred during closing of asynchronous generator {other}"))
    assert keep(record("Task exception was never retrieved"))
