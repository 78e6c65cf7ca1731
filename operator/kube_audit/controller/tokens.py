"""Token Secrets: create the default ones, rotate on request, fetch referenced ones.

Every pod of every node runs this; a create that loses a race to another pod (409) reads the
winner's Secret, so every node serves the same token.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets as random_tokens
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from kube_audit.constants import (
    API_VERSION,
    AUDIT_USER,
    FINGERPRINT_KEY,
    FINGERPRINT_KEY_SECRET,
    PLURALS,
    ROTATE_ANNOTATION,
    ROTATED_FOR,
    SECRETS,
)
from kube_audit.controller.aio import run_bounded
from kube_audit.controller.store import ObjectStore
from kube_audit.core.models import AuditUser, parse_audit_user
from kube_audit.core.settings import Settings
from kube_audit.core.status import APPLIED
from kube_audit.core.users import secret_location
from kube_audit.errors import ClusterError, InvalidInput, KubeAuditError
from kube_audit.kube import KubeApi

log = logging.getLogger("kube_audit.operator")


def was_live(body: Mapping[str, Any]) -> bool:
    """Some node served this user's token already (its Secret existed before)."""
    nodes = (body.get("status") or {}).get("nodes") or {}
    return any((entry or {}).get("outcome") == APPLIED for entry in nodes.values())


def valid_users(store: ObjectStore) -> Iterator[tuple[dict[str, Any], AuditUser]]:
    """Valid users, decoded one at a time (never all 10,000 at once)."""
    for _, body in store.items(PLURALS[AUDIT_USER]):
        try:
            yield body, parse_audit_user(body)
        except InvalidInput:
            continue


class TokenSecrets:
    def __init__(
        self,
        api: KubeApi,
        store: ObjectStore,
        settings: Settings,
        unreadable: Mapping[str, str],
        on_forbidden: Callable[[str, str], None],
    ) -> None:
        self.api = api
        self.store = store
        self.settings = settings
        # Namespaces without a grant to read Secrets (the intake's, kept by their watches).
        self.unreadable = unreadable
        self.on_forbidden = on_forbidden

    async def ensure(self, stop: asyncio.Event) -> list[KubeAuditError]:
        """Every user's Secret present and rotated as asked; the per-user failures (the others
        go on: one Secret the API refuses must not hold back everyone's token). First the
        cluster's fingerprint key, so no plan makes a fingerprint without it."""
        await self._ensure_fingerprint_key()
        if any(
            user.spec.token_secret_ref is None
            and not self.store.has(SECRETS, secret_location(user, self.settings)[:2])
            for _, user in valid_users(self.store)
        ):
            for raw in await asyncio.to_thread(
                self.api.list_token_secrets, self.settings.token_namespace
            ):
                self.store.upsert(SECRETS, raw)

        async def one(body: Mapping[str, Any], user: AuditUser) -> None:
            ns, name, _ = secret_location(user, self.settings)
            if not self.store.has(SECRETS, (ns, name)):
                await self._fetch_or_create(body, user, ns, name)
            await self._rotate_if_asked(user, ns, name)

        jobs = (functools.partial(one, b, u) for b, u in valid_users(self.store))
        return await run_bounded(jobs, stop, "token Secret")

    async def _ensure_fingerprint_key(self) -> None:
        """The key people's token fingerprints are made with (status, audit events), made
        once for the cluster by whichever pod is first; the others read it."""
        ns = self.settings.token_namespace
        if self.store.has(SECRETS, (ns, FINGERPRINT_KEY_SECRET)):
            return
        value = random_tokens.token_urlsafe(32)
        raw = await asyncio.to_thread(
            self.api.create_key_secret, ns, FINGERPRINT_KEY_SECRET, FINGERPRINT_KEY, value
        )
        if raw is None:
            found = await asyncio.to_thread(self.api.read_secret, ns, FINGERPRINT_KEY_SECRET)
            raw = found[1] if found is not None else None
        else:
            log.info("fingerprint key Secret %s/%s created", ns, FINGERPRINT_KEY_SECRET)
        if raw is not None:
            self.store.upsert(SECRETS, raw)

    async def _fetch_or_create(
        self, body: Mapping[str, Any], user: AuditUser, ns: str, name: str
    ) -> None:
        raw: dict[str, Any] | None = None
        if user.spec.token_secret_ref is None and not user.spec.disabled:
            owner = {
                "apiVersion": body.get("apiVersion", API_VERSION),
                "kind": AUDIT_USER,
                "name": user.meta.name,
                "uid": user.meta.uid,
                "blockOwnerDeletion": False,
            }
            token = random_tokens.token_urlsafe(32)
            raw = await asyncio.to_thread(self.api.create_token_secret, ns, name, token, owner)
            log.info("token Secret %s/%s %s", ns, name, "created" if raw else "made by another pod")
            if raw is not None and was_live(body):
                await self._say_regenerated(body, user, ns, name)
        if raw is None and ns == self.settings.token_namespace:
            found = await asyncio.to_thread(self.api.read_secret, ns, name)
            raw = found[1] if found is not None else None
        elif raw is None and ns not in self.unreadable:
            # Another namespace: only a Secret that consented, never its data first.
            try:
                raw = await asyncio.to_thread(
                    self.api.read_consenting_secret, ns, name, user.meta.name
                )
            except ClusterError as error:
                if error.status != 403:
                    raise
                self.on_forbidden(ns, str(error))
        if raw is not None:
            self.store.upsert(SECRETS, raw)

    async def _say_regenerated(
        self, body: Mapping[str, Any], user: AuditUser, ns: str, name: str
    ) -> None:
        """The person's kubeconfig silently stops working otherwise: say so where they look
        (a Warning Event on the AuditUser, and the pod log). Only the pod whose create won."""
        message = (
            f"Secret {ns}/{name} with {user.meta.name}'s token was deleted, so a new token was "
            "generated: the old one stops working as each node applies the new one. Hand out a "
            f"new kubeconfig (kube-audit kubeconfig {user.meta.name})"
        )
        log.warning("%s: %s", user.ref, message)
        try:
            await asyncio.to_thread(
                self.api.create_event, body, AUDIT_USER, "Warning", "TokenRegenerated", message
            )
        except KubeAuditError as error:
            log.debug("Event on %s not posted: %s", user.ref, error)

    async def _rotate_if_asked(self, user: AuditUser, ns: str, name: str) -> None:
        """Rotate once per value of the rotate annotation (recorded on the Secret)."""
        nonce = user.meta.annotations.get(ROTATE_ANNOTATION)
        raw = self.store.get(SECRETS, (ns, name))
        if not nonce or raw is None or user.spec.token_secret_ref is not None:
            return
        meta = raw.get("metadata") or {}
        if (meta.get("annotations") or {}).get(ROTATED_FOR) == nonce:
            return
        await asyncio.to_thread(
            self.api.rotate_token_secret,
            ns,
            name,
            random_tokens.token_urlsafe(32),
            nonce,
            str(meta.get("resourceVersion") or ""),
        )
        found = await asyncio.to_thread(self.api.read_secret, ns, name)
        if found is not None:
            self.store.upsert(SECRETS, found[1])
