"""Event intake: what the watches report goes into the store; bursts are coalesced into one
plan; and no plan starts before the store holds the cluster's complete current view.

Handlers only call ``observe``; all decisions happen in the reconciler, so a burst of 1,000
changes becomes one plan and at most one apiserver restart per node.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from kube_audit import hostfs
from kube_audit.constants import AUDIT_USER, PLURALS, SECRETS
from kube_audit.controller.clock import Clock
from kube_audit.controller.config import OperatorConfig
from kube_audit.controller.store import ObjectStore
from kube_audit.core.models import parse_audit_user
from kube_audit.core.users import secret_location
from kube_audit.errors import InvalidInput, KubeAuditError
from kube_audit.kube import KubeApi

log = logging.getLogger("kube_audit.operator")
USERS = PLURALS[AUDIT_USER]
SYNC_RELIST = 10.0
LAYOUT_REFRESH = 30


class Intake:
    def __init__(self, config: OperatorConfig, api: KubeApi, clock: Clock) -> None:
        self.config = config
        self.api = api
        self.clock = clock
        self.store = ObjectStore()
        self._plan_wanted = asyncio.Event()
        # Monotonic time of a retry the node holds back until then (sooner than the resync).
        self._retry_due: float | None = None
        self._status_wanted = asyncio.Event()
        # An AuditUser or AuditPolicy changed: its status should say so now, not after the
        # rollout the change waits for (the reconciler's status task waits on this).
        self.change_seen = asyncio.Event()
        self._first_change = 0.0
        self._last_change = 0.0
        # The burst holds a change that may restart kube-apiserver (a policy, a rewritten
        # manifest, drift, or any change in token-file mode): the full debounce then.
        self._may_restart = False
        # The Secrets the users refer to, kept per user as their events arrive (at 10,000
        # users a full recount per event cost 0.08 s of event loop each); recounted from the
        # store only when users changed some other way (forgotten after a re-list).
        self._wanted_version = -1
        self._wanted_by_user: dict[str, tuple[str, str]] = {}
        self._wanted: Counter[tuple[str, str]] = Counter()
        # Namespaces other than the token namespace that users name (how many name each):
        # their Secret watches run while the count is above 0.
        self._namespace_refs: Counter[str] = Counter()
        self._namespaces: frozenset[str] = frozenset()
        self.on_namespaces: Callable[[frozenset[str]], None] | None = None
        # Namespaces whose Secrets the operator may not read (no grant): why, per namespace.
        self.unreadable: dict[str, str] = {}
        self._list_started: dict[str, int] = {}

    # -- what the watches call ---------------------------------------------------------------

    def observe(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Record a watch event; wake the loop for a new plan or only a status update."""
        users_before = self.store.user_version
        if event_type == "DELETED":
            changed = self.store.remove(kind, body)
        else:
            changed = self.store.upsert(kind, body)
        if kind == USERS:
            if self._wanted_version == users_before:
                name = str((body.get("metadata") or {}).get("name") or "")
                self._want(name, None if event_type == "DELETED" else body)
                self._wanted_version = self.store.user_version
            self._follow_namespaces()
        if changed:
            self.wake_plan(identities_only=kind in (USERS, SECRETS))
            if kind != SECRETS:
                self.change_seen.set()
        elif kind != SECRETS:
            self._status_wanted.set()

    def observe_secret(self, event_type: str, body: Mapping[str, Any]) -> None:
        """A Secret event: kept only if it is one of ours or some AuditUser reads it."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        if self.store.has(SECRETS, key) or key in self._wanted_secrets():
            self.observe(SECRETS, event_type, body)

    def secrets_listing(self, namespace: str) -> None:
        """A namespace's Secret watch starts a complete list (first, or again after an error)."""
        self._list_started[namespace] = self.store.sequence

    def secrets_listed(self, namespace: str, keys: set[tuple[str, str]]) -> None:
        """The list is complete: that namespace's Secrets it lacks were deleted meanwhile;
        and the operator may read there (again)."""
        since = self._list_started.get(namespace, 0)
        changed = bool(self.store.forget_unlisted(SECRETS, keys, since, where=_in(namespace)))
        if self.unreadable.pop(namespace, None) is not None:
            log.info("Secrets in %s may be read now", namespace)
            changed = True
        if changed:
            self.wake_plan(identities_only=True)

    def secrets_forbidden(self, namespace: str, message: str) -> None:
        """The list was refused (403): the users naming that namespace say why."""
        if namespace not in self.unreadable:
            log.warning("may not read Secrets in %s (no grant there): %s", namespace, message)
            self.unreadable[namespace] = message
            self.wake_plan(identities_only=True)

    def secrets_unwatched(self, namespace: str) -> None:
        """No user names that namespace any more: forget what its watch brought."""
        self._list_started.pop(namespace, None)
        self.unreadable.pop(namespace, None)
        if self.store.forget_unlisted(SECRETS, set(), self.store.sequence, where=_in(namespace)):
            self.wake_plan(identities_only=True)

    def node_changed(self) -> None:
        self._status_wanted.set()

    def wake_plan(self, identities_only: bool = False) -> None:
        """``identities_only``: the change is a person or a token Secret, which in webhook mode
        restarts nothing and is worth applying sooner."""
        now = self.clock.monotonic()
        if not self._plan_wanted.is_set():
            self._first_change = now
            self._may_restart = False
        self._may_restart |= not identities_only
        self._last_change = now
        self._plan_wanted.set()

    def _want(self, name: str, body: Mapping[str, Any] | None) -> None:
        """The Secret one user refers to (None: the user is gone, or invalid)."""
        old = self._wanted_by_user.pop(name, None)
        if old is not None:
            self._wanted[old] -= 1
            if self._wanted[old] <= 0:
                del self._wanted[old]
            self._namespace_refs[old[0]] -= 1
            if self._namespace_refs[old[0]] <= 0:
                del self._namespace_refs[old[0]]
        if body is None:
            return
        try:
            user = parse_audit_user(body)
        except InvalidInput:
            return
        namespace, secret, _ = secret_location(user, self.config.settings)
        self._wanted_by_user[name] = (namespace, secret)
        self._wanted[(namespace, secret)] += 1
        if namespace != self.config.settings.token_namespace:
            self._namespace_refs[namespace] += 1

    def _wanted_secrets(self) -> Counter[tuple[str, str]]:
        """Secret keys the users refer to; recounted from the store only when users changed
        other than through ``observe``."""
        version = self.store.user_version
        if self._wanted_version != version:
            self._wanted_by_user.clear()
            self._wanted.clear()
            self._namespace_refs.clear()
            for name, body in self.store.items(USERS):
                self._want(str(name), body)
            self._wanted_version = version
        return self._wanted

    def _follow_namespaces(self) -> None:
        """Tell the Secret watches when the set of namespaces users name changed."""
        self._wanted_secrets()
        if self._namespaces != self._namespace_refs.keys():
            self._namespaces = frozenset(self._namespace_refs)
            if self.on_namespaces is not None:
                self.on_namespaces(self._namespaces)

    # -- what the reconciler calls -----------------------------------------------------------

    async def next_work(self, stop: asyncio.Event) -> bool | None:
        """Wait for work: True for a plan (after a quiet debounce window, or the resync),
        False for a status update only, None when stopping."""
        waiters = [
            asyncio.ensure_future(e.wait()) for e in (self._plan_wanted, self._status_wanted, stop)
        ]
        timeout = self.config.resync
        if self._retry_due is not None:
            timeout = max(0.0, min(timeout, self._retry_due - self.clock.monotonic()))
        done, pending = await asyncio.wait(
            waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        if not done:
            self.wake_plan()
        await self._debounce(stop)
        if stop.is_set():
            return None
        plan = self._plan_wanted.is_set()
        if plan:
            self._retry_due = None
        self._plan_wanted.clear()
        self._status_wanted.clear()
        return plan

    def plan_again_in(self, seconds: float) -> None:
        """Plan again then, resync or not (a failed config due for a retry, a person's
        expiry); the earliest of several asked for wins."""
        due = self.clock.monotonic() + max(0.0, seconds)
        self._retry_due = due if self._retry_due is None else min(self._retry_due, due)

    def retry_later(self) -> None:
        """The reconcile failed: plan again after the back-off."""
        self._plan_wanted.set()

    def _quiet_time(self) -> float:
        """A burst that can restart kube-apiserver waits ``debounce``; in webhook mode a burst
        of people alone waits ``identity_debounce`` (a snapshot write): a new colleague's token
        works seconds after ``kubectl apply``."""
        if self.config.settings.identity_mode == "webhook" and not self._may_restart:
            return min(self.config.debounce, self.config.identity_debounce)
        return self.config.debounce

    async def _debounce(self, stop: asyncio.Event) -> None:
        """Wait until no change came for the quiet time (at most ``max_debounce``)."""
        while not stop.is_set() and self._plan_wanted.is_set():
            now = self.clock.monotonic()
            quiet_at = self._last_change + self._quiet_time()
            give_up_at = self._first_change + self.config.max_debounce
            wake = min(quiet_at, give_up_at)
            if now >= wake:
                return
            await self.clock.sleep(wake - now, stop)

    async def wait_synced(self, stop: asyncio.Event) -> None:
        """Plan only from the cluster's current view of every AuditUser and AuditPolicy.

        kopf lists each kind on its own and 10,000 users take a while; a watch can also be
        failing for a while (a CRD whose storage is still initializing answers 429). A plan
        made from a half-loaded view would drop users or the policy and restart the apiserver
        twice. And a watch that re-lists (after every apiserver restart we cause) never reports
        what was deleted meanwhile: a deleted user would keep a working token. So before every
        plan both kinds are listed (name and uid): what the list lacks is forgotten, what the
        store lacks (or has with another uid: deleted and made again) is waited for. The names
        are listed again now and then, so an object deleted meanwhile is not waited for.
        """
        while not stop.is_set():
            missing: set[tuple[str, str, str]] = set()
            try:
                for plural in PLURALS.values():
                    since = self.store.sequence
                    listed = await asyncio.to_thread(self.api.list_uids, plural)
                    gone = self.store.forget_unlisted(plural, set(listed), since)
                    if gone:
                        log.info("%s deleted while unwatched: %s", plural, ", ".join(gone))
                        self._follow_namespaces()
                    missing.update((plural, name, uid) for name, uid in listed.items())
            except KubeAuditError as error:
                log.warning("cannot list the objects yet, will retry: %s", error)
                await self.clock.sleep(self.config.retry_backoff, stop)
                continue
            relist_at = self.clock.monotonic() + SYNC_RELIST
            while not stop.is_set():
                missing = {m for m in missing if self.store.uid(m[0], m[1]) != m[2]}
                if not missing:
                    return
                if self.clock.monotonic() >= relist_at:
                    log.info("watches still miss %d listed objects; listing again", len(missing))
                    break
                await self.clock.sleep(0.1, stop)

    async def watch_manifest(self, stop: asyncio.Event) -> None:
        """Plan again when someone else rewrites the manifest (``kubeadm upgrade`` does, and
        drops our flags): the identities come back within seconds, not at the next resync.
        The kubelet config (where the manifest lives) is read again every minute or so."""
        seen: tuple[int, int, int] | None = None
        polls = 0
        manifest = None
        while not stop.is_set():
            current = None
            try:
                if manifest is None or polls % LAYOUT_REFRESH == 0:
                    manifest = self.config.layout().manifest
                current = hostfs.file_signature(manifest)
            except KubeAuditError:
                manifest = None
            if seen is not None and current is not None and current != seen:
                self.wake_plan()
            seen = current if current is not None else seen
            polls += 1
            await self.clock.sleep(self.config.manifest_poll, stop)


def _in(namespace: str) -> Callable[[Any], bool]:
    """Store keys of Secrets in that namespace (what its watch covers)."""
    return lambda key: bool(key[0] == namespace)
