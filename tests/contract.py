"""API checks that the emulator and the real kube-apiserver must both pass.

The emulator stands in for the apiserver in the fast tests; wherever the two disagree, the real
one is right. Every behaviour of the API that kube-audit relies on is checked here, once
against each (tests/operator/test_contract.py, tests/controlplane/test_contract.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from typing import Any

import kubernetes.client

from kube_audit.constants import CONTROL_PLANE_LABEL, TOKEN_FOR_LABEL
from kube_audit.errors import ClusterError, NotFound
from kube_audit.kube import FORBIDDEN, LISTED, LISTING, KubeApi


def _wait(what: str, check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"{what} not seen within {timeout}s")


# The operator's ServiceAccount as deploy/rbac.yaml names it.
OPERATOR_USER = "system:serviceaccount:kube-audit:kube-audit"


def check_api_contract(api: KubeApi) -> None:
    """Run every check; each names what kube-audit would get wrong without it."""
    core = kubernetes.client.CoreV1Api(api.client)
    suffix = uuid.uuid4().hex[:6]
    # Objects get unique names in "default" (kmock cannot create Namespaces).
    _nodes_by_label(api, core, suffix)
    _control_plane_node_watch(api, core, suffix)
    _token_secrets(api, core, suffix)
    _labelled_secret_watch(api, core, suffix)
    _forbidden_secret_watch(api)
    _consenting_secret(api, core, suffix)
    _leases(api, suffix)


def _nodes_by_label(api: KubeApi, core: Any, suffix: str) -> None:
    """Only control-plane Nodes: a worker's entry would keep every object from Ready."""
    worker, control = f"worker-{suffix}", f"control-{suffix}"
    core.create_node({"metadata": {"name": worker}})
    core.create_node({"metadata": {"name": control, "labels": {CONTROL_PLANE_LABEL: ""}}})
    try:
        nodes = api.control_plane_nodes()
        assert control in nodes and worker not in nodes, nodes
    finally:
        core.delete_node(worker)
        core.delete_node(control)


def _control_plane_node_watch(api: KubeApi, core: Any, suffix: str) -> None:
    """The Node watch filtered by the apiserver: a worker never arrives, a control-plane node
    does, and leaves as DELETED."""
    events: list[tuple[str, str]] = []
    stop = threading.Event()
    worker, control = f"watch-worker-{suffix}", f"watch-control-{suffix}"

    def record(kind: str, obj: dict[str, Any]) -> None:
        events.append((kind, str((obj.get("metadata") or {}).get("name") or "")))

    thread = threading.Thread(
        target=api.watch_control_plane_nodes, args=(record, stop), daemon=True
    )
    thread.start()
    try:
        _wait("the first list", lambda: any(kind == LISTED for kind, _ in events))
        core.create_node({"metadata": {"name": worker}})
        core.create_node({"metadata": {"name": control, "labels": {CONTROL_PLANE_LABEL: ""}}})
        _wait("the control-plane node", lambda: ("ADDED", control) in events)
        core.delete_node(control)
        _wait("DELETED when it goes", lambda: ("DELETED", control) in events)
        assert not any(name == worker for _, name in events), events
    finally:
        for name in (worker, control):
            with contextlib.suppress(kubernetes.client.ApiException):
                core.delete_node(name)
        stop.set()
        api.stop_watches()
        thread.join(15)
    assert not thread.is_alive(), "the watch did not stop"


NAMESPACE = "default"


def _token_secrets(api: KubeApi, core: Any, suffix: str) -> None:
    """Create once (409 means another pod won), list ours by label, read a missing one."""
    ns, ours, other = NAMESPACE, f"token-{suffix}", f"other-{suffix}"
    # A real owner: the garbage collector deletes a dependent whose owner's uid it cannot
    # find, and did so mid-test on the real control plane (a made-up uid, one run in three).
    owned_by = core.create_namespaced_config_map(ns, {"metadata": {"name": f"owner-{suffix}"}})
    owner = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": owned_by.metadata.name,
        "uid": owned_by.metadata.uid,
    }
    created = api.create_token_secret(ns, ours, "x" * 43, owner)
    assert created is not None and created["metadata"]["namespace"] == ns
    assert api.create_token_secret(ns, ours, "y" * 43, owner) is None, "409 is None"
    core.create_namespaced_secret(ns, {"metadata": {"name": other}})
    try:
        listed = {s["metadata"]["name"] for s in api.list_token_secrets(ns)}
        assert ours in listed and other not in listed, listed
        assert api.read_secret(ns, f"missing-{suffix}") is None
    finally:
        core.delete_namespaced_secret(ours, ns)
        core.delete_namespaced_secret(other, ns)
        core.delete_namespaced_config_map(owned_by.metadata.name, ns)
    try:
        api.patch_status("auditusers", f"missing-{suffix}", {"nodes": {}})
    except NotFound:
        pass
    else:
        raise AssertionError("a status patch of a missing object must be NotFound")


def _labelled_secret_watch(api: KubeApi, core: Any, suffix: str) -> None:
    """The label-selected watch: a Secret that gains the label arrives, one that loses it
    leaves as DELETED (else a withdrawn consent would keep a working token)."""
    events: list[tuple[str, str]] = []
    stop = threading.Event()
    namespace, plain, consent = NAMESPACE, f"plain-{suffix}", f"consent-{suffix}"

    def record(kind: str, obj: dict[str, Any]) -> None:
        if kind in (LISTING, LISTED):
            events.append((kind, ""))
        elif (obj.get("metadata") or {}).get("namespace") == namespace:
            events.append((kind, obj["metadata"]["name"]))

    thread = threading.Thread(
        target=api.watch_secrets,
        args=(record, stop),
        kwargs={"namespace": namespace, "label_selector": TOKEN_FOR_LABEL},
        daemon=True,
    )
    thread.start()
    try:
        _wait("the first list", lambda: (LISTED, "") in events)
        core.create_namespaced_secret(namespace, {"metadata": {"name": plain}})
        core.create_namespaced_secret(
            namespace, {"metadata": {"name": consent, "labels": {TOKEN_FOR_LABEL: "alice"}}}
        )
        _wait("the labelled Secret", lambda: ("ADDED", consent) in events)
        core.patch_namespaced_secret(
            consent, namespace, {"metadata": {"labels": {TOKEN_FOR_LABEL: None}}}
        )
        _wait("DELETED when the label goes", lambda: ("DELETED", consent) in events)
        assert not any(name == plain for _, name in events), events
    finally:
        for name in (plain, consent):
            core.delete_namespaced_secret(name, namespace)
        stop.set()
        api.stop_watches()
        thread.join(15)
    assert not thread.is_alive(), "the watch did not stop"


def _forbidden_secret_watch(api: KubeApi) -> None:
    """As the operator's ServiceAccount where no Role grants it Secrets: the watch reports
    FORBIDDEN with the apiserver's words (the user's status names the namespace) and keeps
    trying, and a read by label is a 403, not an outage."""
    client = kubernetes.client.ApiClient(
        api.client.configuration, header_name="Impersonate-User", header_value=OPERATOR_USER
    )
    operator = KubeApi(client)
    events: list[tuple[str, dict[str, Any]]] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=operator.watch_secrets,
        args=(lambda kind, obj: events.append((kind, obj)), stop),
        kwargs={"namespace": NAMESPACE, "label_selector": TOKEN_FOR_LABEL},
        daemon=True,
    )
    thread.start()
    try:
        _wait("FORBIDDEN", lambda: [obj for kind, obj in events if kind == FORBIDDEN])
        message = next(obj["message"] for kind, obj in events if kind == FORBIDDEN)
        assert "403" in message and f'"{NAMESPACE}"' in message, message
        assert 'cannot list resource "secrets"' in message, message
        assert not [kind for kind, _ in events if kind in (LISTED, "ADDED")], events
        try:
            operator.read_consenting_secret(NAMESPACE, "anything", "carol")
        except ClusterError as error:
            assert error.status == 403, error
        else:
            raise AssertionError("a read where nothing is granted must be refused")
    finally:
        stop.set()
        operator.stop_watches()
        thread.join(20)
    assert not thread.is_alive(), "the watch did not stop"


def _consenting_secret(api: KubeApi, core: Any, suffix: str) -> None:
    """A referenced Secret arrives only with the consent label for that user (label and field
    selectors filter on the server): its data is never ours before it consents."""
    namespace, name, other = NAMESPACE, f"ref-{suffix}", f"ref-other-{suffix}"
    core.create_namespaced_secret(namespace, {"metadata": {"name": name}})
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": other, "labels": {TOKEN_FOR_LABEL: "carol"}}}
    )
    try:
        assert api.read_consenting_secret(namespace, name, "carol") is None, "no label"
        core.patch_namespaced_secret(
            name, namespace, {"metadata": {"labels": {TOKEN_FOR_LABEL: "dave"}}}
        )
        assert api.read_consenting_secret(namespace, name, "carol") is None, "another's label"
        core.patch_namespaced_secret(
            name, namespace, {"metadata": {"labels": {TOKEN_FOR_LABEL: "carol"}}}
        )
        found = api.read_consenting_secret(namespace, name, "carol")
        assert found is not None and found["metadata"]["name"] == name, "only that one"
        assert found["metadata"]["namespace"] == namespace
        assert api.read_consenting_secret(namespace, f"missing-{suffix}", "carol") is None
    finally:
        for secret in (name, other):
            core.delete_namespaced_secret(secret, namespace)


def _leases(api: KubeApi, suffix: str) -> None:
    """Optimistic concurrency on Leases (one rollout at a time) and node records by patch."""
    ns, name, node = NAMESPACE, f"rollout-{suffix}", f"cp-{suffix}"
    assert api.read_lease(ns, name) is None
    body = {"metadata": {"name": name, "namespace": ns}, "spec": {}}
    assert api.create_lease(ns, body)
    assert not api.create_lease(ns, body), "a second create is a lost race"
    first = api.read_lease(ns, name)
    assert first is not None
    winner = {**first, "spec": {"holderIdentity": "cp-1"}}
    assert api.replace_lease(ns, name, winner)
    loser = {**first, "spec": {"holderIdentity": "cp-2"}}
    assert not api.replace_lease(ns, name, loser), "a stale resourceVersion loses"
    confirmed = "kube-audit.io/snapshot-confirmed-at"
    api.write_node_record(ns, node, {"kube-audit.io/outcome": "Applied", confirmed: None}, _now())
    api.write_node_record(ns, node, {"kube-audit.io/config-hash": "abc", confirmed: "t"}, _now())
    records = api.node_records(ns)
    assert records[node] == {
        "kube-audit.io/outcome": "Applied",
        "kube-audit.io/config-hash": "abc",
        confirmed: "t",
    }, records
    api.write_node_record(ns, node, {confirmed: None}, _now())
    assert confirmed not in api.node_records(ns)[node], "None removes an annotation"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
