"""What this pod knows of the cluster's AuditUsers, AuditPolicies and token Secrets.

Objects are kept as compact JSON text, not dicts: with 10,000 users a dict tree costs about
4 KB per object, its JSON under 1 KB, and decoding one takes microseconds. Text, not orjson's
bytes: each ``orjson.dumps`` result keeps its whole 4 KB write buffer allocated.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from kube_audit.constants import (
    AUDIT_POLICY,
    AUDIT_USER,
    PLURALS,
    ROTATE_ANNOTATION,
    ROTATED_FOR,
    SECRETS,
    TOKEN_FOR_LABEL,
)

KINDS = (PLURALS[AUDIT_USER], PLURALS[AUDIT_POLICY], SECRETS)
_KEEP_META = ("name", "namespace", "uid", "generation", "creationTimestamp", "resourceVersion")
_KEEP_ANNOTATIONS = (ROTATE_ANNOTATION, ROTATED_FOR)


def _relevant(kind: str, body: Mapping[str, Any]) -> str:
    """The part of an object whose change needs a new plan (status changes do not)."""
    meta = body.get("metadata") or {}
    if kind == SECRETS:
        consent = (meta.get("labels") or {}).get(TOKEN_FOR_LABEL)
        return json.dumps([body.get("data"), body.get("stringData"), consent], sort_keys=True)
    return json.dumps(
        [
            meta.get("uid"),
            meta.get("generation"),
            meta.get("creationTimestamp"),
            (meta.get("annotations") or {}).get(ROTATE_ANNOTATION),
            body.get("spec"),
        ],
        sort_keys=True,
    )


def compact(body: Mapping[str, Any]) -> dict[str, Any]:
    """Only what the operator reads: no managedFields, labels or other annotations."""
    meta = body.get("metadata") or {}
    kept_meta = {k: meta[k] for k in _KEEP_META if k in meta}
    notes = {k: v for k, v in (meta.get("annotations") or {}).items() if k in _KEEP_ANNOTATIONS}
    if notes:
        kept_meta["annotations"] = notes
    consent = (meta.get("labels") or {}).get(TOKEN_FOR_LABEL)
    if consent is not None:
        kept_meta["labels"] = {TOKEN_FOR_LABEL: consent}
    out: dict[str, Any] = {"metadata": kept_meta}
    for key in ("apiVersion", "kind", "spec", "status", "data", "stringData"):
        if key in body:
            out[key] = body[key]
    return out


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, Mapping):
        return patch
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _encode(body: Mapping[str, Any]) -> str:
    """Exact-size JSON text (``decode`` copies it out of orjson's oversized buffer)."""
    return orjson.dumps(body).decode()


def key_of(kind: str, body: Mapping[str, Any]) -> Any:
    meta = body.get("metadata") or {}
    if kind == SECRETS:
        return (meta.get("namespace") or "", meta.get("name") or "")
    return meta.get("name") or ""


@dataclass
class ObjectStore:
    """Objects by kind and key; ``upsert``/``remove`` say whether the change needs a new plan."""

    _data: dict[str, dict[Any, str]] = field(default_factory=lambda: {k: {} for k in KINDS})
    _marks: dict[str, dict[Any, int]] = field(default_factory=lambda: {k: {} for k in KINDS})
    _seen: dict[str, dict[Any, int]] = field(default_factory=lambda: {k: {} for k in KINDS})
    user_version: int = 0
    sequence: int = 0

    def upsert(self, kind: str, body: Mapping[str, Any]) -> bool:
        key = key_of(kind, body)
        mark = hash(_relevant(kind, body))
        changed = self._marks[kind].get(key) != mark
        self.sequence += 1
        self._seen[kind][key] = self.sequence
        self._marks[kind][key] = mark
        self._data[kind][key] = _encode(compact(body))
        if changed and kind == PLURALS[AUDIT_USER]:
            self.user_version += 1
        return changed

    def remove(self, kind: str, body: Mapping[str, Any]) -> bool:
        return self.forget(kind, key_of(kind, body))

    def forget(self, kind: str, key: Any) -> bool:
        self._marks[kind].pop(key, None)
        self._seen[kind].pop(key, None)
        removed = self._data[kind].pop(key, None) is not None
        if removed and kind == PLURALS[AUDIT_USER]:
            self.user_version += 1
        return removed

    def forget_unlisted(
        self,
        kind: str,
        listed: set[Any],
        since: int,
        where: Callable[[Any], bool] = lambda _: True,
    ) -> list[Any]:
        """Drop what a complete list no longer shows: the deletes a watch never reported (a
        re-list after an error or 410 Gone says nothing of what vanished meanwhile).

        ``since`` is ``sequence`` when the list started: an object first seen after that came
        from the watch and may be newer than the list, so it stays. ``where`` says which keys
        the list covers (two Secret watches each cover a part).
        """
        gone = [
            key
            for key, seen in list(self._seen[kind].items())
            if key not in listed and seen <= since and where(key)
        ]
        for key in gone:
            self.forget(kind, key)
        return gone

    def uid(self, kind: str, key: Any) -> str | None:
        body = self.get(kind, key)
        return None if body is None else (body.get("metadata") or {}).get("uid")

    def has(self, kind: str, key: Any) -> bool:
        return key in self._data[kind]

    def get(self, kind: str, key: Any) -> dict[str, Any] | None:
        data = self._data[kind].get(key)
        return orjson.loads(data) if data is not None else None

    def items(self, kind: str) -> Iterator[tuple[Any, dict[str, Any]]]:
        """Decoded objects in key order, one at a time; safe while the store changes."""
        table = self._data[kind]
        for key in sorted(table):
            data = table.get(key)
            if data is not None:
                yield key, orjson.loads(data)

    def merge_status(self, kind: str, key: Any, patch: Mapping[str, Any]) -> None:
        """Record a status merge patch of ours, as the API applies it (None removes a key)."""
        body = self.get(kind, key)
        if body is None:
            return
        body["status"] = merge_patch(body.get("status"), patch)
        self._data[kind][key] = _encode(body)

    def documents(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(source, object) pairs in a stable order for ``collect_inputs``, decoded one at a
        time: all 20,000 objects of 10,000 users as dicts at once would cost about 80 MB."""
        for name, body in self.items(PLURALS[AUDIT_USER]):
            yield f"AuditUser/{name}", body
        for name, body in self.items(PLURALS[AUDIT_POLICY]):
            yield f"AuditPolicy/{name}", body
        for (ns, name), body in self.items(SECRETS):
            yield f"Secret/{ns}/{name}", {"apiVersion": "v1", "kind": "Secret", **body}
