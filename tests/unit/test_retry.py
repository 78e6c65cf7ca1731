"""When a node may try a failed config again, and what counts as only removing identities."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from kube_audit.core.manifest import (
    WEBHOOK_CONFIG_FLAG,
    Manifest,
    apiserver_container,
    flag_value,
    parse_manifest,
)
from kube_audit.core.plan import (
    TOKEN_FILE,
    DesiredState,
    plan_manifest,
    plan_revocation,
    removes_identities_only,
    running_settings,
)
from kube_audit.core.retry import Failure, plan_hold, retry_delay
from kube_audit.core.settings import Settings
from tests.agent.conftest import desired
from tests.conftest import kubeadm_manifest_text

H = "a" * 64


def _hold(failure: Failure | None, *, revocation: bool = False, now: float = 0.0) -> object:
    return plan_hold(H, failure, admin_rollback=False, revocation=revocation, now=now)


@pytest.mark.parametrize(
    ("count", "revocation", "delay"),
    [(1, False, 120), (2, False, 240), (5, False, 1920), (6, False, 3600), (30, False, 3600),
     (1, True, 120), (2, True, 240), (3, True, 300), (9, True, 300)],
)  # fmt: skip
def test_the_delay_doubles_up_to_a_cap(count: int, revocation: bool, delay: float) -> None:
    assert retry_delay(count, revocation=revocation) == delay


def test_a_transient_failure_is_held_until_its_retry_is_due() -> None:
    failure = Failure(2, 1000.0, crashed=False, reason="not ready within 180s")
    hold = plan_hold(H, failure, admin_rollback=False, revocation=False, now=1100.0)
    assert hold is not None and hold.retry_at == 1240.0
    assert "retried after 1970-01-01T00:20:40Z" in hold.message
    assert "2 failure(s)" in hold.message and "not ready within 180s" in hold.message
    assert plan_hold(H, failure, admin_rollback=False, revocation=False, now=1240.0) is None


def test_a_crash_holds_until_the_inputs_change_but_never_a_revocation() -> None:
    crash = Failure(1, 1000.0, crashed=True, reason="never answered")
    hold = plan_hold(H, crash, admin_rollback=False, revocation=False, now=10.0**9)
    assert hold is not None and hold.retry_at is None
    assert plan_hold(H, crash, admin_rollback=False, revocation=True, now=1120.0) is None


def test_nothing_holds_a_config_that_never_failed() -> None:
    assert plan_hold(H, None, admin_rollback=False, revocation=False, now=0.0) is None


def test_an_admins_rollback_holds_even_a_revocation() -> None:
    hold = plan_hold(H, None, admin_rollback=True, revocation=True, now=0.0)
    assert hold is not None and hold.by_admin and hold.retry_at is None
    assert "kube-audit node rollback" in hold.message


def _running(state: DesiredState) -> tuple[Manifest, dict[str, bytes]]:
    base = parse_manifest(kubeadm_manifest_text("v1.31"))
    return plan_manifest(base, state), dict(state.files)


def test_removing_people_only_removes_identities() -> None:
    manifest, files = _running(desired("alice", "bob", "carol"))
    running = desired("alice", "bob", "carol").config_hash
    assert removes_identities_only(manifest, files, running, desired("alice"))
    assert removes_identities_only(manifest, files, running, desired(policy=True))


@pytest.mark.parametrize(
    ("wanted", "why"),
    [
        (desired("alice", "bob", "dave"), "a person added"),
        (desired("alice", "bob", "carol", marker="-new"), "tokens rotated"),
        (desired("alice", "bob", policy=False), "the policy removed as well"),
        (desired("alice", "bob", "carol"), "nothing changes"),
    ],
)
def test_anything_else_is_not_only_a_revocation(wanted: DesiredState, why: str) -> None:
    manifest, files = _running(desired("alice", "bob", "carol"))
    running = desired("alice", "bob", "carol").config_hash
    assert not removes_identities_only(manifest, files, running, wanted), why


def test_changed_settings_are_not_only_a_revocation() -> None:
    manifest, files = _running(desired("alice", "bob"))
    running = desired("alice", "bob").config_hash
    fewer = desired("alice")
    longer_logs = replace(fewer, settings=Settings(log_maxage=90))
    assert removes_identities_only(manifest, files, running, fewer)
    assert not removes_identities_only(manifest, files, running, longer_logs)


def test_an_unpatched_node_has_nothing_to_revoke() -> None:
    base = parse_manifest(kubeadm_manifest_text("v1.31"))
    assert not removes_identities_only(base, {}, "", desired("alice"))


def test_a_held_change_s_revocations_go_on_the_running_config() -> None:
    """A refused policy and bob's deletion in one content: bob's line leaves on its own, the
    running policy stays, and the step is a revocation (no failure mark holds it back)."""
    before = desired("alice", "bob", "carol")
    manifest, files = _running(before)
    held = desired("alice", "carol", level="RequestResponse")
    step = plan_revocation(manifest, files, before.config_hash, held)
    assert step is not None
    assert step.files[TOKEN_FILE] == desired("alice", "carol").files[TOKEN_FILE]
    assert step.config_hash == desired("alice", "carol").config_hash, "the running policy"
    assert removes_identities_only(manifest, files, before.config_hash, step)
    again = plan_revocation(manifest, files, before.config_hash, held)
    assert again == step, "pure: the same step for the same input"


def test_a_changed_line_leaves_too_and_nothing_is_added() -> None:
    """A rotated token (or new groups) is not granted on the running policy, and the old line
    is not kept: the node never grants more than either config."""
    before = desired("alice", "bob")
    manifest, files = _running(before)
    held = replace(
        desired("alice", "bob", "dave", level="None"),
        files={
            **desired("alice", "bob", "dave", level="None").files,
            TOKEN_FILE: desired("alice").files[TOKEN_FILE]
            + desired("bob", marker="-new").files[TOKEN_FILE],
        },
    )
    step = plan_revocation(manifest, files, before.config_hash, held)
    assert step is not None and step.files[TOKEN_FILE] == desired("alice").files[TOKEN_FILE]


def test_no_revocation_step_without_a_removal() -> None:
    before = desired("alice", "bob")
    manifest, files = _running(before)
    wanted = desired("alice", "bob", "dave", level="None")
    assert plan_revocation(manifest, files, before.config_hash, wanted) is None
    base = parse_manifest(kubeadm_manifest_text("v1.31"))
    assert plan_revocation(base, {}, "", wanted) is None, "an unpatched node runs no tokens"


def test_a_held_change_of_settings_revokes_on_the_settings_the_node_runs() -> None:
    """Before, a held content with other settings (log rotation here) gave no step at all, and
    bob stayed. The running config is read back from its manifest: bob's line leaves, the
    running flags stay."""
    before = desired("alice", "bob")
    manifest, files = _running(before)
    held = replace(desired("alice"), settings=Settings(log_maxage=90))
    step = plan_revocation(manifest, files, before.config_hash, held)
    assert step is not None and step.settings.log_maxage == Settings().log_maxage
    assert step.config_hash == desired("alice").config_hash
    assert flag_value(plan_manifest(manifest, step), "--audit-log-maxage") == "30"
    assert running_settings(manifest, held.settings) == Settings()


def test_a_rollback_to_a_token_file_revokes_in_token_file_mode() -> None:
    """Webhook mode's content names no token file: the people it wants are its records, and
    the step is built in the mode and settings the node runs (issue 36 finding 1)."""
    before = desired("alice", "bob")
    manifest, files = _running(before)
    webhook = Settings(identity_mode="webhook")
    held = replace(desired("alice"), settings=webhook, files={}, config_hash="w" * 64)
    step = plan_revocation(manifest, files, before.config_hash, held)
    assert step is not None and not step.webhook_mode
    assert step.config_hash == desired("alice").config_hash
    assert flag_value(plan_manifest(manifest, step), WEBHOOK_CONFIG_FLAG) is None


def _set_flag(manifest: Manifest, flag: str, value: str) -> Manifest:
    edited = copy.deepcopy(manifest)
    command = apiserver_container(edited)["command"]
    command[:] = [f"{flag}={value}" if a.startswith(flag + "=") else a for a in command]
    return edited


def test_a_hand_edited_flag_gives_no_step() -> None:
    before = desired("alice", "bob")
    manifest, files = _running(before)
    edited = _set_flag(manifest, "--audit-log-maxage", "thirty")
    assert running_settings(edited, Settings()) is None
    assert plan_revocation(edited, files, before.config_hash, desired("alice")) is None


def test_the_last_person_gone_without_a_policy_unpatches() -> None:
    before = desired("alice", policy=False)
    manifest, files = _running(before)
    step = plan_revocation(manifest, files, before.config_hash, desired(level="None"))
    assert step is not None and step.files == {} and step.config_hash == ""
