"""A kubeconfig for one person: their token, the cluster's server and CA (pure rendering)."""

from __future__ import annotations

from typing import Any

from kube_audit.core import yamlio


def render_kubeconfig(
    *, cluster: str, server: str, ca_data: str | None, insecure: bool, user: str, token: str
) -> str:
    """A self-contained kubeconfig (CA embedded), context named after the user."""
    cluster_entry: dict[str, Any] = {"server": server}
    if ca_data:
        cluster_entry["certificate-authority-data"] = ca_data
    elif insecure:
        cluster_entry["insecure-skip-tls-verify"] = True
    context = f"{user}@{cluster}"
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": cluster_entry}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": context, "context": {"cluster": cluster, "user": user}}],
        "current-context": context,
        "preferences": {},
    }
    return yamlio.dump(doc)
