"""Waiting for the *new* kube-apiserver, and proving that the one answering is the new one.

Two signals. The probe: ``/readyz`` seen unreachable (kubelet stopped the old instance; with
hostNetwork the old and the new cannot both listen on the port), then ready several times in a
row. A failed or slow answer is not a restart: the old instance can answer 500 or time out.
And the proof, where the API can tell: the mirror pod kubelet keeps for the static pod carries
the config hash of the manifest we wrote and a container that started after we wrote it and is
ready. Without the API (no credentials, no mirror pod) the probe alone decides, and the outcome
says so.

The probe sends the operator's credentials where it has them: a hardened apiserver
(``--anonymous-auth=false``, CIS 1.2.1) answers an anonymous ``/readyz`` with 401. A 401 or 403
still proves the new instance is up and serving; whether it is ready is then not ours to judge
from ``/readyz``, so it never counts as "not ready" (that would roll back every change there).
"""

from __future__ import annotations

import http.client
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kube_audit.core.manifest import HASH_ANNOTATION
from kube_audit.errors import KubeAuditError


@dataclass(frozen=True)
class HealthOutcome:
    """``crashed``: the new instance never answered at all (it does not start with this config),
    as opposed to answering but not getting ready, which may be transient."""

    ready: bool
    reason: str
    crashed: bool = False


@dataclass(frozen=True)
class Expectation:
    """What the new instance must prove: our manifest's config hash, started after ``since``."""

    config_hash: str
    since: float


# (True, how) proven; (False, why not yet); (None, why the API cannot tell: no mirror pod, no
# permission). A transient API error is raised as a KubeAuditError and tried again.
InstanceCheck = Callable[[Expectation], tuple[bool | None, str]]
# HTTP statuses of an apiserver that is up but does not let us read /readyz.
REFUSED = (401, 403)


def mirror_pod_verdict(pod: Mapping[str, Any] | None, want: Expectation) -> tuple[bool | None, str]:
    """Judge kubelet's mirror pod of kube-apiserver against what we wrote (pure)."""
    if pod is None:
        return None, "no mirror pod of kube-apiserver in kube-system"
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    running_hash = annotations.get(HASH_ANNOTATION) or ""
    if running_hash != want.config_hash:
        return False, f"mirror pod runs config {running_hash[:16] or '(none)'}"
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        started = ((status.get("state") or {}).get("running") or {}).get("startedAt")
        if not started:
            return False, "the new container is not running yet"
        started_at = datetime.fromisoformat(str(started).replace("Z", "+00:00")).timestamp()
        if started_at < int(want.since) - 1:
            return False, "the container running started before the manifest was written"
        if not status.get("ready"):
            return False, "the new container is not ready yet"
    if not statuses:
        return False, "the mirror pod shows no container yet"
    return True, f"mirror pod shows config {want.config_hash[:16]} started after the change"


def may_carry_token(url: str) -> bool:
    """A bearer token may go there: HTTPS, or plain HTTP that never leaves the host."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme == "https" or parts.hostname in ("127.0.0.1", "::1", "localhost")


@dataclass
class HealthCheck:
    url: str
    ca_file: Path | None = None
    timeout: float = 180.0
    successes_needed: int = 3
    interval: float = 1.0
    probe_timeout: float = 5.0
    clock: Callable[[], float] = field(default=time.monotonic)
    sleep: Callable[[float], None] = field(default=time.sleep)
    instance: InstanceCheck | None = None
    # The bearer token to send (over HTTPS or loopback only), read at each probe: a
    # ServiceAccount token rotates.
    credentials: Callable[[], str | None] | None = None

    def _context(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https:"):
            return None
        if self.ca_file is not None and self.ca_file.exists():
            context = ssl.create_default_context(cafile=str(self.ca_file))
            context.check_hostname = False
        else:
            context = ssl.create_default_context()
        return context

    def probe(self) -> tuple[int | None, str, bool]:
        """One GET: (HTTP status or None, what went wrong, was the port closed or the connection
        cut?)."""
        request = urllib.request.Request(self.url)
        token = self.credentials() if self.credentials is not None else None
        if token and may_carry_token(self.url):
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(
                request, timeout=self.probe_timeout, context=self._context()
            ) as response:
                status = int(response.status)
        except urllib.error.HTTPError as error:
            return error.code, f"HTTP {error.code} from {self.url}", False
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)
            gone = isinstance(
                reason, (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine)
            )
            return None, f"{self.url} unreachable: {reason}", gone
        return status, ("" if status == 200 else f"HTTP {status} from {self.url}"), False

    def wait_ready(
        self, require_restart: bool = True, expect: Expectation | None = None
    ) -> HealthOutcome:
        """Until the new instance is ready ``successes_needed`` times in a row (and, where the
        API can tell, proven to be the one we wrote), or the timeout."""
        deadline = self.clock() + self.timeout
        restarted = not require_restart
        answered = False
        streak = 0
        last_error = "no answer yet"
        refused = ""
        while True:
            status, why, gone = self.probe()
            ok = status == 200 or status in REFUSED
            if status in REFUSED:
                refused = f"/readyz answered HTTP {status} (up; readiness not judged from it)"
            if gone:
                restarted = True
            elif restarted and status is not None:
                answered = True
            if ok and restarted:
                streak += 1
                if streak >= self.successes_needed:
                    proven, how = self._prove(expect)
                    if proven is not False:
                        seen = f"{refused}; " if refused else ""
                        return HealthOutcome(True, f"ready ({streak} in a row; {seen}{how})")
                    last_error = how
            elif not ok:
                streak = 0
                last_error = why
            if self.clock() >= deadline:
                if not restarted:
                    return HealthOutcome(
                        False,
                        f"kube-apiserver did not restart within {self.timeout:.0f}s (the old "
                        "instance kept answering; is kubelet running and watching the static "
                        "pod folder?)",
                    )
                if not answered:
                    return HealthOutcome(
                        False,
                        f"the new instance never answered within {self.timeout:.0f}s (it does "
                        f"not start with this config?); last error: {last_error}",
                        crashed=True,
                    )
                return HealthOutcome(
                    False, f"not ready within {self.timeout:.0f}s; last error: {last_error}"
                )
            self.sleep(self.interval)

    def _prove(self, expect: Expectation | None) -> tuple[bool | None, str]:
        if self.instance is None or expect is None:
            return None, "verified by /readyz only: no API access to read the mirror pod"
        try:
            verdict, how = self.instance(expect)
        except KubeAuditError as error:  # the apiserver we wait for is the API: try again
            return False, f"the mirror pod could not be read yet: {error}"
        if verdict is None:
            return None, f"verified by /readyz only: {how}"
        return verdict, how
