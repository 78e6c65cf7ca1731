"""The static token file, exactly as kube-apiserver's ``--token-auth-file`` reads it.

kube-apiserver reads the file with Go's ``encoding/csv`` (no comments, no header, no lazy quotes,
variable field count) and needs at least three columns: token, user name, uid, and optionally a
fourth column whose value is split on ``,`` into groups. A header line would become a credential and
a line with fewer than three columns stops the apiserver, so this module writes only records and
reads with the same rules, so a file we did not write can be checked before it is trusted.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import unicodedata
from collections.abc import Iterable
from typing import NamedTuple

from kube_audit.errors import KubeAuditError


class TokenRecord(NamedTuple):
    """One line of the token file. Ordered by username first so the file sorts by person.

    A NamedTuple rather than a dataclass: 10,000 of them are built and sorted on every render.
    """

    username: str
    uid: str
    groups: tuple[str, ...]
    token: str
    # RFC 3339 time the token stops working ("" never): the webhook's snapshot carries it; the
    # token file cannot (its line is removed at that time instead).
    expires_at: str = ""


class TokenFileError(KubeAuditError):
    """The token file cannot be parsed the way kube-apiserver would parse it."""


MIN_TOKEN_LENGTH = 32
_TOKEN_FORBIDDEN = re.compile(r'[\s,"]')
_NEEDS_QUOTES = re.compile(r'[,"\r\n]')


def _has_control(value: str) -> bool:
    if value.isprintable():
        return False
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in value)


def token_problem(token: str) -> str | None:
    """Why a token cannot be used, or None. Tokens travel in HTTP headers and as one CSV field;
    a short one is a password anyone who can reach the apiserver may guess."""
    if not token:
        return "must not be empty"
    if len(token) < MIN_TOKEN_LENGTH:
        return (
            f"is {len(token)} characters long; at least {MIN_TOKEN_LENGTH} are needed (the "
            "operator generates 43), e.g. `openssl rand -base64 33`"
        )
    if token.isprintable() and not _TOKEN_FORBIDDEN.search(token):
        return None
    if any(ch.isspace() for ch in token):
        return "must not contain whitespace (a trailing newline from `echo`? use `echo -n`)"
    if _has_control(token):
        return "must not contain control characters"
    if "," in token or '"' in token:
        return 'must not contain "," or \'"\''
    return None


@functools.lru_cache(maxsize=65536)
def name_problem(value: str, *, is_group: bool = False) -> str | None:
    """Why a user name, uid or group cannot be written to the token file, or None."""
    if not value:
        return "must not be empty"
    if _has_control(value):
        return "must not contain control characters or line breaks"
    if value != value.strip():
        return "must not start or end with whitespace"
    if is_group and "," in value:
        return 'must not contain "," (kube-apiserver splits the groups column on ",")'
    return None


def _go_csv_field(value: str) -> str:
    """Quote a field the way Go's csv.Writer does: only when the reader would need it."""
    needs_quotes = value == "\\." or _NEEDS_QUOTES.search(value) is not None or value[:1].isspace()
    if not needs_quotes:
        return value
    return '"' + value.replace('"', '""') + '"'


def render_token_file(records: Iterable[TokenRecord]) -> bytes:
    """One line per record, sorted, no header; the groups column only when there are groups."""
    q = _go_csv_field
    lines = [
        f"{q(token)},{q(username)},{q(uid)},{q(','.join(groups))}\n"
        if groups
        else f"{q(token)},{q(username)},{q(uid)}\n"
        for username, uid, groups, token, _ in sorted(records)
    ]
    return "".join(lines).encode()


def _read_go_csv(text: str) -> list[tuple[int, list[str]]]:
    """Go ``encoding/csv`` Reader semantics with FieldsPerRecord=-1 and LazyQuotes=false.

    Returns (line number, fields) per record; blank lines are skipped, as Go skips them. Not
    Python's ``csv`` module: it takes a bare ``"`` in an unquoted field as text (Go: an error
    that keeps kube-apiserver from starting) and a lone ``\r`` as a line end (Go: text).
    tests/controlplane/test_decoders.py holds this reader to kube-apiserver's own.
    """
    records: list[tuple[int, list[str]]] = []
    text = text.replace("\r\n", "\n")
    if text.endswith("\r"):
        text = text[:-1]  # Go drops a "\r" just before the end of the file
    pos, line, n = 0, 1, len(text)
    while pos < n:
        if text[pos] == "\n":
            pos += 1
            line += 1
            continue
        start_line = line
        fields: list[str] = []
        while True:
            if pos < n and text[pos] == '"':
                pos += 1
                buf = []
                while True:
                    end = text.find('"', pos)
                    if end < 0:
                        raise TokenFileError(
                            f'line {start_line}: extraneous or missing " in quoted field'
                        )
                    chunk = text[pos:end]
                    line += chunk.count("\n")
                    buf.append(chunk)
                    pos = end + 1
                    if pos < n and text[pos] == '"':
                        buf.append('"')
                        pos += 1
                        continue
                    break
                fields.append("".join(buf))
                if pos < n and text[pos] not in ",\n":
                    raise TokenFileError(f'line {line}: extraneous or missing " in quoted field')
            else:
                end = pos
                while end < n and text[end] not in ",\n":
                    end += 1
                value = text[pos:end]
                if '"' in value:
                    raise TokenFileError(f'line {line}: bare " in non-quoted field')
                fields.append(value)
                pos = end
            if pos < n and text[pos] == ",":
                pos += 1
                continue
            break
        if pos < n:
            pos += 1
            line += 1
        records.append((start_line, fields))
    return records


def parse_token_file(data: bytes) -> list[TokenRecord]:
    """Parse a token file as kube-apiserver does, refusing what would stop it from starting."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TokenFileError(f"not UTF-8: {error}") from None
    out = []
    for line, fields in _read_go_csv(text):
        if len(fields) < 3:
            raise TokenFileError(
                f"line {line}: needs at least 3 columns (token, user name, uid), found "
                f"{len(fields)}; kube-apiserver would not start"
            )
        groups = tuple(fields[3].split(",")) if len(fields) >= 4 else ()
        out.append(TokenRecord(username=fields[1], uid=fields[2], groups=groups, token=fields[0]))
    return out


def fingerprint(token: str, key: bytes | None = None) -> str:
    """A short, non-reversible tag for a token, safe to print in plans and logs. With the
    cluster's fingerprint key (what status and audit events show): keyed, so nothing people
    can read is a digest to guess a short token against; without (a plan from files): the
    start of its SHA-256."""
    if key is not None:
        return "hmac:" + hmac.new(key, token.encode(), hashlib.sha256).hexdigest()[:12]
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]
