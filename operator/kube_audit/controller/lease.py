"""coordination.k8s.io Leases: one node restarts its apiserver at a time; one pod owns status."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from kube_audit.controller.aio import sleep_unless_stopped
from kube_audit.kube import KubeApi

FAILED_ANNOTATION = "kube-audit.io/failed-config"


def _micro(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: str | None) -> datetime | None:
    """RFC 3339 as the API sends it ('Z') or as the client re-serialises it ('+00:00')."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _free_for(lease: dict[str, Any], holder: str, now: datetime) -> bool:
    spec = lease.get("spec") or {}
    current = spec.get("holderIdentity")
    if not current or current == holder:
        return True
    renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
    if renewed is None:
        return False
    duration = int(spec.get("leaseDurationSeconds") or 0)
    return renewed + timedelta(seconds=duration) < now


def try_acquire(api: KubeApi, namespace: str, name: str, holder: str, duration: int) -> bool:
    """Take or renew the lease if it is free, ours, or expired; False if someone else holds it."""
    now = datetime.now(UTC)
    lease = api.read_lease(namespace, name)
    if lease is None:
        return api.create_lease(
            namespace,
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "holderIdentity": holder,
                    "leaseDurationSeconds": duration,
                    "acquireTime": _micro(now),
                    "renewTime": _micro(now),
                },
            },
        )
    if not _free_for(lease, holder, now):
        return False
    spec = lease.setdefault("spec", {})
    if spec.get("holderIdentity") != holder:
        spec["acquireTime"] = _micro(now)
    spec.update(holderIdentity=holder, leaseDurationSeconds=duration, renewTime=_micro(now))
    return api.replace_lease(namespace, name, lease)


def release(
    api: KubeApi, namespace: str, name: str, holder: str, annotations: dict[str, str | None]
) -> None:
    """Give the lease up (if still ours), recording ``annotations`` (None removes one)."""
    lease = api.read_lease(namespace, name)
    if lease is None or (lease.get("spec") or {}).get("holderIdentity") != holder:
        return
    meta = lease.setdefault("metadata", {})
    notes = meta.get("annotations") or {}
    for key, value in annotations.items():
        if value is None:
            notes.pop(key, None)
        else:
            notes[key] = value
    meta["annotations"] = notes
    lease["spec"]["holderIdentity"] = None
    api.replace_lease(namespace, name, lease)


def annotation(api: KubeApi, namespace: str, name: str, key: str) -> str | None:
    lease = api.read_lease(namespace, name)
    if lease is None:
        return None
    value = ((lease.get("metadata") or {}).get("annotations") or {}).get(key)
    return str(value) if value is not None else None


async def acquire(
    api: KubeApi,
    *,
    namespace: str,
    name: str,
    holder: str,
    duration: int,
    poll: float,
    stop: asyncio.Event,
) -> bool:
    """Wait until the lease is ours (True) or the operator stops (False)."""
    while not stop.is_set():
        if await asyncio.to_thread(try_acquire, api, namespace, name, holder, duration):
            return True
        await sleep_unless_stopped(stop, poll)
    return False
