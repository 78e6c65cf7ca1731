"""What people see of kube-apiserver while the node changes under it: one person's token asked
over and over, and a stream of tokens nobody holds, each of which the apiserver must ask the
webhook (no cache answers a token it has never seen)."""

from __future__ import annotations

import http.client
import secrets
import ssl
import subprocess
import threading
import time

from tests.controlplane.cluster import KubectlError
from tests.controlplane.test_job import whoami
from tests.realnode.cluster import Real


class TokenSampler(threading.Thread):
    """One person's token asked of the apiserver twice a second: how often it was refused
    (401), as against accepted or no answer at all (the apiserver restarting)."""

    def __init__(self, real: Real, token: str) -> None:
        super().__init__(daemon=True)
        self.cp, self.token = real.cp, token
        self.accepted = self.down = 0
        self.refused: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                answer = whoami(self.cp, self.token)
            except (KubectlError, subprocess.TimeoutExpired):
                self.down += 1
                continue
            if isinstance(answer, dict):
                self.accepted += 1
            else:
                self.refused.append(time.monotonic())

    def __enter__(self) -> TokenSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(60)

    @property
    def refused_for(self) -> float:
        """From the first refusal to the last (0: never refused)."""
        return self.refused[-1] - self.refused[0] + 0.5 if self.refused else 0.0


class StrangerReviews(threading.Thread):
    """Requests with a new random bearer token each, about 50 a second, on a kept-alive
    connection: kube-apiserver has no cached answer for any of them, so each is a TokenReview
    asked of the webhook. Every answer should be 401; a webhook that does not answer shows in
    the apiserver's log (``webhook_failures``)."""

    def __init__(self, real: Real) -> None:
        super().__init__(daemon=True)
        node = real.cp.first
        self.host, self.port = node.url.removeprefix("https://").rsplit(":", 1)
        self.context = ssl.create_default_context(cafile=str(node.ca))
        self.statuses: dict[int, int] = {}
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        connection = self._connect()
        while not self.stop.wait(0.02):
            try:
                connection.request("GET", "/api", headers={
                    "Authorization": f"Bearer {secrets.token_urlsafe(32)}"})  # fmt: skip
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as error:
                self.failures.append(f"{type(error).__name__}: {error}")
                connection.close()
                connection = self._connect()
                continue
            self.statuses[response.status] = self.statuses.get(response.status, 0) + 1

    def _connect(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host.strip("[]"), int(self.port),
                                           context=self.context, timeout=10)  # fmt: skip

    def __enter__(self) -> StrangerReviews:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(30)


def webhook_failures(real: Real) -> int:
    """Lines in which the node's kube-apiserver says it got no answer from the webhook
    ("Failed to make webhook authenticator request": refused, reset and not retried, timed
    out) or an error answer, read from its container logs on the node (kubelet's files, so
    they are read whatever the API does). Its own metric cannot tell: every refused bearer
    token counts as an authentication error there."""
    logs = real.node.tree / "var/log/pods"
    count = 0
    for path in logs.glob("kube-system_kube-apiserver-*/kube-apiserver/*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if "Failed to make webhook authenticator request" in line or "not loaded yet" in line:
                count += 1
    return count
