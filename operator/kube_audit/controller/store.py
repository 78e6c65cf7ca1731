"""What this pod knows of the cluster's AuditUsers, AuditPolicies and token Secrets."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ROTATE_ANNOTATION = "kube-audit.io/rotate-token"


def _relevant(kind: str, body: Mapping[str, Any]) -> str:
    """The part of an object whose change needs a new plan (status changes do not)."""
    meta = body.get("metadata") or {}
    if kind == "secrets":
        return json.dumps([body.get("data"), body.get("stringData")], sort_keys=True)
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


_KEEP_META = ("name", "namespace", "uid", "generation", "creationTimestamp", "resourceVersion")
_KEEP_ANNOTATIONS = (ROTATE_ANNOTATION, "kube-audit.io/rotated-for")


def compact(body: Mapping[str, Any]) -> dict[str, Any]:
    """Only what the operator reads: no managedFields, labels or other annotations.

    Memory matters at 10,000 users: a full object from the API is several times larger.
    """
    meta = body.get("metadata") or {}
    kept_meta = {k: meta[k] for k in _KEEP_META if k in meta}
    notes = {k: v for k, v in (meta.get("annotations") or {}).items() if k in _KEEP_ANNOTATIONS}
    if notes:
        kept_meta["annotations"] = notes
    out: dict[str, Any] = {"metadata": kept_meta}
    for key in ("apiVersion", "kind", "spec", "status", "data", "stringData"):
        if key in body:
            out[key] = copy.deepcopy(body[key])
    return out


@dataclass
class ObjectStore:
    """Raw objects by key; ``upsert``/``remove`` say whether the change needs a new plan."""

    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    secrets: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    user_version: int = 0

    def _table(self, kind: str) -> dict[Any, dict[str, Any]]:
        tables: dict[str, dict[Any, dict[str, Any]]] = {
            "auditusers": self.users,
            "auditpolicies": self.policies,
            "secrets": self.secrets,
        }
        return tables[kind]

    @staticmethod
    def key(kind: str, body: Mapping[str, Any]) -> Any:
        meta = body.get("metadata") or {}
        if kind == "secrets":
            return (meta.get("namespace") or "", meta.get("name") or "")
        return meta.get("name") or ""

    def upsert(self, kind: str, body: Mapping[str, Any]) -> bool:
        table = self._table(kind)
        key = self.key(kind, body)
        old = table.get(key)
        table[key] = compact(body)
        changed = old is None or _relevant(kind, old) != _relevant(kind, body)
        if changed and kind == "auditusers":
            self.user_version += 1
        return changed

    def remove(self, kind: str, body: Mapping[str, Any]) -> bool:
        removed = self._table(kind).pop(self.key(kind, body), None) is not None
        if removed and kind == "auditusers":
            self.user_version += 1
        return removed

    def documents(self) -> list[tuple[str, dict[str, Any]]]:
        """(source, object) pairs in a stable order, for ``collect_inputs``."""
        docs: list[tuple[str, dict[str, Any]]] = []
        for name in sorted(self.users):
            docs.append((f"AuditUser/{name}", self.users[name]))
        for name in sorted(self.policies):
            docs.append((f"AuditPolicy/{name}", self.policies[name]))
        for ns, name in sorted(self.secrets):
            docs.append(
                (
                    f"Secret/{ns}/{name}",
                    {"apiVersion": "v1", "kind": "Secret", **self.secrets[(ns, name)]},
                )
            )
        return docs
