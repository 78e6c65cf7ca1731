"""``kube-audit operator``: kopf's watch loop and the node reconciler in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from typing import Any

import kopf

from kube_audit.controller.handlers import build_registry
from kube_audit.controller.metrics import Metrics
from kube_audit.controller.runtime import NodeRuntime, OperatorConfig
from kube_audit.controller.store import compact
from kube_audit.kube import LISTED, LISTING, KubeApi

log = logging.getLogger("kube_audit.operator")


def connection_info(api: KubeApi) -> kopf.ConnectionInfo:
    """kopf uses the same credentials as our gateway: one configuration for both."""
    conf = api.client.configuration
    token = None
    auth = (conf.api_key or {}).get("authorization") or (conf.api_key or {}).get("BearerToken")
    if auth:
        token = str(auth).removeprefix("Bearer ").strip()
    return kopf.ConnectionInfo(
        server=str(conf.host),
        ca_path=conf.ssl_ca_cert,
        insecure=not conf.verify_ssl,
        scheme="Bearer" if token else None,
        token=token,
        certificate_path=conf.cert_file,
        private_key_path=conf.key_file,
    )


async def run_operator(
    runtime: NodeRuntime,
    *,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
    liveness_endpoint: str | None = None,
) -> None:
    """Run until ``stop`` is set or SIGTERM/SIGINT comes: kopf standalone, cluster-wide, plus
    the reconciler, which stops first so that no new API write starts after the signal."""
    registry = build_registry(runtime, lambda: connection_info(runtime.api))
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    secrets_stop = threading.Event()
    kopf_stop: asyncio.Future[Any] = loop.create_future()

    def begin_stop(reason: str) -> None:
        if stopping.is_set():
            return
        log.info("%s: stopping", reason)
        stopping.set()
        secrets_stop.set()
        runtime.api.stop_watches()
        if not kopf_stop.done():
            kopf_stop.set_result(None)

    async def watch_stop() -> None:
        while stop is not None and not stop.is_set():
            await asyncio.sleep(0.05)
        if stop is not None:
            begin_stop("stop requested")

    def on_secret(kind: str, obj: dict[str, Any]) -> None:
        """Compacted here, on the watch thread: a first list of 10,000 Secrets would otherwise
        wait in the loop's queue with all their managedFields."""
        if kind == LISTING:
            loop.call_soon_threadsafe(runtime.secrets_listing)
        elif kind == LISTED:
            loop.call_soon_threadsafe(runtime.secrets_listed, {tuple(k) for k in obj["keys"]})
        else:
            meta = obj.get("metadata") or {}
            loop.call_soon_threadsafe(
                runtime.observe_secret, kind, meta.get("namespace"), compact(obj)
            )

    existing = asyncio.all_tasks()
    watcher = asyncio.create_task(watch_stop())
    loop_task = asyncio.create_task(runtime.run(stopping))
    secrets_thread = threading.Thread(
        target=runtime.api.watch_secrets, args=(on_secret, secrets_stop), daemon=True
    )
    secrets_thread.start()
    try:
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
            with contextlib.suppress(asyncio.CancelledError):
                await task


def main(config: OperatorConfig, api: KubeApi, metrics_port: int, liveness: str) -> int:
    metrics = Metrics()
    if metrics_port:
        metrics.serve(metrics_port)
    runtime = NodeRuntime(config, api, metrics)
    log.info("kube-audit operator on node %s, host root %s", config.node_name, config.host_root)
    asyncio.run(run_operator(runtime, liveness_endpoint=liveness or None))
    return 0
