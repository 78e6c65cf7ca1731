"""Long-running list+watch of Secrets and control-plane Nodes, raw JSON, reconnecting."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import kubernetes.client
import orjson
import urllib3.exceptions

from kube_audit.constants import CONTROL_PLANE_LABEL
from kube_audit.errors import ClusterError
from kube_audit.kube.transport import CONNECT_TIMEOUT, Transport, secret_path

LISTING, LISTED = "LISTING", "LISTED"
# The list was refused (HTTP 403): no grant to read there. The watch goes on trying, so a
# grant applied later is seen within MAX_WATCH_BACKOFF seconds.
FORBIDDEN = "FORBIDDEN"
WATCH_SETTLED = 10.0
MAX_WATCH_BACKOFF = 15.0

log = logging.getLogger("kube_audit.operator")


class Watches(Transport):
    def __init__(self, client: kubernetes.client.ApiClient, timeout: float = 30.0) -> None:
        super().__init__(client, timeout)
        # Each open watch response with the stop flag of the watch it serves.
        self._watches: dict[Any, threading.Event] = {}
        self._watches_lock = threading.Lock()

    def watch_secrets(
        self,
        on_event: Callable[[str, dict[str, Any]], None],
        stop: threading.Event,
        *,
        namespace: str,
        label_selector: str | None = None,
    ) -> None:
        """Blocking list+watch of one namespace's Secrets (optionally only those matching a
        label selector), raw JSON, until ``stop``; reconnects forever, backing off.

        Always one namespace: RBAC grants Secrets per namespace, and the operator holds no
        cluster-wide Secret access. A plain watch rather than kopf's: kopf keeps per-object
        state for each object it sees. ``on_event`` gets ("ADDED"|"MODIFIED"|"DELETED",
        object), LISTING / LISTED around each complete list, and FORBIDDEN ({"message": ...})
        when the list is refused; it must be quick. With a label selector, a Secret that loses
        its label arrives as DELETED (the apiserver filters watches that way).
        """
        query = {"labelSelector": label_selector}
        what = f"Secrets in {namespace}" + (f" labelled {label_selector}" if label_selector else "")
        self._list_and_watch(what, secret_path(namespace), query, on_event, stop)

    def watch_control_plane_nodes(
        self, on_event: Callable[[str, dict[str, Any]], None], stop: threading.Event
    ) -> None:
        """Blocking list+watch of the control-plane Nodes only, as ``watch_secrets``. The
        apiserver filters by label: a cluster's thousands of workers never reach the pod
        (kopf's ``labels=`` filters on the client, after every Node was streamed)."""
        query = {"labelSelector": CONTROL_PLANE_LABEL}
        self._list_and_watch("control-plane Nodes", "/api/v1/nodes", query, on_event, stop)

    def _list_and_watch(
        self,
        what: str,
        path: str,
        query: Mapping[str, Any],
        on_event: Callable[[str, dict[str, Any]], None],
        stop: threading.Event,
    ) -> None:
        backoff = 1.0
        while not stop.is_set():
            started = time.monotonic()
            try:
                version: str | None = self._list(what, path, query, on_event)
                while not stop.is_set() and version:
                    version = self._watch(
                        what, path, query, version=version, on_event=on_event, stop=stop
                    )
            except ClusterError as error:
                if stop.is_set():
                    return
                if error.status == 403:
                    on_event(FORBIDDEN, {"message": str(error)})
                log.warning("watch %s interrupted, retrying in %.0fs: %s", what, backoff, error)
            else:
                if stop.is_set():
                    return
                log.info("watch %s expired; listing again in %.0fs", what, backoff)
            # Back off while lists fail or watches keep ending at once (410 Gone in a loop,
            # an apiserver restarting), never into a hot loop of full lists; a watch that ran
            # for a while starts the count again.
            if time.monotonic() - started > WATCH_SETTLED:
                backoff = 1.0
            stop.wait(backoff)
            backoff = min(backoff * 2, MAX_WATCH_BACKOFF)

    def _list(
        self,
        what: str,
        path: str,
        query: Mapping[str, Any],
        on_event: Callable[[str, dict[str, Any]], None],
    ) -> str:
        """Every object as ADDED, framed by LISTING and LISTED (whose ``keys`` are all the
        (namespace, name) pairs listed): a re-list must also tell what is gone."""
        version = ""
        keys: list[tuple[str, str]] = []
        on_event(LISTING, {})
        for page in self._pages(f"list {what}", path, query):
            for item in page.get("items") or []:
                meta = item.get("metadata") or {}
                keys.append((str(meta.get("namespace") or ""), str(meta.get("name") or "")))
                on_event("ADDED", item)
            version = str((page.get("metadata") or {}).get("resourceVersion") or "")
        on_event(LISTED, {"keys": keys})
        return version

    def _watch(
        self,
        what: str,
        path: str,
        query: Mapping[str, Any],
        *,
        version: str,
        on_event: Callable[[str, dict[str, Any]], None],
        stop: threading.Event,
    ) -> str | None:
        """One watch request; the resourceVersion to go on from, or None to list again."""
        response = self._send(
            f"watch {what}",
            "GET",
            path,
            query={
                **query,
                "watch": "true",
                "resourceVersion": version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": 300,
            },
            timeout=(CONNECT_TIMEOUT, 330),
        )
        with self._watches_lock:
            self._watches[response] = stop
        buffer = b""
        try:
            for chunk in response.stream(65536, decode_content=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = orjson.loads(line)
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        return None
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        on_event(kind, obj)
                if stop.is_set():
                    return version
        except (urllib3.exceptions.HTTPError, OSError, orjson.JSONDecodeError) as error:
            raise ClusterError(f"watch {what}: {error}") from None
        finally:
            with self._watches_lock:
                self._watches.pop(response, None)
            response.release_conn()
        return version

    def stop_watches(self, only: threading.Event | None = None) -> None:
        """Break the open watches at once (they would otherwise last until the server's
        timeout): all of them, or ``only`` those stopped by that flag (set it first)."""
        with self._watches_lock:
            responses = [r for r, stop in self._watches.items() if only in (None, stop)]
        for response in responses:
            with contextlib.suppress(Exception):
                response.shutdown() if hasattr(response, "shutdown") else response.close()
