"""The grant to read token Secrets in one namespace, as YAML an admin applies.

RBAC grants Secrets per namespace and never by label, so the operator's ClusterRole holds no
Secret access at all: every namespace a ``tokenSecretRef`` points into is granted on its own,
by someone allowed to decide that (``kube-audit grant-secrets NS | kubectl apply -f -``). Only
list and watch: the operator asks for that namespace's Secrets with the consent label and
never GETs one by name (which would return a Secret that did not consent).
"""

from __future__ import annotations

from collections.abc import Sequence

from kube_audit.constants import DEFAULT_INSTALL_NAMESPACE
from kube_audit.core import yamlio
from kube_audit.core.models import DNS_LABEL
from kube_audit.errors import InvalidInput, Problem

GRANT_NAME = "kube-audit-token-secrets"
SERVICE_ACCOUNT = "kube-audit"
LABELS = {
    "app.kubernetes.io/name": "kube-audit-operator",
    "app.kubernetes.io/part-of": "kube-audit",
}


def render_secrets_grant(
    namespaces: Sequence[str], install_namespace: str = DEFAULT_INSTALL_NAMESPACE
) -> str:
    """A Role and RoleBinding per namespace, for the operator's ServiceAccount."""
    given = [("NAMESPACE", name) for name in namespaces]
    problems = [
        Problem("grant-secrets", field, f"{name!r} is not a namespace name (RFC 1123 label)")
        for field, name in (*given, ("--install-namespace", install_namespace))
        if not DNS_LABEL.match(name)
    ]
    if problems:
        raise InvalidInput(problems)
    docs = []
    for namespace in dict.fromkeys(namespaces):
        meta = {"name": GRANT_NAME, "namespace": namespace, "labels": dict(LABELS)}
        docs.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": meta,
                "rules": [
                    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch"]}
                ],
            }
        )
        docs.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": dict(meta),
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": GRANT_NAME,
                },
                "subjects": [
                    {
                        "kind": "ServiceAccount",
                        "name": SERVICE_ACCOUNT,
                        "namespace": install_namespace,
                    }
                ],
            }
        )
    return "---\n".join(yamlio.dump(doc) for doc in docs)
