"""One operator and one shipper per node, though a surge update runs two pods there for a
moment.

The DaemonSet updates with ``maxSurge: 1``: a node's new pod starts beside the old one and the
old one is stopped once the new one is Ready, so that the authn-webhook of one answers until the
other's does (both listen on the port, authn_webhook.py hands over). The operator and ship
containers must never run twice on one node: each new one waits here for the lock the old one
holds to its end, then for the ports it serves on (an older pod, without the lock, holds them).
While it waits, kubelet's probes on those ports are answered by the old process."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from kube_audit import hostfs

log = logging.getLogger(__name__)

# How often a waiting process tries again.
POLL_SECONDS = 0.5


def endpoint(url: str | None) -> tuple[str, int] | None:
    """The address an http://HOST:PORT/path endpoint listens on (None: not served)."""
    if not url:
        return None
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def port_is_free(address: tuple[str, int]) -> bool:
    """Whether a listener of ours could bind there now (another process listening: no)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def wait_for_node(
    lock: Path,
    ports: Sequence[tuple[str, int] | None],
    what: str,
    wait: Callable[[float], bool],
) -> int | None:
    """Take ``lock`` and wait until every port is free, calling ``wait(seconds)`` between tries
    (True: a signal came, give up). The lock's descriptor, held for the process's life, or
    None when given up."""
    said: set[str] = set()

    def busy(why: str) -> bool:
        if why not in said:
            said.add(why)
            log.info("%s: waiting for %s (the node's previous pod, until it ends)", what, why)
        return wait(POLL_SECONDS)

    fd = hostfs.take_lock(lock, lambda: busy(f"the lock {lock}"))
    if fd is None:
        return None
    for address in ports:
        if address is None or not address[1]:
            continue
        while not port_is_free(address):
            if busy(f"{address[0]}:{address[1]}, where another process listens"):
                return None
    if said:
        log.info("%s: the node is ours now", what)
    return fd
