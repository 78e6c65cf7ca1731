"""The one error hierarchy of the project.

Every layer raises these; the CLI maps them to exit codes and messages, the operator maps them to
``kopf.PermanentError`` (``retryable is False``) or ``kopf.TemporaryError``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Problem:
    """One reason an input is refused, naming the object, the field path and why."""

    obj: str
    field: str
    message: str
    # Not a mistake but work not done yet (a token Secret the operator is about to create):
    # shown as Reconciling, never as Invalid/Stalled, which GitOps tools treat as failed.
    pending: bool = False

    def __str__(self) -> str:
        where = f"{self.obj}: {self.field}" if self.field else self.obj
        return f"{where}: {self.message}"


class KubeAuditError(Exception):
    """Base of every expected failure. ``exit_code`` is what the CLI exits with."""

    exit_code = 1
    retryable = False


class InvalidInput(KubeAuditError):
    """One or more input objects are invalid; nothing was written."""

    exit_code = 1

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(sorted(set(problems)))
        # The object without its refused fields, when later checks can still run on it.
        self.partial: object | None = None
        super().__init__("\n".join(str(p) for p in self.problems))


class ManifestError(KubeAuditError):
    """The kube-apiserver manifest cannot be patched safely; it was left untouched."""

    exit_code = 3


class RewrittenDuringWait(ManifestError):
    """Someone else (a kubeadm upgrade) rewrote the manifest while we waited for our new
    apiserver: theirs is kept, and nothing is known to have failed, so nothing is held; ours
    goes back on once kubelet runs theirs."""

    retryable = True


class NodeConfigError(KubeAuditError):
    """The node's own configuration (the kubelet config) cannot be used; fix it on the node."""

    exit_code = 4


class HostError(KubeAuditError):
    """Reading or writing the host failed (disk full, read-only, missing folder); retry later."""

    exit_code = 4
    retryable = True


class LockBusy(HostError):
    """Another writer holds the host lock."""


class WebhookNotAnswering(HostError):
    """Webhook mode waits: the node's authn-webhook does not answer yet."""


class RolledBack(KubeAuditError):
    """The new apiserver never became ready; the previous good state was restored.
    ``crashed``: it never answered (it does not start with that config), so the other nodes
    should not try it; otherwise the failure may be transient."""

    exit_code = 5

    def __init__(self, message: str, failed_hash: str, *, crashed: bool = False) -> None:
        self.failed_hash = failed_hash
        self.crashed = crashed
        super().__init__(message)


class ClusterError(KubeAuditError):
    """The Kubernetes API answered with an error or was unreachable; retry later.

    ``status`` is the HTTP status (0: no answer): a 403 is a missing permission, not an outage.
    """

    exit_code = 6
    retryable = True

    def __init__(self, message: str, status: int = 0) -> None:
        self.status = status
        super().__init__(message)


class Conflict(ClusterError):
    """The object changed or already exists (HTTP 409): re-read and decide again."""


class NotFound(ClusterError):
    """The object does not exist (HTTP 404)."""

    retryable = False


class PartialAnswer(KubeAuditError):
    """A question asked of every node got answers from some only; the others are named."""

    exit_code = 7


class StoreError(PartialAnswer):
    """The audit store did not answer, or broke off: the answer is partial or missing."""
