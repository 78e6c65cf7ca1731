"""The one module that talks to the audit store: VictoriaLogs' HTTP API, to ask and to ship.

A question goes as one LogsQL query and comes back as JSON Lines, read as they arrive, so the
first rows print before the last are found. Partial answers are refused
(``allow_partial_response=0``): a store that cannot ask every vlstorage answers with an error,
which ``who`` reports and exits 7 on, instead of an answer that silently misses a node's events.
"""

from __future__ import annotations

import base64
import http.client
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kube_audit.core.shipping import StoreVitals, parse_store_vitals, plan_store_failure
from kube_audit.errors import InvalidInput, Problem, StoreError

QUERY_PATH = "/select/logsql/query"
INSERT_PATH = "/insert/jsonline"


@dataclass(frozen=True)
class StoreAccess:
    """Where the store answers and how to prove who asks: a bearer token (the CLI reads it from
    a file), or a user with a password (from the environment: never a flag, which ``ps``
    shows)."""

    url: str
    ca_file: str | None = None
    token: str | None = None
    user: str | None = None
    password: str | None = None
    timeout: float = 300.0
    command: str = "who"


class LogStore:
    """A VictoriaLogs single node, or its vlselect (questions) or vlinsert (lines shipped)."""

    def __init__(
        self, access: StoreAccess, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        parsed = urllib.parse.urlsplit(access.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise InvalidInput(
                [Problem(access.command, "--store", f"{access.url!r}: give http(s)://HOST:PORT")]
            )
        self.url = access.url.rstrip("/")
        self.scheme, self.netloc, self.path = parsed.scheme, parsed.netloc, parsed.path.rstrip("/")
        self.connection: http.client.HTTPConnection | None = None
        self.read_metrics = True
        self.monotonic = monotonic
        self.vitals: StoreVitals | None = None
        self.timeout = access.timeout
        self.headers = {"Accept": "application/x-ndjson"}
        if access.token:
            self.headers["Authorization"] = f"Bearer {access.token}"
        elif access.user:
            pair = f"{access.user}:{access.password or ''}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        self.context: ssl.SSLContext | None = None
        if parsed.scheme == "https":
            try:
                self.context = ssl.create_default_context(cafile=access.ca_file)
            except (OSError, ssl.SSLError) as error:
                raise InvalidInput(
                    [
                        Problem(
                            access.command,
                            "--store-ca",
                            f"{access.ca_file}: not a CA bundle: {error}",
                        )
                    ]
                ) from None

    def insert(self, lines: bytes, params: dict[str, str]) -> None:
        """Send JSON lines; returns once the store acknowledged them. One connection is kept
        open: when the store restarts, the next request on it fails, even if the store is
        already back, so the shipper learns to send its unsettled lines again."""
        path = self.path + INSERT_PATH + "?" + urllib.parse.urlencode(params)
        headers = {**self.headers, "Content-Type": "application/stream+json"}
        try:
            if self.connection is None:
                self.connection = self._connect()
            self.connection.request("POST", path, body=lines, headers=headers)
            response = self.connection.getresponse()
            detail = response.read(2000)
        except (OSError, http.client.HTTPException) as error:
            self.close()
            raise StoreError(f"the store at {self.url} did not take the lines: {error}") from None
        if response.status // 100 != 2:
            self.close()
            text = detail.decode("utf-8", "replace").strip()
            raise StoreError(
                f"the store at {self.url} refused the lines: HTTP {response.status}: {text}"
            )

    def check(self) -> None:
        """``StoreError`` when the store may have lost acknowledged rows since the last check:
        the kept connection broke (it restarted, or closed it), its start time changed, or a
        storage node behind a vlinsert began failing (``core.shipping.plan_store_failure``).
        A store whose /metrics is not ours to read is asked its /health only."""
        path = "/metrics" if self.read_metrics else "/health"
        try:
            if self.connection is None:
                self.connection = self._connect()
            self.connection.request("GET", self.path + path, headers=self.headers)
            response = self.connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as error:
            self.close()
            raise StoreError(f"the store at {self.url} broke the connection: {error}") from None
        if path == "/metrics" and response.status in (401, 403, 404):
            self.read_metrics = False
            return self.check()
        if response.status // 100 != 2:
            self.close()
            raise StoreError(f"the store at {self.url} is not healthy: HTTP {response.status}")
        if path == "/metrics":
            vitals = parse_store_vitals(body.decode("utf-8", "replace"))
            self.vitals, why = plan_store_failure(self.vitals, vitals, self.monotonic())
            if why:
                raise StoreError(f"{self.url}: {why}")
        return None

    def _connect(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(
                self.netloc, timeout=self.timeout, context=self.context
            )
        return http.client.HTTPConnection(self.netloc, timeout=self.timeout)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def query(self, logsql: str) -> Iterator[bytes]:
        """The answer's lines as they arrive. ``StoreError`` when the store refuses, cannot be
        reached, or breaks off mid-answer (then the lines already given were all it sent)."""
        body = urllib.parse.urlencode({"query": logsql, "allow_partial_response": "0"}).encode()
        request = urllib.request.Request(
            self.url + QUERY_PATH,
            data=body,
            headers={**self.headers, "Content-Type": "application/x-www-form-urlencoded"},
            method="POST",
        )
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout, context=self.context)
        except urllib.error.HTTPError as error:
            detail = error.read(2000).decode("utf-8", "replace").strip()
            raise StoreError(
                f"the store at {self.url} refused the question: HTTP {error.code}: {detail}"
            ) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise StoreError(f"the store at {self.url} did not answer: {reason}") from None
        with response:
            try:
                while line := response.readline():
                    yield line
            except (OSError, http.client.HTTPException) as error:
                raise StoreError(f"the store at {self.url} broke off its answer: {error}") from None
