"""``kube-audit operator``: kopf's watch loop and the node reconciler in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

import kopf

from kube_audit.controller.handlers import build_registry
from kube_audit.controller.metrics import Metrics
from kube_audit.controller.runtime import NodeRuntime, OperatorConfig
from kube_audit.kube import KubeApi

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
    """Run until ``stop`` is set (or forever): kopf standalone, cluster-wide, plus the loop."""
    registry = build_registry(runtime, lambda: connection_info(runtime.api))
    stopping = asyncio.Event()
    kopf_stop: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def watch_stop() -> None:
        while stop is not None and not stop.is_set():
            await asyncio.sleep(0.05)
        if stop is not None:
            stopping.set()
            if not kopf_stop.done():
                kopf_stop.set_result(None)

    watcher = asyncio.create_task(watch_stop())
    loop_task = asyncio.create_task(runtime.run(stopping))
    secrets_stop = threading.Event()
    loop = asyncio.get_running_loop()

    def on_secret(kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        loop.call_soon_threadsafe(runtime.observe_secret, kind, meta.get("namespace"), obj)

    secrets_thread = threading.Thread(
        target=runtime.api.watch_secrets, args=(on_secret, secrets_stop), daemon=True
    )
    secrets_thread.start()
    try:
        await kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=True,
            stop_flag=kopf_stop,
            ready_flag=ready,
            liveness_endpoint=liveness_endpoint,
            memo=kopf.Memo(),
        )
    finally:
        stopping.set()
        secrets_stop.set()
        runtime.api.stop_watches()
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
