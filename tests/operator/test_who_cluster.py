"""``who --cluster``: the question each node's pod is asked, the merge, and every way a node can
fail to answer. The pods are played by the real ``kube-audit who`` run on one host tree per node
(the command line each pod would run, unchanged); pods/exec itself is proven on the real
apiserver and kubelet API in tests/controlplane/test_ha.py."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from kube_audit.core.audit_query import Query
from kube_audit.errors import ClusterError, PartialAnswer
from kube_audit.kube import ExecResult
from kube_audit.who.pods import plan_targets, run_who_cluster
from tests.auditlog import event

KUBE_AUDIT = str(Path(sys.executable).parent / "kube-audit")
START = datetime(2026, 11, 1, tzinfo=UTC)


def _pod(
    name: str,
    node: str,
    phase: str = "Running",
    created: str = "2026-11-01T00:00:00Z",
    containers: tuple[str, ...] = ("operator", "who"),
) -> Any:
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": {"nodeName": node, "containers": [{"name": c} for c in containers]},
        "status": {"phase": phase},
    }


class Pods:
    """The three calls ``run_who_cluster`` makes, answered from host trees on disk."""

    def __init__(self, trees: dict[str, Path], pods: list[Any], nodes: list[str]) -> None:
        self.trees, self.pods, self.nodes = trees, pods, nodes
        self.asked: list[tuple[str, list[str]]] = []
        self.broken: dict[str, ExecResult] = {}

    def control_plane_nodes(self) -> list[str]:
        return self.nodes

    def operator_pods(self, namespace: str) -> list[Any]:
        assert namespace == "kube-audit"
        return self.pods

    def exec_in_pod(
        self, namespace: str, pod: str, container: str, argv: list[str], timeout: float
    ) -> ExecResult:
        assert container == "who" and timeout == 30, "the read-only container, never the operator's"
        self.asked.append((pod, argv))
        if pod in self.broken:
            return self.broken[pod]
        node = next(p["spec"]["nodeName"] for p in self.pods if p["metadata"]["name"] == pod)
        env = {**os.environ, "KUBE_AUDIT_HOST_ROOT": str(self.trees[node])}
        done = subprocess.run(
            [KUBE_AUDIT, *argv[1:]], capture_output=True, env=env, timeout=60, check=False
        )
        return ExecResult(done.stdout, done.stderr.decode(), done.returncode)


def _log(tree: Path, events: list[dict[str, Any]]) -> None:
    folder = tree / "var/log/kubernetes/audit"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "audit.log").write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in events))


def _create(user: str, name: str, minute: int, audit_id: str) -> dict[str, Any]:
    return event(
        user=user, groups=[], verb="create", group="", resource="configmaps", namespace="team",
        name=name, stage="ResponseComplete", received=START + timedelta(minutes=minute),
        code=201, audit_id=audit_id,
    )  # fmt: skip


@pytest.fixture
def pods(tmp_path: Path) -> Pods:
    trees = {n: tmp_path / n for n in ("cp-1", "cp-2", "cp-3")}
    _log(trees["cp-1"], [_create("alice", "a", 1, "id-1"), _create("bob", "b", 4, "id-4")])
    _log(trees["cp-2"], [_create("alice", "c", 3, "id-3"), _create("alice", "x", 9, "id-9")])
    _log(trees["cp-3"], [_create("alice", "d", 2, "id-2")])
    return Pods(
        trees,
        [_pod("ka-1", "cp-1"), _pod("ka-2", "cp-2"), _pod("ka-3", "cp-3")],
        ["cp-1", "cp-2", "cp-3"],
    )


def _ask(pods: Pods, query: Query, output: str = "json") -> tuple[int | str, str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        code: int | str = run_who_cluster(
            cast(Any, pods), "kube-audit", query, output=output, out=out, err=err, timeout=30
        )
    except PartialAnswer as error:
        code = str(error)
    return code, out.getvalue(), err.getvalue()


def test_every_node_answers_merged_in_time_order_with_its_node(pods: Pods) -> None:
    until = (START + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    code, out, err = _ask(pods, Query(users=frozenset({"alice"}), until=until))
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["annotations"]["kube-audit.io/node"], e["objectRef"]["name"]) for e in events] == [
        ("cp-1", "a"),
        ("cp-3", "d"),
        ("cp-2", "c"),
    ]
    assert sorted(pod for pod, _ in pods.asked) == ["ka-1", "ka-2", "ka-3"]
    assert {tuple(argv) for _, argv in pods.asked} == {
        ("kube-audit", "who", "--output=json", "--user=alice", f"--until={until}")
    }


def test_every_filter_reaches_the_pods_as_their_who_takes_it(pods: Pods) -> None:
    query = Query(
        users=frozenset({"alice", "R&D-bot"}),
        groups=frozenset({"developer"}),
        verbs=frozenset({"create", "delete"}),
        resources=frozenset({"configmaps", "pods/log"}),
        namespaces=frozenset({"team"}),
        names=frozenset({"a", "c"}),
        statuses=frozenset({"2xx"}),
        since="2026-11-01T00:00:00.000000Z",
        until="2026-11-02T00:00:00.000000Z",
    )
    code, out, err = _ask(pods, query)
    assert code == 0 and err == "", err
    assert out == "", "alice's creates carry no group developer"
    code, out, err = _ask(pods, Query(names=frozenset({"a", "c"}), statuses=frozenset({"2xx"})))
    assert [json.loads(line)["objectRef"]["name"] for line in out.splitlines()] == ["a", "c"]


def test_table_has_a_node_column(pods: Pods) -> None:
    code, out, _ = _ask(pods, Query(verbs=frozenset({"create"})), output="table")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["NODE", "TIME", "(UTC)"]
    assert [line.split()[0] for line in lines[1:]] == ["cp-1", "cp-3", "cp-2", "cp-1", "cp-2"]


def test_a_node_that_cannot_answer_is_named_and_the_answer_is_partial(
    pods: Pods, tmp_path: Path
) -> None:
    pods.nodes.append("cp-4")  # a control-plane node without a kube-audit pod
    pods.pods.append(_pod("ka-5", "cp-5", phase="Pending"))
    pods.broken["ka-2"] = ExecResult(b"", "", None, "exec in Pod kube-audit/ka-2: HTTP 403")
    (tmp_path / "cp-3/var/log/kubernetes/audit/audit.log").unlink()
    code, out, err = _ask(pods, Query(users=frozenset({"alice"})), output="table")
    assert code == "partial answer: 1 of 5 control-plane node(s) answered"
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["cp-1"]
    assert "cp-2: not answered: exec in Pod kube-audit/ka-2: HTTP 403" in err
    assert "kube-audit: cp-3: " in err and "holds no audit log files" in err, "its own words"
    assert "cp-3: not answered: kube-audit who in pod ka-3 exited 1" in err
    assert "cp-4: not asked: no kube-audit pod runs there" in err
    assert "cp-5: not asked: its kube-audit pod ka-5 is Pending" in err


def test_no_nodes_and_no_pods_is_a_cluster_error(pods: Pods) -> None:
    pods.nodes, pods.pods = [], []
    with pytest.raises(ClusterError, match="no kube-audit Pods in namespace kube-audit"):
        _ask(pods, Query())


def test_the_newest_running_pod_of_a_node_is_asked() -> None:
    targets = plan_targets(
        ["cp-1"],
        [
            _pod("old", "cp-1", created="2026-11-01T00:00:00Z"),
            _pod("new", "cp-1", created="2026-11-02T00:00:00Z"),
            _pod("starting", "cp-1", phase="Pending", created="2026-11-03T00:00:00Z"),
        ],
    )
    assert [(t.node, t.pod) for t in targets] == [("cp-1", "new")]


def test_a_pod_without_the_who_container_is_not_asked(pods: Pods) -> None:
    """A pod from an older DaemonSet has only the operator container, with its host write
    mounts and ServiceAccount token: it is named, never exec'd into."""
    pods.pods[1] = _pod("ka-2", "cp-2", containers=("operator",))
    code, _, err = _ask(pods, Query())
    assert code == "partial answer: 2 of 3 control-plane node(s) answered"
    assert "cp-2: not asked: its kube-audit pod ka-2 has no 'who' container" in err
    assert "ka-2" not in [pod for pod, _ in pods.asked]


class StoreApi:
    """The two calls ``who --cluster`` makes when the install may name an audit store."""

    def __init__(
        self, config: dict[str, str] | ClusterError | None, answer: bytes | ClusterError
    ) -> None:
        self.config, self.answer = config, answer
        self.asked: list[tuple[str, dict[str, str]]] = []

    def audit_store_config(self, namespace: str) -> dict[str, str] | None:
        assert namespace == "kube-audit"
        if isinstance(self.config, ClusterError):
            raise self.config
        return self.config

    def get_through_service(
        self, proxy_path: str, params: dict[str, str], what: str, timeout: float
    ) -> bytes:
        self.asked.append((proxy_path, params))
        if isinstance(self.answer, ClusterError):
            raise self.answer
        return self.answer


def test_cluster_asks_the_store_the_install_names_through_the_service_proxy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kube_audit.cli.who import _installed_store  # noqa: PLC0415
    from kube_audit.logstore import LogStore  # noqa: PLC0415
    from kube_audit.who.store import ProxiedStore, run_who_store  # noqa: PLC0415

    row = {"_time": "2026-11-01T00:00:01Z", "node": "cp-2", "auditID": "a-1",
           "stage": "ResponseComplete", "verb": "delete", "user.username": "alice",
           "objectRef.resource": "secrets", "objectRef.namespace": "team",
           "objectRef.name": "db", "responseStatus.code": "200",
           "requestReceivedTimestamp": "2026-11-01T00:00:01.000000Z",
           "stageTimestamp": "2026-11-01T00:00:01.020000Z"}  # fmt: skip
    api = StoreApi({"url": "http://vlinsert.logging.svc:9481",
                    "query-url": "http://vlselect.logging.svc:9471"},
                   json.dumps(row).encode() + b"\n")  # fmt: skip
    store = _installed_store(api, "kube-audit", 30.0)
    assert isinstance(store, ProxiedStore) and "logging/vlselect:9471" in store.url
    out, err = io.StringIO(), io.StringIO()
    query = Query(users=frozenset({"alice"}), since="2026-11-01T00:00:00Z",
                  until="2026-11-01T00:10:00Z")  # fmt: skip
    assert run_who_store(store, query, output="json", out=out, err=err, now=START) == 0
    (event,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert event["auditID"] == "a-1" and event["annotations"]["kube-audit.io/node"] == "cp-2"
    proxy = "/api/v1/namespaces/logging/services/http:vlselect:9471/proxy"
    assert api.asked[0] == (f"{proxy}/health", {}), "whether the caller may ask, first"
    assert {path for path, _ in api.asked[1:]} == {f"{proxy}/select/logsql/query"}
    assert all(params["allow_partial_response"] == "0" for _, params in api.asked[1:])
    # No ConfigMap: the pods answer. Not allowed to read it: said, and the pods answer.
    assert _installed_store(StoreApi(None, b""), "kube-audit", 30.0) is None
    denied = StoreApi(ClusterError("get ConfigMap kube-audit/kube-audit-store: HTTP 403", 403), b"")
    assert _installed_store(denied, "kube-audit", 30.0) is None
    assert "asking the nodes' pods" in capsys.readouterr().err
    # May read the ConfigMap (as `view` allows) but not ask through the proxy: said, the pods.
    forbidden = ClusterError('services "http:vlselect:9471" is forbidden: User "bob" cannot '
                             'get resource "services/proxy"', 403)  # fmt: skip
    config = {"query-url": "http://vlselect.logging.svc:9471"}
    assert _installed_store(StoreApi(config, forbidden), "kube-audit", 30.0) is None
    err = capsys.readouterr().err
    assert 'cannot get resource "services/proxy"' in err and "asking the nodes' pods" in err
    # Another failure of the store is the query's to report, not a reason to ask the pods.
    down = StoreApi(config, ClusterError("the store: HTTP 503", 503))
    assert isinstance(_installed_store(down, "kube-audit", 30.0), ProxiedStore)
    # An address outside the cluster is asked directly.
    direct = _installed_store(StoreApi({"url": "https://logs.example.com"}, b""), "kube-audit", 5)
    assert isinstance(direct, LogStore)


def test_a_store_behind_the_proxy_that_fails_is_a_partial_answer() -> None:
    from kube_audit.core.logsql import ServiceAddress  # noqa: PLC0415
    from kube_audit.errors import StoreError  # noqa: PLC0415
    from kube_audit.who.store import ProxiedStore, run_who_store  # noqa: PLC0415

    failing = StoreApi(None, ClusterError("the store at service logging/vl:9428: HTTP 503", 503))
    store = ProxiedStore(failing, ServiceAddress("http", "logging", "vl", "9428"), 30.0)
    with pytest.raises(StoreError, match="HTTP 503") as raised:
        run_who_store(
            store, Query(), output="table", out=io.StringIO(), err=io.StringIO(), now=START
        )
    assert raised.value.exit_code == 7
