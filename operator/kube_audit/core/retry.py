"""Whether a node may try a config again after it failed there: pure, so the rule is tested
without a clock.

A failure mark holds back that exact content only. A config the new apiserver never answered
with (it crashed at start-up: a file or flag it refuses) is held until the inputs change;
any other failure (not ready within the timeout, kubelet slow to restart it) may be transient
and is tried again with back-off. A change that only removes identities is never held by a
failure: a deleted person's token must leave the file, so it is tried again at most
``REVOKE_RETRY_MAX`` apart, whatever failed before. An admin's ``kube-audit node rollback``
holds the content it left until the objects change.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

RETRY_FIRST = 120.0
RETRY_MAX = 3600.0
REVOKE_RETRY_MAX = 300.0


@dataclass(frozen=True)
class Failure:
    """One content's failures on one node: how many in a row, the last one's time (wall-clock
    seconds) and reason, and whether the new apiserver crashed (never answered)."""

    count: int
    at: float
    crashed: bool
    reason: str


@dataclass(frozen=True)
class Hold:
    """Why a node does not apply the content now. ``retry_at`` None: not until the inputs
    change (or an admin applies it by hand). ``by_admin``: an admin's rollback left it."""

    message: str
    retry_at: float | None
    by_admin: bool = False
    # Nothing failed: the node waits for something to be ready first (its webhook).
    waiting: bool = False


def retry_delay(count: int, *, revocation: bool) -> float:
    """Seconds after the ``count``-th failure before the next try: doubling from two minutes."""
    cap = REVOKE_RETRY_MAX if revocation else RETRY_MAX
    return min(cap, RETRY_FIRST * 2.0 ** max(0, count - 1))


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan_hold(
    config_hash: str,
    failure: Failure | None,
    *,
    admin_rollback: bool,
    revocation: bool,
    now: float,
    webhook: bool = False,
) -> Hold | None:
    """None when the node may apply ``config_hash`` now. ``webhook``: the content is webhook
    mode's, which names no people (they are in the snapshot), so only a change of the
    AuditPolicies or the settings makes it another content."""
    short = config_hash[:16] or "(unpatched)"
    inputs = "the AuditPolicies or the operator's settings" if webhook else "the inputs"
    meanwhile = "; people deleted, disabled or expired since are refused here meanwhile"
    if admin_rollback:
        objects = inputs if webhook else "the AuditUsers or AuditPolicies"
        return Hold(
            f"an admin rolled this node back from config {short} (`kube-audit node rollback`); "
            f"it is not applied again until {objects} change, or until `kube-audit node apply` "
            f"is run on the node{meanwhile}",
            None,
            by_admin=True,
        )
    if failure is None:
        return None
    tries = f"{failure.count} failure(s) on this node, the last: {failure.reason}"
    if failure.crashed and not revocation:
        return Hold(
            f"config {short} was rolled back: the new kube-apiserver never answered, so it does "
            f"not start with it ({tries}); not tried again until {inputs} change{meanwhile}",
            None,
        )
    due = failure.at + retry_delay(failure.count, revocation=revocation)
    if now >= due:
        return None
    kind = "it only removes identities, so it is retried" if revocation else "retried"
    return Hold(
        f"config {short} was rolled back ({tries}); {kind} after {_when(due)}",
        due,
    )
