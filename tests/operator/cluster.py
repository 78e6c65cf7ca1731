"""An in-process Kubernetes API for kopf's real watch loop: kmock's emulator with its gaps closed.

kmock 0.8's KubernetesEmulator stores and streams objects but does not stamp metadata, answers
lists without a resourceVersion, replays every object on each watch, merges JSON patches as
dicts and has no PUT. kopf and the Kubernetes client need all of those, so this subclass adds:
bundled built-in resources (kopf waits forever without v1/namespaces), resourceVersion, uid,
generation (bumped on spec changes only), creationTimestamp, generateName; list resourceVersion
and watch-from-resourceVersion; RFC 6902 JSON patch with ``test`` (422 on failure) and RFC 7386
merge patch; PUT with optimistic concurrency (409); the status subresource; ownerReference
cascade on delete; and an outage switch that drops watches and answers 503.

Like the apiserver it refuses (401) every request without one of its two bearer tokens: a
client that sends ``Bearer bearer <token>`` (the in-cluster loader's prefix doubled) fails here
as it does on a cluster. ``ADMIN_TOKEN`` may do anything; ``OPERATOR_TOKEN`` is the operator's
ServiceAccount as deploy/rbac.yaml grants it Secrets: only in the namespaces of
``secret_grants`` (the token namespace, and those an admin granted), 403 elsewhere and for any
cluster-wide Secret request, in the apiserver's words; the admin impersonating that
ServiceAccount (``Impersonate-User``) is treated the same, as the contract checks do on both.

It answers 400 to any query parameter it does not implement, rather than ignoring it: a
``labelSelector`` silently ignored once made ``control_plane_nodes()`` return workers here
while the real apiserver filtered them. Label selectors (equality and existence) filter lists
and watches as the apiserver does, including DELETED for an object that stops matching.
"""

from __future__ import annotations

import asyncio
import copy
import json
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import kubernetes.client
from kmock._internal import enums, k8s, references, rendering

from kube_audit.constants import GROUP, VERSION
from tests.contract import OPERATOR_USER

# The credentials the emulator accepts, as "Authorization: Bearer <it>".
ADMIN_TOKEN = "emulator-admin-token-0123456789abcdef"
OPERATOR_TOKEN = "emulator-operator-token-0123456789abcd"

CRDS = {
    "auditusers": ("AuditUser", "audituser", {"au"}),
    "auditpolicies": ("AuditPolicy", "auditpolicy", {"ap"}),
}
VERBS = {"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"}


class PatchFailed(Exception):
    pass


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902: add, remove, replace, test (enough for kopf and kubectl)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last = parts[-1] if parts else ""
        kind = op["op"]
        if kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last, None)
            if current != op.get("value"):
                raise PatchFailed(f"test failed at {op['path']}")
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                parent.insert(index, op["value"]) if kind == "add" else parent.__setitem__(
                    index, op["value"]
                )
            else:
                if kind == "replace" and last not in parent:
                    raise PatchFailed(f"replace of missing {op['path']}")
                parent[last] = op["value"]
        elif kind == "remove":
            if isinstance(parent, list):
                parent.pop(int(last))
            elif last in parent:
                del parent[last]
            else:
                raise PatchFailed(f"remove of missing {op['path']}")
        else:
            raise PatchFailed(f"unsupported op {kind}")
    return doc


def merge_patch(doc: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(doc) if isinstance(doc, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


REQUEST_RECORD = 2000
QUERY_PARAMS = frozenset(
    {
        "limit",
        "continue",
        "labelSelector",
        "fieldSelector",
        "resourceVersion",
        "watch",
        "allowWatchBookmarks",
        "timeoutSeconds",
        "fieldManager",
    }
)


def bearer_token(header: str) -> str | None:
    """The token as kube-apiserver's bearer authenticator reads the header: the scheme in any
    case, the token the second space-separated part (so ``Bearer bearer x`` is "bearer")."""
    parts = header.split(" ", 2)
    if len(parts) < 2 or parts[0].lower() != "bearer" or not parts[1]:
        return None
    return parts[1]


def parse_field_selector(text: str) -> list[tuple[str, str]]:
    """``metadata.name=x`` and ``metadata.namespace=x`` (what every kind supports), as (key in
    metadata, value); anything else is refused (ValueError) rather than ignored."""
    terms = []
    for raw in (t.strip() for t in text.split(",") if t.strip()):
        key, eq, value = raw.partition("=")
        field = key.strip().removeprefix("metadata.")
        if not eq or value.startswith("=") or field not in ("name", "namespace"):
            raise ValueError(f"field selector {raw!r} is not implemented")
        terms.append((field, value.strip()))
    return terms


def parse_label_selector(text: str) -> list[tuple[str, str, str | None]]:
    """``a``, ``!a``, ``a=b``, ``a==b``, ``a!=b``, comma-separated (all must hold); set-based
    selectors are refused (ValueError) rather than misread."""
    terms: list[tuple[str, str, str | None]] = []
    for raw in (t.strip() for t in text.split(",") if t.strip()):
        if " in " in raw or " notin " in raw or "(" in raw:
            raise ValueError(f"set-based selector {raw!r} is not implemented")
        if "!=" in raw:
            key, value = raw.split("!=", 1)
            terms.append((key.strip(), "!=", value.strip()))
        elif "==" in raw or "=" in raw:
            key, value = raw.split("==", 1) if "==" in raw else raw.split("=", 1)
            terms.append((key.strip(), "=", value.strip()))
        elif raw.startswith("!"):
            terms.append((raw[1:].strip(), "!", None))
        else:
            terms.append((raw, "exists", None))
    return terms


def labels_match(terms: list[tuple[str, str, str | None]], labels: dict[str, str]) -> bool:
    for key, op, value in terms:
        present = key in labels
        if (
            (op == "exists" and not present)
            or (op == "!" and present)
            or (op == "=" and labels.get(key) != value)
            or (op == "!=" and present and labels.get(key) == value)
        ):
            return False
    return True


def _body_of(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


@attrs.define(kw_only=True)
class Cluster(kmock.KubernetesEmulator):
    rv: int = 0
    down: bool = False
    list_delay: dict[str, float] = attrs.field(factory=dict)
    # Every collection read of Secrets (path and query): what the operator asks to see.
    secret_reads: list[str] = attrs.field(factory=list)
    # Every list served: (plural, the limit asked, the items sent), to see that lists are paged.
    list_pages: list[tuple[str, int, int]] = attrs.field(factory=list)
    # Namespaces where OPERATOR_TOKEN may read and write Secrets (its Roles).
    secret_grants: set[str] = attrs.field(factory=lambda: {"kube-audit"})

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        for plural, (kind, singular, short) in CRDS.items():
            self.resources[f"{GROUP}/{VERSION}/{plural}"] = kmock.ResourceInfo(
                kind=kind,
                singular=singular,
                namespaced=False,
                verbs=VERBS,
                shortnames=short,
                subresources={"status"},
            )

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _has_status(self, resource: references.resource) -> bool:
        return resource.group == GROUP

    async def set_down(self, down: bool) -> None:
        """Simulate an apiserver outage: 503 for every request, open watches dropped."""
        self.down = down
        for bus in list(self._buses.values()):
            await bus.put({"type": "_WAKE"})

    @staticmethod
    def _error(status: int, reason: str, message: str) -> k8s.KubernetesError:
        return k8s.KubernetesError(status=status, reason=reason, message=message, details={})

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        # kmock records every request and matches each new one against the whole record by
        # identity, so a request costs O(requests so far); at 10,000 users that made the
        # emulator, not the operator, the bottleneck. No test asserts on the record: keep its tail.
        if len(self._requests) > REQUEST_RECORD:
            del self._requests[: -REQUEST_RECORD // 2]
        try:
            token = bearer_token(request.headers.get("Authorization", ""))
            if token not in (ADMIN_TOKEN, OPERATOR_TOKEN):
                raise self._error(401, "Unauthorized", "Unauthorized")
            impersonated = request.headers.get("Impersonate-User")
            if impersonated not in (None, OPERATOR_USER) or (impersonated and token != ADMIN_TOKEN):
                raise self._error(400, "BadRequest", f"impersonating {impersonated!r}: not here")
            if token == OPERATOR_TOKEN or impersonated == OPERATOR_USER:
                self._authorize_operator(request)
            unknown = sorted(set(request.params) - QUERY_PARAMS)
            if unknown:
                raise self._error(
                    400, "BadRequest", f"query parameter(s) not implemented here: {unknown}"
                )
            try:
                parse_label_selector(str(request.params.get("labelSelector") or ""))
                parse_field_selector(str(request.params.get("fieldSelector") or ""))
            except ValueError as error:
                raise self._error(400, "BadRequest", str(error)) from None
            if self.down:
                raise self._error(503, "ServiceUnavailable", "apiserver is restarting")
            resource = request.resource
            if (
                resource is not None
                and resource.plural == "secrets"
                and request.name is None
                and request.method == enums.method.GET
            ):
                self.secret_reads.append(str(request.url.path_qs))
            if (
                resource is not None
                and request.name is not None
                and request.method == enums.method.PUT
            ):
                return await self._mutate(request, "replace")
            if resource is not None and request.action == enums.action.CREATE:
                return await self._mutate(request, "create")
            if resource is not None and request.action == enums.action.UPDATE:
                return await self._mutate(request, "patch")
            if resource is not None and request.action == enums.action.DELETE and request.name:
                return await self._mutate(request, "delete")
        except k8s.KubernetesError as error:
            return await self._render_error(error)
        return await super()._handle(request)

    def _authorize_operator(self, request: rendering.Request) -> None:
        """Secrets only where a Role grants them, as RBAC answers (a cluster-wide list is
        refused even when some namespaces are granted)."""
        resource = request.resource
        if resource is None or resource.plural != "secrets":
            return
        namespace = request.namespace
        if namespace is not None and namespace in self.secret_grants:
            return
        verbs = {"FETCH": "get", "UPDATE": "patch"}
        action = request.action.name if request.action else "FETCH"
        verb = verbs.get(action, action.lower())
        where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
        raise self._error(
            403,
            "Forbidden",
            f'secrets is forbidden: User "{OPERATOR_USER}" cannot {verb} resource "secrets" '
            f'in API group "" {where}',
        )

    async def _emit(
        self,
        resource: references.resource,
        kind: str,
        obj: dict[str, Any],
        old: dict[str, Any] | None = None,
    ) -> None:
        event = {"type": kind, "object": copy.deepcopy(obj)}
        if old is not None:
            event["old"] = copy.deepcopy(old)
        await self._buses[resource].put(event)

    async def _mutate(self, request: rendering.Request, op: str) -> aiohttp.web.StreamResponse:
        resource = request.resource
        assert resource is not None
        async with self._lock:
            if op == "create":
                obj, status = await self._create(resource, request), 201
            elif op == "delete":
                obj, status = (
                    await self._delete(resource, request.namespace, str(request.name)),
                    200,
                )
            else:
                obj, status = await self._update(resource, request, op), 200
        return aiohttp.web.json_response(obj, status=status)

    async def _create(
        self, resource: references.resource, request: rendering.Request
    ) -> dict[str, Any]:
        data = copy.deepcopy(request.data or {})
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)
        namespace = request.namespace or meta.get("namespace")
        if namespace:
            meta["namespace"] = namespace
        key = (resource, namespace, meta["name"])
        if key in self._objects and not self._objects[key].deleted:
            raise self._error(
                409, "AlreadyExists", f"{resource.plural} {meta['name']!r} already exists"
            )
        meta.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            resourceVersion=self._next_rv(),
            generation=1,
        )
        if self._has_status(resource):
            data.pop("status", None)
        if key in self._objects:
            self._objects[key].create(data)
        else:
            self._objects[key] = data
        await self._emit(resource, "ADDED", data)
        return data

    async def _update(
        self, resource: references.resource, request: rendering.Request, op: str
    ) -> dict[str, Any]:
        key = (resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            raise k8s.KubernetesObjectNotFoundError()
        old = copy.deepcopy(self._objects[key].raw)
        data = request.data
        content_type = request.headers.get("Content-Type", "")
        try:
            if op == "replace":
                new = copy.deepcopy(data)
            elif "json-patch" in content_type or isinstance(data, list):
                new = json_patch(old, data)
            else:
                new = merge_patch(old, data)
        except (PatchFailed, KeyError, IndexError, ValueError, TypeError) as error:
            raise self._error(422, "Invalid", f"the patch cannot be applied: {error}") from None
        wanted_rv = (
            (data.get("metadata") or {}).get("resourceVersion") if isinstance(data, dict) else None
        )
        if wanted_rv and wanted_rv != old["metadata"]["resourceVersion"]:
            raise self._error(
                409, "Conflict", "the object has been modified; apply to the latest version"
            )
        if request.subresource == "status":
            new = {**old, "status": new.get("status")}
        elif self._has_status(resource):
            new["status"] = old.get("status")
        if new.get("status") is None:
            new.pop("status", None)
        meta = new.setdefault("metadata", {})
        for fixed in ("uid", "creationTimestamp", "name", "namespace", "generation"):
            if fixed in old["metadata"]:
                meta[fixed] = old["metadata"][fixed]
        if _body_of(new) != _body_of(old):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return old
        meta["resourceVersion"] = self._next_rv()
        self._objects[key].create(new)
        await self._emit(resource, "MODIFIED", new, old)
        return new

    async def _delete(
        self, resource: references.resource, namespace: str | None, name: str
    ) -> dict[str, Any]:
        key = (resource, namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            raise k8s.KubernetesObjectNotFoundError()
        obj = copy.deepcopy(self._objects[key].raw)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._objects[key].delete()
        await self._emit(resource, "DELETED", obj)
        uid = obj["metadata"].get("uid")
        for (res, ns, dep_name), dep in list(self._objects.items()):
            if dep.deleted:
                continue
            owners = (dep.raw.get("metadata") or {}).get("ownerReferences") or []
            if any(o.get("uid") == uid for o in owners):
                await self._delete(res, ns, dep_name)
        return obj

    def _visible(self, request: rendering.Request, obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        if request.namespace is not None and meta.get("namespace") != request.namespace:
            return False
        if request.name is not None and meta.get("name") != request.name:
            return False
        selector = parse_label_selector(str(request.params.get("labelSelector") or ""))
        fields = parse_field_selector(str(request.params.get("fieldSelector") or ""))
        if any(str(meta.get(key) or "") != value for key, value in fields):
            return False
        return labels_match(selector, meta.get("labels") or {})

    def _current(self, request: rendering.Request) -> Iterator[dict[str, Any]]:
        for (resource, _, _), obj in self._objects.items():
            if resource == request.resource and not obj.deleted and self._visible(request, obj.raw):
                yield obj.raw

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        """A list, paged with ``limit``/``continue`` as the apiserver does; ``list_delay``
        makes a big collection arrive late, like 10,000 objects on a real cluster."""
        if request.resource not in list(self._get_resources()):
            raise k8s.KubernetesResourceNotFoundError()
        assert request.resource is not None
        await asyncio.sleep(self.list_delay.get(request.resource.plural, 0.0))
        async with self._lock:
            items = list(self._current(request))
            meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
            limit = int(request.params.get("limit") or 0)
            if limit > 0:
                start = int(request.params.get("continue") or 0)
                if start + limit < len(items):
                    meta["continue"] = str(start + limit)
                items = items[start : start + limit]
            self.list_pages.append((request.resource.plural, limit, len(items)))
            return {"metadata": meta, "items": copy.deepcopy(items)}

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        yield b""
        assert request.resource is not None
        since = int(request.params.get("resourceVersion") or 0)
        bus = self._buses[request.resource]
        marker = await bus.mark()
        try:
            async with self._lock:
                replay = [
                    copy.deepcopy(o)
                    for o in self._current(request)
                    if int(o["metadata"]["resourceVersion"]) > since
                ]
            for obj in replay:
                yield {"type": "ADDED", "object": obj}
            async for event in bus.stream(since=marker):
                if self.down:
                    return
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "_WAKE" or int(obj["metadata"]["resourceVersion"]) <= since:
                    continue
                now_seen = self._visible(request, obj)
                was_seen = "old" in event and self._visible(request, event["old"])
                if kind == "MODIFIED" and now_seen != was_seen:
                    kind = "ADDED" if now_seen else "DELETED"  # as the apiserver's watch cache
                elif not now_seen:
                    continue
                yield {"type": kind, "object": obj}
        finally:
            await bus.unmark(marker)


class ClusterThread:
    """The emulator on its own thread and event loop, reachable over HTTP like a real apiserver."""

    def __init__(self) -> None:
        self.cluster: Cluster | None = None
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kmock-cluster", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with Cluster() as cluster, kmock.Server(cluster):
            self.cluster = cluster
            self.url = str(cluster.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def start(self) -> ClusterThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the mock API server did not start")
        return self

    def call(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def set_down(self, down: bool) -> None:
        assert self.cluster is not None
        self.call(self.cluster.set_down(down))

    def configuration(self, token: str = ADMIN_TOKEN) -> kubernetes.client.Configuration:
        """A client configuration with a token the emulator accepts (the admin's, or the
        operator's ServiceAccount's)."""
        conf = kubernetes.client.Configuration(host=self.url)
        conf.api_key = {"authorization": f"Bearer {token}"}
        return conf

    def grant_secrets(self, namespace: str) -> None:
        """What ``kube-audit grant-secrets NAMESPACE | kubectl apply -f -`` does."""
        assert self.cluster is not None
        self.cluster.secret_grants.add(namespace)

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig whose current context is this API server, for a separate process."""
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: mock\n"
            f"clusters: [{{name: mock, cluster: {{server: '{self.url}'}}}}]\n"
            f"users: [{{name: mock, user: {{token: {ADMIN_TOKEN}}}}}]\n"
            "contexts: [{name: mock, context: {cluster: mock, user: mock}}]\n"
        )
        return path

    def delay_lists(self, plural: str, seconds: float) -> None:
        assert self.cluster is not None
        self.cluster.list_delay[plural] = seconds

    def objects(self, plural: str) -> dict[str, dict[str, Any]]:
        """Current objects of a resource by name (a snapshot taken on the cluster's loop)."""
        assert self.cluster is not None
        cluster = self.cluster

        async def snapshot() -> dict[str, dict[str, Any]]:
            async with cluster._lock:
                return {
                    name: json.loads(json.dumps(obj.raw))
                    for (res, _, name), obj in cluster.objects.items()
                    if res.plural == plural and not obj.deleted
                }

        result: dict[str, dict[str, Any]] = self.call(snapshot())
        return result

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
