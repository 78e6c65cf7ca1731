"""``kube-audit operator``: kopf's watch loop and the node reconciler in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from typing import Any

import kopf

from kube_audit.agent.layout import STATE_DIR, under
from kube_audit.agent.succession import endpoint, wait_for_node
from kube_audit.constants import OPERATOR_LOCK
from kube_audit.controller.config import OperatorConfig
from kube_audit.controller.handlers import build_registry
from kube_audit.controller.metrics import Metrics
from kube_audit.controller.probe import serve_readiness
from kube_audit.controller.reconciler import NodeRuntime
from kube_audit.controller.secret_watches import SecretWatches
from kube_audit.kube import LISTING, KubeApi

log = logging.getLogger("kube_audit.operator")


def connection_info(api: KubeApi) -> kopf.ConnectionInfo:
    """kopf uses the same credentials as our gateway: one configuration for both."""
    conf = api.client.configuration
    token = api.bearer_token()
    return kopf.ConnectionInfo(
        server=str(conf.host),
        ca_path=conf.ssl_ca_cert,
        insecure=not conf.verify_ssl,
        scheme="Bearer" if token else None,
        token=token,
        certificate_path=conf.cert_file,
        private_key_path=conf.key_file,
    )


class CoreTaskDied(RuntimeError):
    """A task the operator cannot work without ended: exit, and let the DaemonSet restart."""


async def run_operator(
    runtime: NodeRuntime,
    *,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
    liveness_endpoint: str | None = None,
    readiness_endpoint: str | None = None,
) -> None:
    """Run until ``stop`` is set or SIGTERM/SIGINT comes: kopf standalone, cluster-wide, the
    Secret watches (one per namespace tokens come from) and the reconciler, which stops first
    so that no new API write starts after the signal. Raises ``CoreTaskDied`` when the
    reconciler or a Secret watch dies: a pod whose liveness stays green while nothing
    reconciles would never be restarted."""
    registry = build_registry(runtime, lambda: connection_info(runtime.api))
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    watches_stop = threading.Event()
    kopf_stop: asyncio.Future[Any] = loop.create_future()
    deaths: list[str] = []

    def begin_stop(reason: str) -> None:
        if stopping.is_set():
            return
        log.info("%s: stopping", reason)
        stopping.set()
        watches_stop.set()
        secret_watches.stop_all()
        runtime.api.stop_watches()
        if not kopf_stop.done():
            kopf_stop.set_result(None)

    def died(what: str) -> None:
        deaths.append(what)
        begin_stop(f"{what} died")

    async def watch_stop() -> None:
        while stop is not None and not stop.is_set():
            await asyncio.sleep(0.05)
        if stop is not None:
            begin_stop("stop requested")

    def node_events(kind: str, obj: dict[str, Any]) -> None:
        """A control-plane node came, went or changed: conditions count them."""
        if kind != LISTING:
            loop.call_soon_threadsafe(runtime.node_changed)

    def supervised_node_watch() -> None:
        try:
            runtime.api.watch_control_plane_nodes(node_events, watches_stop)
        except Exception:
            log.exception("the control-plane Node watch crashed")
            loop.call_soon_threadsafe(died, "control-plane Node watch")

    def on_runtime_done(task: asyncio.Task[None]) -> None:
        if task.cancelled() or (stopping.is_set() and task.exception() is None):
            return
        error = task.exception()
        if error is not None:
            log.error("the reconciler crashed", exc_info=error)
        died("reconciler")

    secret_watches = SecretWatches(
        runtime.api, runtime, loop, runtime.config.settings.token_namespace, died
    )
    runtime.intake.on_namespaces = secret_watches.follow
    node_watch = threading.Thread(target=supervised_node_watch, daemon=True)
    existing = asyncio.all_tasks()
    watcher = asyncio.create_task(watch_stop())
    loop_task = asyncio.create_task(runtime.run(stopping))
    loop_task.add_done_callback(on_runtime_done)
    secret_watches.follow(())
    node_watch.start()
    probe = serve_readiness(readiness_endpoint, runtime.settled.is_set)
    try:
        await probe.__aenter__()
        kopf_tasks = await kopf.spawn_tasks(
            registry=registry,
            standalone=True,
            clusterwide=True,
            stop_flag=kopf_stop,
            ready_flag=ready,
            liveness_endpoint=liveness_endpoint,
            memo=kopf.Memo(),
        )
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, begin_stop, signal.Signals(signum).name)
        await kopf.run_tasks(kopf_tasks, ignored={*existing, watcher, loop_task})
    finally:
        begin_stop("operator exiting")
        watcher.cancel()
        done, _ = await asyncio.wait([loop_task], timeout=10)
        if not done:
            log.warning("reconcile did not stop within 10s; cancelling it (writes are crash-safe)")
            loop_task.cancel()
        for task in (loop_task, watcher):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await probe.__aexit__(None, None, None)
    if deaths:
        raise CoreTaskDied(", ".join(deaths))


class KopfWatchTeardown(logging.Filter):
    """Drop the one record asyncio logs when it finalizes a kopf watch-stream generator at
    exit ("generator didn't stop after athrow()" from ``infinite_watch``'s ``streaming_block``):
    the stream is already stopped and nothing is lost, but a Traceback in the log of a clean
    SIGTERM sends people looking for a bug of theirs. Any other asyncio error still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        closing = text.startswith("an error occurred during closing of asynchronous generator")
        return not (closing and "infinite_watch" in text)


def _node_is_ours(config: OperatorConfig, ports: tuple[tuple[str, int] | None, ...]) -> bool:
    """Wait for the node's previous operator (a surge update starts this pod beside it) to
    end; False if SIGTERM or SIGINT came first. Nothing is started before: no two operators
    ever reconcile one node."""
    stop = threading.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in signals}
    try:
        lock = under(config.host_root, STATE_DIR) / OPERATOR_LOCK
        held = wait_for_node(lock, ports, "operator", stop.wait)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return held is not None and not stop.is_set()


def main(
    config: OperatorConfig,
    api: KubeApi,
    metrics_at: tuple[str, int],
    liveness: str,
    readiness: str,
) -> int:
    if not _node_is_ours(config, (metrics_at, endpoint(liveness), endpoint(readiness))):
        return 0
    metrics = Metrics()
    if metrics_at[1]:
        metrics.serve(*metrics_at)
    runtime = NodeRuntime(config, api, metrics)
    logging.getLogger("asyncio").addFilter(KopfWatchTeardown())
    log.info("kube-audit operator on node %s, host root %s", config.node_name, config.host_root)
    try:
        asyncio.run(
            run_operator(
                runtime,
                liveness_endpoint=liveness or None,
                readiness_endpoint=readiness or None,
            )
        )
    except CoreTaskDied as error:
        log.critical("exiting: %s died (the DaemonSet starts a new pod)", error)
        return 1
    return 0
