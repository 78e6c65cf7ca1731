"""Which connections the authn-webhook keeps when a crowd of local clients arrives.

Connections not proven to be kube-apiserver's are held to a cap: each holds about 70 KB (TLS
state, buffers), so a crowd costs at most about 36 MB. A new one pushes out the oldest known not
to be the apiserver (handshake done, without its certificate), else the oldest handshake older
than HANDSHAKE_GRACE (on loopback a real client's takes milliseconds); else it is turned away.
The apiserver's own connections are never pushed out."""

from __future__ import annotations

import time
from typing import Generic, TypeVar

MAX_UNPROVEN = 256
HANDSHAKE_GRACE = 1.0

Connection = TypeVar("Connection")


class Unproven(Generic[Connection]):
    """Handshakes under way (with when they began, monotonic) and connections whose handshake
    showed another client, oldest first (dicts keep insertion order)."""

    def __init__(self, cap: int = MAX_UNPROVEN) -> None:
        self.cap = cap
        self.handshaking: dict[Connection, float] = {}
        self.strangers: dict[Connection, None] = {}

    def make_room(self) -> tuple[bool, Connection | None]:
        """Whether one more unproven connection may come in, and the one pushed out for it
        (to be closed) if any; False when every unproven one may still be the apiserver's."""
        if len(self.handshaking) + len(self.strangers) < self.cap:
            return True, None
        if self.strangers:
            victim = next(iter(self.strangers))
            del self.strangers[victim]
            return True, victim
        victim, began = next(iter(self.handshaking.items()))
        if time.monotonic() - began < HANDSHAKE_GRACE:
            return False, None
        del self.handshaking[victim]
        return True, victim

    def began(self, connection: Connection) -> None:
        self.handshaking[connection] = time.monotonic()

    def shown(self, connection: Connection, apiserver: bool) -> None:
        """The handshake ended: the apiserver's connection is proven, another one a stranger."""
        self.handshaking.pop(connection, None)
        if not apiserver:
            self.strangers[connection] = None

    def ended(self, connection: Connection) -> None:
        self.handshaking.pop(connection, None)
        self.strangers.pop(connection, None)
