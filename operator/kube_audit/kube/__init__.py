"""The one gateway to the Kubernetes API (the official client; blocking, so call it in a thread).

Everything the operator and the CLI read from or write to the cluster, apart from kopf's own
watches, goes through ``KubeApi``; API failures become ``ClusterError`` and its subclasses. One
module per thing the calls talk to: ``kubeconfig`` (which cluster), ``transport`` (requests and
their errors), ``objects``, ``secrets``, ``watches``, ``podexec``, ``events``, ``leases``.
"""

from kube_audit.kube.api import KubeApi
from kube_audit.kube.kubeconfig import current_cluster, load_api_client
from kube_audit.kube.podexec import ExecResult
from kube_audit.kube.watches import FORBIDDEN, LISTED, LISTING

__all__ = [
    "FORBIDDEN",
    "LISTED",
    "LISTING",
    "ExecResult",
    "KubeApi",
    "current_cluster",
    "load_api_client",
]
