"""Which cluster, with which credentials: kubeconfig files and in-cluster credentials, read as
kubectl reads them."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import kubernetes.client
import kubernetes.config
import yaml

from kube_audit import hostfs
from kube_audit.core import yamlio
from kube_audit.errors import ClusterError


def load_api_client(
    kubeconfig: str | None = None, context: str | None = None
) -> kubernetes.client.ApiClient:
    """As kubectl: ``kubeconfig`` (or ``context``) given wins; else in-cluster credentials
    inside a pod; else $KUBECONFIG or ~/.kube/config."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig is None and context is None:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            pass
        else:
            return kubernetes.client.ApiClient(configuration)
    try:
        kubernetes.config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=configuration
        )
    except (kubernetes.config.ConfigException, OSError, ValueError) as error:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise ClusterError(f"no usable kubeconfig ({where}): {error}") from None
    except yaml.YAMLError as error:
        where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise ClusterError(f"kubeconfig {yamlio.explain(where, error)}") from None
    return kubernetes.client.ApiClient(configuration)


def current_cluster(
    kubeconfig: str | None = None, context: str | None = None
) -> tuple[str, str, str | None, bool]:
    """(cluster name, server, base64 CA data or None, insecure) of ``context`` (default: the
    current one).

    Follows kubectl: ``--kubeconfig``, else every file in ``$KUBECONFIG``, else ~/.kube/config;
    the first file that sets a value wins.
    """
    paths = (
        [kubeconfig]
        if kubeconfig
        else [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
        or [os.path.expanduser("~/.kube/config")]
    )
    docs = []
    for path in paths:
        data = hostfs.read_optional(Path(path))
        if data is not None:
            try:
                docs.append(yamlio.load(data) or {})
            except yamlio.YAMLError as error:
                raise ClusterError(f"kubeconfig {yamlio.explain(path, error)}") from None
    current = context or next(
        (d.get("current-context") for d in docs if d.get("current-context")), None
    )
    contexts = {c["name"]: c.get("context", {}) for d in docs for c in d.get("contexts") or []}
    clusters = {
        c["name"]: c.get("cluster", {}) for d in reversed(docs) for c in d.get("clusters") or []
    }
    if not current or current not in contexts:
        what = f"no context {context!r}" if context else "no current context"
        raise ClusterError(f"{what} in kubeconfig {os.pathsep.join(paths)}")
    name = str(contexts[current].get("cluster") or "")
    entry = clusters.get(name) or {}
    ca_data = entry.get("certificate-authority-data")
    if not ca_data and entry.get("certificate-authority"):
        ca_data = base64.b64encode(hostfs.read_bytes(Path(entry["certificate-authority"]))).decode()
    return (
        name,
        str(entry.get("server") or ""),
        ca_data,
        bool(entry.get("insecure-skip-tls-verify")),
    )
