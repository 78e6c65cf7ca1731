"""Questions over kube-apiserver audit events ("who did it?"), as pure functions.

Matching is two-step for speed: ``needles`` are byte strings that must occur in a log line for it
to possibly match (checked before any JSON parsing); ``matches`` is the exact test on the event.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from kube_audit.constants import CREDENTIAL_ID, WHO_NODE_ANNOTATION

STAGE_RANK = {"RequestReceived": 0, "ResponseStarted": 1, "ResponseComplete": 2, "Panic": 3}

_ALIASES = {
    "au": "auditusers", "ap": "auditpolicies", "crd": "customresourcedefinitions",
    "crds": "customresourcedefinitions", "cm": "configmaps", "cj": "cronjobs",
    "csr": "certificatesigningrequests", "deploy": "deployments", "ds": "daemonsets",
    "ep": "endpoints", "ev": "events", "hpa": "horizontalpodautoscalers", "ing": "ingresses",
    "limits": "limitranges", "netpol": "networkpolicies", "no": "nodes", "ns": "namespaces",
    "pc": "priorityclasses", "pdb": "poddisruptionbudgets", "po": "pods",
    "pv": "persistentvolumes", "pvc": "persistentvolumeclaims", "quota": "resourcequotas",
    "rs": "replicasets", "sa": "serviceaccounts", "sc": "storageclasses", "sts": "statefulsets",
    "svc": "services", "ingress": "ingresses", "endpoints": "endpoints",
    "ingressclass": "ingressclasses", "networkpolicy": "networkpolicies",
    "priorityclass": "priorityclasses", "storageclass": "storageclasses",
    "auditpolicy": "auditpolicies",
}  # fmt: skip
_RELATIVE = re.compile(r"^(?:\d+[smhd])+$")
_RELATIVE_PART = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_STATUS = re.compile(r"^[1-5](\d\d|xx)$")


def resource_plural(name: str) -> str:
    """kubectl's short and singular names to the plural in objectRef (``ing`` -> ``ingresses``);
    a subresource stays (``po/log`` -> ``pods/log``)."""
    head, slash, sub = name.partition("/")
    if slash:
        return f"{resource_plural(head)}/{sub.lower()}"
    lower = name.lower()
    if lower in _ALIASES:
        return _ALIASES[lower]
    if "." in lower:
        lower = lower.split(".", 1)[0]
    if lower.endswith("s"):
        return lower
    if lower.endswith("y") and lower[-2:-1] not in "aeiou":
        return lower[:-1] + "ies"
    if lower.endswith(("ss", "x", "ch", "sh")):
        return lower + "es"
    return lower + "s"


def parse_time(value: str, now: datetime) -> str:
    """RFC 3339 or relative (``2h``, ``30m``, ``1h30m``, ``7d``) -> the audit log's timestamp
    format."""
    if _RELATIVE.match(value.strip()):
        ago = timedelta()
        for amount, unit in _RELATIVE_PART.findall(value.strip()):
            ago += timedelta(**{_UNITS[unit]: int(amount)})
        moment = now - ago
    else:
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(
                f"{value!r} is neither RFC 3339 (2026-11-27T10:00:00Z) nor relative (2h, 1h30m, 7d)"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# The verbs an audit event carries: the API verbs, and the lowercased HTTP method of a request
# to a non-resource URL.
AUDIT_VERBS = (
    "get", "list", "watch", "create", "update", "patch", "delete", "deletecollection",
    "post", "put", "head", "options",
)  # fmt: skip
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_verb(value: str) -> str:
    verb = value.strip().lower()
    if verb not in AUDIT_VERBS:
        raise ValueError(
            f"{value!r} is not a verb of an audit event; one of {', '.join(AUDIT_VERBS)}"
        )
    return verb


def parse_duration(value: str) -> float:
    """Seconds, as kubectl reads ``--request-timeout``: a bare integer is seconds, otherwise a
    Go duration (``30s``, ``1m``, ``1h30m``, ``1.5s``, ``500ms``)."""
    text = value.strip()
    if text.isdigit():
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not text or "".join(a + u for a, u in parts) != text:
        raise ValueError(f"{value!r} is not a duration (30s, 1m, 1h30m, or a number of seconds)")
    return sum(float(amount) * _DURATION_SECONDS[unit] for amount, unit in parts)


def parse_status(value: str) -> str:
    if not _STATUS.match(value):
        raise ValueError(f"{value!r} is not an HTTP status code (404) or class (4xx)")
    return value


@dataclass(frozen=True)
class Query:
    """All filters combine with AND; the values of one repeated filter combine with OR."""

    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    verbs: frozenset[str] = frozenset()
    resources: frozenset[str] = frozenset()
    namespaces: frozenset[str] = frozenset()
    names: frozenset[str] = frozenset()
    statuses: frozenset[str] = frozenset()
    since: str | None = None
    until: str | None = None
    needles: tuple[tuple[bytes, ...], ...] = field(init=False)
    # The same needles with their key in front (``"verb":"create"``), for logs as Go writes
    # them (compact JSON): longer needles are rarer and bytes.find scans faster for them.
    keyed_needles: tuple[tuple[bytes, ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        resources = frozenset(r.partition("/")[0] for r in self.resources)
        groups = [
            (b'"username":', self.users),  # user.username and impersonatedUser.username
            (b"", self.groups),  # list items: no key in front
            (b'"verb":', self.verbs),
            (b'"resource":', resources),
            (b'"namespace":', self.namespaces),
            (b'"name":', self.names),
        ]
        for attr, keyed in (("needles", False), ("keyed_needles", True)):
            needles = tuple(
                tuple(sorted({(key if keyed else b"") + n for v in g for n in _quoted(v)}))
                for key, g in groups
                if g
            )
            object.__setattr__(self, attr, needles)


def is_compact(line: bytes) -> bool:
    """Whether a log line is compact JSON as kube-apiserver writes it (keyed needles apply)."""
    return line.startswith(b'{"kind":"Event"') and b'"verb":"' in line


# Go's encoding/json writes these as escapes: the apiserver logs "R&D" as "R\u0026D".
_GO_ESCAPES = {"&": "\\u0026", "<": "\\u003c", ">": "\\u003e", "\u2028": "\\u2028",
               "\u2029": "\\u2029"}  # fmt: skip


def _quoted(value: str) -> set[bytes]:
    """The value as JSON in a log line: as we would write it, and as Go writes it."""
    plain = orjson.dumps(value)
    go = plain.decode()
    for char, escape in _GO_ESCAPES.items():
        go = go.replace(char, escape)
    return {plain, go.encode()}


def may_match(line: bytes, needles: Sequence[Sequence[bytes]]) -> bool:
    """The cheap byte-level test: each filter's quoted value occurs in the raw line."""
    return all(any(n in line for n in group) for group in needles)


def _status_ok(code: Any, wanted: Iterable[str]) -> bool:
    if not isinstance(code, int):
        return False
    text = str(code)
    return any(text == w or (w.endswith("xx") and text[0] == w[0]) for w in wanted)


def matches(event: Mapping[str, Any], q: Query) -> bool:
    """The exact test on a parsed event."""
    user = event.get("user") or {}
    ref = event.get("objectRef") or {}
    acting_as = (event.get("impersonatedUser") or {}).get("username")
    if q.users and user.get("username") not in q.users and acting_as not in q.users:
        return False
    if q.groups and not q.groups.intersection(user.get("groups") or ()):
        return False
    if q.verbs and event.get("verb") not in q.verbs:
        return False
    if q.resources and not _resource_ok(ref, q.resources):
        return False
    if q.namespaces and ref.get("namespace") not in q.namespaces:
        return False
    if q.names and ref.get("name") not in q.names:
        return False
    received = str(event.get("requestReceivedTimestamp") or "")
    if q.since and received < q.since:
        return False
    if q.until and received >= q.until:
        return False
    return not q.statuses or _status_ok((event.get("responseStatus") or {}).get("code"), q.statuses)


def _resource_ok(ref: Mapping[str, Any], wanted: frozenset[str]) -> bool:
    """``pods`` matches pods and their subresources; ``pods/log`` only the log."""
    resource = ref.get("resource")
    full = f"{resource}/{ref['subresource']}" if ref.get("subresource") else resource
    return resource in wanted or full in wanted


def _who(event: Mapping[str, Any]) -> str:
    """The user, and whom they acted as when impersonating (``admin as alice``)."""
    name = str((event.get("user") or {}).get("username") or "")
    acting_as = (event.get("impersonatedUser") or {}).get("username")
    return f"{name} as {acting_as}" if acting_as else name


def _cut(text: str, width: int | None) -> str:
    if width is None or len(text) <= width:
        return text
    return text[: width - 1] + "…"


def _what(event: Mapping[str, Any]) -> tuple[str, str]:
    ref = event.get("objectRef") or {}
    if not ref:
        return str(event.get("requestURI") or ""), ""
    resource = str(ref.get("resource") or "")
    if ref.get("subresource"):
        resource += "/" + str(ref["subresource"])
    if ref.get("apiGroup"):
        resource += "." + str(ref["apiGroup"])
    where = "/".join(str(p) for p in (ref.get("namespace"), ref.get("name")) if p)
    return resource, where


def table_row(event: Mapping[str, Any], wide: bool) -> list[str]:
    user = event.get("user") or {}
    resource, where = _what(event)
    row = [
        str(event.get("requestReceivedTimestamp") or "")[:19].replace("T", " "),
        _who(event),
        str(event.get("verb") or ""),
        resource,
        where,
        str((event.get("responseStatus") or {}).get("code") or "-"),
        ",".join(event.get("sourceIPs") or []),
        _cut(str(event.get("userAgent") or ""), None if wide else 40),
    ]
    if wide:
        groups = [g for g in user.get("groups") or [] if g != "system:authenticated"]
        credential = (user.get("extra") or {}).get(CREDENTIAL_ID) or ["-"]
        row += [
            ",".join(groups),
            ",".join(str(c) for c in credential),
            str(event.get("stage") or ""),
            str(event.get("auditID") or ""),
            str(event.get("requestURI") or ""),
        ]
    return row


HEADER = [
    "TIME (UTC)",
    "USER",
    "VERB",
    "RESOURCE",
    "NAMESPACE/NAME",
    "CODE",
    "SOURCE IP",
    "USER AGENT",
]
WIDE_HEADER = [*HEADER, "GROUPS", "CREDENTIAL", "STAGE", "AUDIT ID", "URI"]


# Room the columns start with when rows are printed as they are found: a UTC time, a person or
# a ServiceAccount, a verb, a resource, a namespace/name, a code, an IPv4 address, the agent.
TYPICAL_WIDTHS = {
    "TIME (UTC)": 19, "USER": 24, "VERB": 6, "RESOURCE": 12, "NAMESPACE/NAME": 32,
    "CODE": 4, "SOURCE IP": 15, "GROUPS": 24, "STAGE": 16, "AUDIT ID": 36,
}  # fmt: skip


class GrowingTable:
    """A table printed a row at a time, as ``kubectl get --watch`` prints one: each column
    starts at a typical width and only grows, from the row with the longer cell on."""

    def __init__(self, header: Sequence[str]) -> None:
        self.header = list(header)
        self.widths = [max(len(h), TYPICAL_WIDTHS.get(h, 0)) for h in header]

    def line(self, cells: Sequence[str]) -> str:
        self.widths = [max(w, len(c)) for w, c in zip(self.widths, cells, strict=True)]
        return (
            "  ".join(c.ljust(w) for c, w in zip(cells, self.widths, strict=True)).rstrip() + "\n"
        )


def render_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines) + "\n"


def render_who_args(q: Query) -> list[str]:
    """The ``kube-audit who`` flags that ask another node the same question (times absolute,
    so every node answers for the same interval whatever its clock says "now" is)."""
    args: list[str] = []
    for flag, values in (
        ("--user", q.users),
        ("--group", q.groups),
        ("--verb", q.verbs),
        ("--resource", q.resources),
        ("--namespace", q.namespaces),
        ("--name", q.names),
        ("--status", q.statuses),
    ):
        for value in sorted(values):
            args.append(f"{flag}={value}")
    if q.since is not None:
        args.append(f"--since={q.since}")
    if q.until is not None:
        args.append(f"--until={q.until}")
    return args


def merge_by_time(answers: Mapping[str, Iterable[bytes]]) -> list[tuple[str, dict[str, Any]]]:
    """Every node's events (JSON Lines, each node's in time order) as one list of
    ``(node, event)`` in request-time order; a tie keeps node order."""
    merged = []
    for node in sorted(answers):
        for line in answers[node]:
            if line.strip():
                event = orjson.loads(line)
                received = str(event.get("requestReceivedTimestamp") or "")
                merged.append((received, node, event))
    merged.sort(key=lambda item: (item[0], item[1]))
    return [(node, event) for _, node, event in merged]


def render_node_event(node: str, event: Mapping[str, Any]) -> bytes:
    """One JSON line of ``who --cluster -o json``: the event with the node that logged it in
    its ``annotations`` (where the apiserver puts its own notes on a request)."""
    annotations = {**(event.get("annotations") or {}), WHO_NODE_ANNOTATION: node}
    return orjson.dumps({**event, "annotations": annotations}) + b"\n"


NODE_HEADER = ["NODE", *HEADER]
NODE_WIDE_HEADER = ["NODE", *WIDE_HEADER]
