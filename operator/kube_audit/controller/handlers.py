"""kopf handlers: thin. They record what they see in the runtime and never write to objects.

No progress or diff-base annotations (event handlers keep no state on objects), no finalizers:
several pods watch the same objects and must not fight over them. The runtime's object store
plays the part of ``kopf.index``: the reconciler runs as one task outside any handler, where
kopf would not inject indices. Secrets and Nodes are not watched through kopf (see
``KubeApi.watch_secrets`` and ``watch_control_plane_nodes``: server-side selectors).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import kopf

from kube_audit.constants import GROUP, VERSION
from kube_audit.controller.reconciler import NodeRuntime
from kube_audit.errors import KubeAuditError

log = logging.getLogger("kube_audit.operator")
LIST_CHUNK = 500


def to_kopf_error(error: KubeAuditError) -> kopf.PermanentError | kopf.TemporaryError:
    """Retryable failures (API, host) are temporary; invalid input is permanent."""
    if error.retryable:
        return kopf.TemporaryError(str(error), delay=10)
    return kopf.PermanentError(str(error))


def operator_settings(settings: kopf.OperatorSettings, api_retry: float = 10.0) -> None:
    """Ride out apiserver restarts: reconnect forever, post no kopf Events, keep no state."""
    settings.networking.error_backoffs = itertools.chain([1, 2, 5], itertools.repeat(api_retry))
    settings.networking.request_timeout = 60
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.reconnect_backoff = 1.0
    settings.posting.enabled = False
    settings.peering.standalone = True
    # Per-object workers exit soon after their last event: 10,000 objects, bounded memory.
    settings.queueing.idle_timeout = 1.0
    # kopf lists everything in one response unless told otherwise: at a restart with 10,000
    # AuditUsers that one list, decoded at once, was the operator's memory peak.
    settings.watching.chunk_size = LIST_CHUNK


def build_registry(runtime: NodeRuntime, login: Any) -> kopf.OperatorRegistry:
    """Handlers bound to one runtime (one registry per simulated node in tests)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        operator_settings(settings)

    @kopf.on.login(registry=registry)
    def credentials(**_: Any) -> kopf.ConnectionInfo:
        info: kopf.ConnectionInfo = login()
        return info

    def record(kind: str, event: kopf.RawEvent, body: Any) -> None:
        try:
            runtime.observe(kind, event.get("type"), body)
        except KubeAuditError as error:
            raise to_kopf_error(error) from None

    @kopf.on.event(GROUP, VERSION, "auditusers", registry=registry)
    async def audit_user(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        record("auditusers", event, body)

    @kopf.on.event(GROUP, VERSION, "auditpolicies", registry=registry)
    async def audit_policy(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        record("auditpolicies", event, body)

    return registry
