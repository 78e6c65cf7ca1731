"""A deterministic generator of kube-apiserver audit log lines (JSON, one event per line)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import orjson

USERS = [
    ("alice", ["developer"]),
    ("bob", ["developer", "ops"]),
    ("carol", ["ops"]),
    ("system:serviceaccount:kube-system:replicaset-controller", ["system:serviceaccounts"]),
    ("system:kube-scheduler", []),
]
VERBS = ["get"] * 6 + ["list", "watch", "create", "update", "patch", "delete"]
RESOURCES = [
    ("", "pods"), ("", "services"), ("", "configmaps"), ("", "secrets"),
    ("apps", "deployments"), ("networking.k8s.io", "ingresses"),
    ("apiextensions.k8s.io", "customresourcedefinitions"),
]  # fmt: skip
CODES = {"create": 201, "delete": 200}


def event(
    *,
    user: str,
    groups: list[str],
    verb: str,
    group: str,
    resource: str,
    namespace: str | None,
    name: str | None,
    stage: str,
    received: datetime,
    code: int | None,
    audit_id: str,
) -> dict[str, object]:
    ref: dict[str, object] = {"resource": resource, "apiVersion": "v1"}
    if group:
        ref["apiGroup"] = group
    if namespace:
        ref["namespace"] = namespace
    if name:
        ref["name"] = name
    prefix = f"/apis/{group}/v1" if group else "/api/v1"
    uri = f"{prefix}/namespaces/{namespace}/{resource}" if namespace else f"{prefix}/{resource}"
    out: dict[str, object] = {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "Metadata",
        "auditID": audit_id,
        "stage": stage,
        "requestURI": uri + (f"/{name}" if name and verb != "create" else ""),
        "verb": verb,
        "user": {"username": user, "uid": user, "groups": [*groups, "system:authenticated"]},
        "sourceIPs": ["10.0.0.7"],
        "userAgent": "kubectl/v1.31.0 (linux/amd64) kubernetes/abcdef0",
        "objectRef": ref,
        "requestReceivedTimestamp": received.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "stageTimestamp": (received + timedelta(milliseconds=20)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "annotations": {
            "authorization.k8s.io/decision": "allow",
            "authorization.k8s.io/reason": "",
        },
    }
    if code is not None:
        out["responseStatus"] = {"metadata": {}, "code": code}
    return out


def generate(count: int, seed: int = 7, start: datetime | None = None) -> Iterator[bytes]:
    """``count`` requests, most logged at RequestReceived and ResponseComplete (as two lines)."""
    rng = random.Random(seed)
    moment = start or datetime(2026, 11, 1, tzinfo=UTC)
    for i in range(count):
        moment += timedelta(milliseconds=rng.randint(1, 400))
        user, groups = USERS[rng.randrange(len(USERS))]
        verb = VERBS[rng.randrange(len(VERBS))]
        group, resource = RESOURCES[rng.randrange(len(RESOURCES))]
        namespace = None if resource == "customresourcedefinitions" else f"team-{i % 5}"
        name = None if verb in ("list", "watch") else f"obj-{rng.randrange(100)}"
        audit_id = str(uuid.UUID(int=rng.getrandbits(128)))
        common = dict(user=user, groups=groups, verb=verb, group=group, resource=resource,
                      namespace=namespace, name=name, received=moment, audit_id=audit_id)  # fmt: skip
        yield orjson.dumps(event(stage="RequestReceived", code=None, **common)) + b"\n"  # type: ignore[arg-type]
        if i % 50 != 0:
            code = CODES.get(verb, 200) if rng.random() > 0.05 else 403
            yield orjson.dumps(event(stage="ResponseComplete", code=code, **common)) + b"\n"  # type: ignore[arg-type]
