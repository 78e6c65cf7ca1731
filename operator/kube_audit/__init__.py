"""kube-audit-operator: per-person identities and audit logging for kubeadm clusters."""

__version__ = "0.2.0"
