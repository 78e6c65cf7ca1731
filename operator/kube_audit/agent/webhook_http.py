"""The little of HTTP/1.1 the authn-webhook speaks, over asyncio streams: a request head read
whole (the server bounds its size and time), a response written in one piece, a close that
flushes an answer or drops a connection. kube-apiserver's client-go is the peer it is for."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from urllib.parse import urlsplit


class Refused(Exception):
    """The connection ends here (after the answer already sent, if any)."""


def render_response(
    status: int,
    body: bytes,
    content_type: str,
    *,
    close: bool = False,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}",
             f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]  # fmt: skip
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def close_connection(writer: asyncio.StreamWriter, *, flush: bool) -> None:
    """Flush what was answered and close, for a second at most; else drop the connection."""
    if flush:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
    writer.transport.abort()


REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            413: "Content Too Large", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}  # fmt: skip


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Method, path without its query (client-go asks ``/authenticate?timeout=30s``), and the
    headers by lower-case name. A head that does not read is refused."""
    try:
        text = head.decode("latin-1")
        request_line, *lines = text.split("\r\n")
        method, target, _version = request_line.split(" ", 2)
    except ValueError:
        raise Refused from None
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return method, urlsplit(target).path, headers


def content_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return 0
    return int(value) if value.isdigit() else None
