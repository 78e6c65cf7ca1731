"""Waiting for the *new* kube-apiserver: seen gone, then ready several times in a row.

With hostNetwork the old and the new instance cannot both listen on the port, so an instance
that answers after the endpoint was seen down is the new one. A success before that is the old
instance still answering and does not count.
"""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class HealthOutcome:
    ready: bool
    reason: str


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

    def _context(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https:"):
            return None
        if self.ca_file is not None and self.ca_file.exists():
            context = ssl.create_default_context(cafile=str(self.ca_file))
            context.check_hostname = False
        else:
            context = ssl.create_default_context()
        return context

    def probe(self) -> tuple[bool, str]:
        """One GET; (True, '') on HTTP 200, else (False, what went wrong)."""
        try:
            with urllib.request.urlopen(
                self.url, timeout=self.probe_timeout, context=self._context()
            ) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            return False, f"HTTP {error.code} from {self.url}"
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            return False, f"{self.url} unreachable: {reason}"
        return (status == 200), ("" if status == 200 else f"HTTP {status} from {self.url}")

    def wait_ready(self, require_restart: bool = True) -> HealthOutcome:
        """Poll until ``successes_needed`` consecutive successes (after a restart) or timeout."""
        deadline = self.clock() + self.timeout
        restarted = not require_restart
        streak = 0
        last_error = "no answer yet"
        while True:
            ok, why = self.probe()
            if ok and restarted:
                streak += 1
                if streak >= self.successes_needed:
                    return HealthOutcome(True, f"ready ({streak} consecutive successes)")
            elif not ok:
                restarted = True
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
                return HealthOutcome(
                    False, f"not ready within {self.timeout:.0f}s; last error: {last_error}"
                )
            self.sleep(self.interval)
