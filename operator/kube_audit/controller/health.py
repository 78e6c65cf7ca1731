"""Health: how this node's agent proves a new apiserver. Its /readyz, and its mirror pod
(our config hash, started after the write): a ready answer from the old instance or from
another node behind a shared address is not proof."""

from __future__ import annotations

from collections.abc import Callable

from kube_audit.agent.health import Expectation, HealthCheck, InstanceCheck, mirror_pod_verdict
from kube_audit.agent.node import NodeAgent, health_check
from kube_audit.controller.config import OperatorConfig
from kube_audit.errors import ClusterError
from kube_audit.kube import KubeApi


def node_agent(config: OperatorConfig, api: KubeApi, wall: Callable[[], float]) -> NodeAgent:
    """This node's agent with the health check the settings ask for; ``wall``: the operator's
    clock, for when failures happened and retries are due."""
    layout = config.layout()
    check: HealthCheck | None
    if config.health_factory is not None:
        check = config.health_factory(layout)
    else:
        check = health_check(
            layout, url=config.health_url, timeout=config.timeout, no_wait=config.no_wait
        )
        if check is not None:
            check.instance = _mirror_pod_proof(api, config.node_name)
            check.credentials = api.bearer_token
    return NodeAgent(layout, check, wall, config.webhook_probe)


def _mirror_pod_proof(api: KubeApi, node: str) -> InstanceCheck:
    def prove(want: Expectation) -> tuple[bool | None, str]:
        """The mirror pod's verdict; None where the API cannot tell (no permission)."""
        try:
            pod = api.mirror_pod(node)
        except ClusterError as error:
            if error.status in (401, 403):
                return None, f"cannot read the mirror pod: {error}"
            raise
        return mirror_pod_verdict(pod, want)

    return prove
