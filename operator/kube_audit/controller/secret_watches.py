"""Event intake for Secrets: one watch per namespace the tokens come from.

The token namespace is watched whole (the operator's own Secrets, and any a user names there);
each other namespace only while some AuditUser's ``tokenSecretRef`` names it, and there only
the Secrets with the consent label. RBAC grants Secrets per namespace, never by label, so the
operator holds no cluster-wide Secret access: each such namespace is granted on its own
(``kube-audit grant-secrets NS``). Without the grant its watch reports FORBIDDEN, the users
naming it say so on their status, and the watch keeps trying, so a grant applied later is
seen within seconds.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Collection
from typing import Any, Protocol

from kube_audit.constants import TOKEN_FOR_LABEL
from kube_audit.controller.store import compact
from kube_audit.kube import FORBIDDEN, LISTED, LISTING, KubeApi

log = logging.getLogger("kube_audit.operator")


class SecretSink(Protocol):
    """Where a namespace's Secret events go (the intake), always on the event loop."""

    def observe_secret(self, event_type: str, body: dict[str, Any]) -> None: ...
    def secrets_listing(self, namespace: str) -> None: ...
    def secrets_listed(self, namespace: str, keys: set[tuple[str, str]]) -> None: ...
    def secrets_forbidden(self, namespace: str, message: str) -> None: ...
    def secrets_unwatched(self, namespace: str) -> None: ...


class SecretWatches:
    """The running Secret watches, started and stopped on the event loop as users name
    namespaces (``follow``); each runs on a thread of its own (the client blocks)."""

    def __init__(
        self,
        api: KubeApi,
        sink: SecretSink,
        loop: asyncio.AbstractEventLoop,
        token_namespace: str,
        on_death: Callable[[str], None],
    ) -> None:
        self.api = api
        self.sink = sink
        self.loop = loop
        self.token_namespace = token_namespace
        self.on_death = on_death
        self._running: dict[str, threading.Event] = {}
        self._stopped = False

    def follow(self, namespaces: Collection[str]) -> None:
        """Watch the token namespace and exactly these; stop the watches of the others."""
        if self._stopped:
            return
        wanted = {self.token_namespace, *namespaces}
        for namespace in sorted(set(self._running) - wanted):
            self._stop(namespace)
            self.sink.secrets_unwatched(namespace)
        for namespace in sorted(wanted - set(self._running)):
            self._start(namespace)

    def stop_all(self) -> None:
        self._stopped = True
        for namespace in list(self._running):
            self._stop(namespace)

    def _start(self, namespace: str) -> None:
        stop = threading.Event()
        self._running[namespace] = stop
        # The token namespace is the operator's own: every Secret. Elsewhere only the Secrets
        # that consented, so nothing else of that namespace ever reaches this process.
        selector = None if namespace == self.token_namespace else TOKEN_FOR_LABEL
        log.info("watching Secrets in %s%s", namespace, "" if selector is None else " (labelled)")
        thread = threading.Thread(
            target=self._run,
            args=(namespace, selector, stop),
            name=f"secrets/{namespace}",
            daemon=True,
        )
        thread.start()

    def _stop(self, namespace: str) -> None:
        stop = self._running.pop(namespace)
        stop.set()
        self.api.stop_watches(only=stop)
        log.info("no longer watching Secrets in %s", namespace)

    def _run(self, namespace: str, selector: str | None, stop: threading.Event) -> None:
        def on_event(kind: str, obj: dict[str, Any]) -> None:
            """Compacted here, on the watch thread: a first list of many Secrets would
            otherwise wait in the loop's queue with all their managedFields."""
            if kind == LISTED:
                payload: Any = {tuple(k) for k in obj["keys"]}
            elif kind == FORBIDDEN:
                payload = str(obj.get("message") or "")
            elif kind == LISTING:
                payload = None
            else:
                payload = compact(obj)
            self.loop.call_soon_threadsafe(self._deliver, namespace, stop, kind, payload)

        try:
            self.api.watch_secrets(on_event, stop, namespace=namespace, label_selector=selector)
        except Exception:
            log.exception("the Secret watch of %s crashed", namespace)
            self.loop.call_soon_threadsafe(self.on_death, f"Secret watch ({namespace})")

    def _deliver(self, namespace: str, stop: threading.Event, kind: str, payload: Any) -> None:
        """On the loop: only from the watch that is current for that namespace (a stopped
        one may still deliver what it read before it noticed)."""
        if self._running.get(namespace) is not stop:
            return
        if kind == LISTING:
            self.sink.secrets_listing(namespace)
        elif kind == LISTED:
            self.sink.secrets_listed(namespace, payload)
        elif kind == FORBIDDEN:
            self.sink.secrets_forbidden(namespace, payload)
        else:
            self.sink.observe_secret(kind, payload)
