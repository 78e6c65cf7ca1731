"""Commands run in a pod through ``pods/exec`` (as ``kubectl exec``), read a frame at a time."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson
from kubernetes.stream import ws_client

from kube_audit.kube.transport import Transport, one_line, status_message


def _channel(stream: Any, channel: int) -> bytes:
    """What arrived on one channel since the last read ("" when nothing did)."""
    data = stream.read_channel(channel, timeout=0)
    return data if isinstance(data, bytes) else str(data).encode()


def _exec_reason(error: BaseException) -> str:
    """The apiserver's own words for a refused exec (a 403 names the missing permission),
    without websocket-client's dump of the response headers."""
    status = getattr(error, "status_code", None)
    if status:
        return f"HTTP {status}{status_message(getattr(error, 'resp_body', None) or b'')}"
    return one_line(error).split(" -+-+- ", 1)[0] or type(error).__name__


def _exit_status(status: bytes) -> tuple[int | None, str | None]:
    """kubelet's last word on the error channel: a ``Status`` with the exit code."""
    if not status.strip():
        return None, "the connection closed before the command's exit status arrived"
    try:
        data = orjson.loads(status)
    except orjson.JSONDecodeError:
        return None, status.decode("utf-8", "replace").strip()
    if data.get("status") == "Success":
        return 0, None
    if data.get("reason") == "NonZeroExitCode":
        for cause in (data.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode" or cause.get("type") == "ExitCode":
                with contextlib.suppress(ValueError):
                    return int(cause.get("message")), None
    return None, str(data.get("message") or status.decode("utf-8", "replace")).strip()


@dataclass(frozen=True)
class ExecResult:
    """What a command run through pods/exec said: its exit code, or why it has none."""

    stdout: bytes
    stderr: str
    exit_code: int | None
    failure: str | None = None


class Exec(Transport):
    def exec_in_pod(
        self, namespace: str, pod: str, container: str, argv: Sequence[str], timeout: float
    ) -> ExecResult:
        """``kubectl exec`` without a terminal: the command's stdout, stderr and exit code.

        The stream is read as it comes, a frame at a time, so a long answer costs no more
        than its own bytes (the client's ``run_forever`` concatenates bytes per frame).
        """
        what = f"exec in Pod {namespace}/{pod}"
        query = [("container", container), ("stdout", "true"), ("stderr", "true")]
        query += [("command", arg) for arg in argv]
        _, url, headers, _, _ = self.client.param_serialize(
            "GET",
            f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(pod)}/exec",
            query_params=query,
            header_params={},
            auth_settings=["BearerToken"],
        )
        try:
            stream = ws_client.WSClient(
                self.client.configuration,
                ws_client.get_websocket_url(url),
                headers,
                capture_all=False,
                binary=True,
            )
        except Exception as error:  # websocket-client raises its own types and OSError
            return ExecResult(b"", "", None, f"{what}: {_exec_reason(error)}")
        out: list[bytes] = []
        err: list[bytes] = []
        deadline = time.monotonic() + timeout
        try:
            while stream.is_open():
                left = deadline - time.monotonic()
                if left <= 0:
                    return ExecResult(b"", "", None, f"{what}: no answer within {timeout:g}s")
                stream.update(timeout=min(left, 1.0))
                out.append(_channel(stream, ws_client.STDOUT_CHANNEL))
                err.append(_channel(stream, ws_client.STDERR_CHANNEL))
            status = _channel(stream, ws_client.ERROR_CHANNEL)
        except Exception as error:
            return ExecResult(b"", "", None, f"{what}: {_exec_reason(error)}")
        finally:
            stream.close()
        out.append(_channel(stream, ws_client.STDOUT_CHANNEL))
        err.append(_channel(stream, ws_client.STDERR_CHANNEL))
        stderr = b"".join(err).decode("utf-8", "replace")
        code, failure = _exit_status(status)
        return ExecResult(b"".join(out), stderr, code, failure and f"{what}: {failure}")
