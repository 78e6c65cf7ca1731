"""Webhook mode on a host tree: the node agent writes what the authn-webhook answers from and
what points kube-apiserver at it; identity changes never touch the manifest; a switch waits
for the webhook; the real webhook serves what the agent wrote."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from kube_audit import hostfs
from kube_audit.agent import pki
from kube_audit.agent.apply import apply_node, plan_node, publish_identities
from kube_audit.agent.authn_webhook import AuthnWebhook, WebhookFiles
from kube_audit.agent.layout import HostLayout
from kube_audit.agent.uninstall import uninstall_node
from kube_audit.agent.webhook_files import (
    ca_files,
    digest_key,
    serving_files,
    webhook_answers,
    webhook_kubeconfig,
)
from kube_audit.core.identities import (
    lookup_digest,
    parse_identity_snapshot,
    render_keyed_snapshot,
    review_token,
    token_digest,
)
from kube_audit.core.manifest import (
    WEBHOOK_CA_ANNOTATION,
    config_hash_of,
    flag_value,
    parse_manifest,
    render_manifest,
    webhook_ca_of,
)
from kube_audit.core.plan import TOKEN_FILE, DesiredState, collect_inputs, plan_desired
from kube_audit.core.settings import Settings
from kube_audit.core.tokens import fingerprint
from kube_audit.errors import NodeConfigError, WebhookNotAnswering
from tests.agent.conftest import FakeNode, health, snapshot
from tests.conftest import audit_policy, audit_user, long_token, token_secret

WEBHOOK = Settings(identity_mode="webhook")
NOW = datetime(2026, 12, 5, tzinfo=UTC).timestamp()


def _desired(settings: Settings, *names: str) -> DesiredState:
    objs: list[Any] = [audit_policy("all", rules=[{"level": "Metadata"}])]
    for name in names:
        objs += [
            audit_user(name, groups=["dev"]),
            token_secret(f"audituser-{name}", long_token(f"tok-{name}")),
        ]
    return plan_desired(collect_inputs([(f"t#{i}", o) for i, o in enumerate(objs)]), settings)


def _answers(layout: HostLayout) -> str | None:
    return None


def _people(layout: HostLayout) -> list[str]:
    identities = parse_identity_snapshot(layout.identity_snapshot.read_bytes())
    return sorted(i.username for i in identities.values())


def _apply(layout: HostLayout, desired: DesiredState, url: str, **kw: Any) -> Any:
    kw.setdefault("webhook_probe", _answers)
    return apply_node(layout, desired, health(url), wall=lambda: NOW, **kw)


def _webhook_layout(layout: HostLayout) -> HostLayout:
    return replace(layout, settings=WEBHOOK)


def test_identity_changes_never_touch_the_manifest(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    node, url = fake_node
    layout = _webhook_layout(layout)
    first = _apply(layout, _desired(WEBHOOK, "alice"), url)
    assert first.outcome == "applied" and first.restarted
    manifest = parse_manifest(layout.manifest.read_text())
    kubeconfig_path = flag_value(manifest, "--authentication-token-webhook-config-file")
    assert kubeconfig_path is not None and flag_value(manifest, "--token-auth-file") is None
    kubeconfig = json.loads(layout.host(kubeconfig_path).read_bytes())
    ca_cert = ca_files(layout)[0].read_bytes()
    assert kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"] == (
        __import__("base64").b64encode(ca_cert).decode()
    )
    assert _people(layout) == ["alice"]
    assert layout.identity_snapshot.stat().st_mode & 0o777 == 0o600
    assert b"tok-alice" not in layout.identity_snapshot.read_bytes()
    manifest_text, restarts = layout.manifest.read_text(), node.probes
    for names in (("alice", "bob"), ("bob",), ()):
        result = _apply(layout, _desired(WEBHOOK, *names), url)
        assert result.outcome == "unchanged" and not result.restarted, result
        assert _people(layout) == sorted(names)
        assert layout.manifest.read_text() == manifest_text
    assert node.probes == restarts, "no health wait: the apiserver was never restarted"


def test_the_snapshot_is_published_on_its_own(layout: HostLayout) -> None:
    """What the operator does before (and whatever) the rollout decides: a held policy never
    keeps a deleted person answered."""
    layout = _webhook_layout(layout)
    before = layout.manifest.read_text()
    written = publish_identities(layout, _desired(WEBHOOK, "alice"), lambda: NOW)
    assert set(written) == {"ca.key", "ca.crt", "serving.key", "serving.crt", "identities.json",
                            "digest.key", "authn-webhook.kubeconfig"}  # fmt: skip
    assert publish_identities(layout, _desired(WEBHOOK, "alice"), lambda: NOW) == []
    assert publish_identities(layout, _desired(WEBHOOK), lambda: NOW) == ["identities.json"]
    assert _people(layout) == [] and layout.manifest.read_text() == before


def test_the_serving_certificate_is_renewed_and_the_ca_kept(layout: HostLayout) -> None:
    """Renewed 90 days before its end, by the same CA: the apiserver, which read the CA once,
    needs no restart."""
    layout = _webhook_layout(layout)
    publish_identities(layout, _desired(WEBHOOK, "alice"), lambda: NOW)
    ca = ca_files(layout)[0].read_bytes()
    kubeconfig = webhook_kubeconfig(layout).read_bytes()
    cert = serving_files(layout)[0].read_bytes()
    end = pki.not_after(cert).timestamp()
    assert publish_identities(layout, _desired(WEBHOOK, "alice"), lambda: end - 100 * 86400) == []
    renewed = publish_identities(layout, _desired(WEBHOOK, "alice"), lambda: end - 80 * 86400)
    assert renewed == ["serving.key", "serving.crt"]
    new_cert = serving_files(layout)[0].read_bytes()
    assert not pki.needs_renewal(new_cert, ca, datetime.fromtimestamp(end, UTC))
    assert ca_files(layout)[0].read_bytes() == ca
    assert webhook_kubeconfig(layout).read_bytes() == kubeconfig


def test_the_switch_waits_for_the_webhook(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    """token-file to webhook is one restart, made only once the webhook answers: until then
    the node keeps its token file and says why. After the switch the manifest names no token
    file (the old content folder stays only for the backups a rollback would restore)."""
    _, url = fake_node
    assert _apply(layout, _desired(Settings(), "alice"), url).outcome == "applied"
    token_file_mode = layout.manifest.read_text()
    assert _people(layout) == ["alice"], "the snapshot is kept in token-file mode too"
    layout = _webhook_layout(layout)
    with pytest.raises(WebhookNotAnswering, match="authn-webhook container running"):
        _apply(layout, _desired(WEBHOOK, "alice"), url, webhook_probe=lambda _: "refused")
    assert layout.manifest.read_text() == token_file_mode
    result = _apply(layout, _desired(WEBHOOK, "alice"), url)
    assert result.outcome == "applied" and result.restarted
    manifest = parse_manifest(layout.manifest.read_text())
    assert flag_value(manifest, "--token-auth-file") is None
    policy = flag_value(manifest, "--audit-policy-file")
    assert policy is not None
    assert not (layout.host(policy).parent / TOKEN_FILE).exists()


def test_uninstall_removes_the_webhook_files(
    layout: HostLayout, fake_node: tuple[FakeNode, str], host: Path
) -> None:
    _, url = fake_node
    layout = _webhook_layout(layout)
    _apply(layout, _desired(WEBHOOK, "alice"), url)
    uninstall_node(layout, health(url))
    left = snapshot(host / "var/lib/kube-audit")
    assert not [name for name in left if "authn-webhook" in name or "identities" in name], left
    assert not webhook_kubeconfig(layout).exists()


@pytest.fixture
def running_webhook(
    layout: HostLayout, tmp_path: Path
) -> Iterator[tuple[AuthnWebhook, HostLayout]]:
    """The real webhook on what the agent wrote (a cluster CA of the test's own)."""
    layout = _webhook_layout(layout)
    publish_identities(layout, _desired(WEBHOOK, "alice"), lambda: datetime.now(UTC).timestamp())
    cluster_ca = pki.generate_ca(datetime.now(UTC), "kubernetes")
    client = pki.issue(cluster_ca, datetime.now(UTC), common_name="apiserver", client=True)
    (tmp_path / "ca.crt").write_bytes(cluster_ca.cert)
    (tmp_path / "client.crt").write_bytes(client.cert)
    cert, key = serving_files(layout)
    files = WebhookFiles(
        layout.identity_snapshot, cert, key, tmp_path / "ca.crt", tmp_path / "client.crt"
    )
    server = AuthnWebhook(files, ("127.0.0.1", 0))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield server, layout
    server.shutdown()
    thread.join(10)


def test_the_probe_passes_only_our_answering_webhook(
    running_webhook: tuple[AuthnWebhook, HostLayout], tmp_path: Path
) -> None:
    server, layout = running_webhook
    assert webhook_answers(layout, server.port) is None
    assert server.source.identities is not None
    assert {i.username for i in server.source.identities.values()} == {"alice"}
    assert lookup_digest(long_token("tok-alice"), digest_key(layout)) in server.source.identities
    closed = partial(webhook_answers, layout, 1)(timeout=2)
    assert closed is not None and "127.0.0.1:1" in closed
    ca_files(layout)[0].write_bytes(pki.generate_ca(datetime.now(UTC), "other").cert)
    impostor = webhook_answers(layout, server.port)
    assert impostor is not None and "CERTIFICATE_VERIFY_FAILED" in impostor


def test_the_probe_waits_for_the_webhook_to_answer_from_the_new_snapshot(
    running_webhook: tuple[AuthnWebhook, HostLayout],
) -> None:
    """The webhook names the snapshot it answers from; the probe passes only once that is the
    one on disk, giving the webhook ``catch_up`` seconds (here its refresh, run in the sleep)."""
    server, layout = running_webhook
    server.shutdown()  # answers stay, the refreshes are the test's: no race with its thread
    stale = AuthnWebhook(server.files, ("127.0.0.1", 0))
    thread = threading.Thread(target=partial(stale.serve, look=False), daemon=True)
    thread.start()
    try:
        assert webhook_answers(layout, stale.port) is None
        publish_identities(
            layout, _desired(WEBHOOK, "alice", "bob"), lambda: datetime.now(UTC).timestamp()
        )
        naps: list[float] = []
        why = webhook_answers(layout, stale.port, catch_up=0.5, sleep=naps.append)
        assert why is not None and "still answers from another identity snapshot" in why, why
        assert str(layout.identity_snapshot) in why and sum(naps) >= 0.5
        assert webhook_answers(layout, stale.port, sleep=lambda _: stale.refresh()) is None
        assert stale.source.identities is not None and len(stale.source.identities) == 2
    finally:
        stale.shutdown()
        thread.join(10)


def test_the_plan_shows_identity_changes_as_fingerprints(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    """``kube-audit node plan`` in webhook mode: the people the snapshot gains or loses, tokens
    as the same fingerprints the token file's plan shows, and no manifest change."""
    _, url = fake_node
    layout = _webhook_layout(layout)
    _apply(layout, _desired(WEBHOOK, "alice"), url)
    plan = plan_node(layout, _desired(WEBHOOK, "alice", "bob"))
    assert "--- a/identities.json (webhook mode; tokens shown as fingerprints)" in plan
    key = digest_key(layout)
    assert key is not None
    keyed = lookup_digest(long_token("tok-bob"), key)
    assert f"+hmac-sha256:{keyed[:12]} bob uid=" in plan
    assert fingerprint(long_token("tok-bob")) not in plan, "never the token's own digest"
    assert "tok-bob" not in plan and "kube-apiserver.yaml" not in plan
    assert plan_node(layout, _desired(WEBHOOK, "alice")) == ""


def _clear_tokens_on(root: Path, tokens: list[str]) -> list[str]:
    """Every file under ``root`` that holds one of ``tokens`` in clear."""
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and any(t.encode() in path.read_bytes() for t in tokens)
    )


def test_no_token_in_clear_is_left_once_the_node_runs_webhook_mode(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    """Issue 36 finding 2. Before: the token-file days' backups (and the content folders they
    name) kept tokens.csv for as long as the manifest did not change ten times, which webhook
    mode rarely makes it do, while the docs said digests only. Once the switch is verified,
    nothing on the host holds a token in clear, and the webhook's own folder holds only its
    snapshot and serving pair. Until then the token file is the way back: a failed switch is
    rolled back to it (tests/agent/test_holds.py)."""
    _node, url = fake_node
    tokens = [long_token(f"tok-{name}") for name in ("alice", "bob")]
    root = layout.root
    for people in (("alice",), ("alice", "bob")):
        assert _apply(layout, _desired(Settings(), *people), url).outcome == "applied"
    assert _clear_tokens_on(root, tokens), "token-file mode: the token file and its backups"
    webhook = _webhook_layout(layout)
    switched = _apply(webhook, _desired(WEBHOOK, "alice", "bob"), url)
    assert switched.outcome == "applied" and switched.restarted
    assert _clear_tokens_on(root, tokens) == []
    assert sorted(p.name for p in webhook.webhook_dir.iterdir()) == [
        "digest.key", "identities.json", "serving.crt", "serving.key"]  # fmt: skip
    assert (webhook.webhook_ca_dir / "ca.key").exists()
    backups = sorted(p.name for p in webhook.backups.iterdir())
    assert backups and all(not (webhook.backups / b / TOKEN_FILE).exists() for b in backups)
    assert uninstall_node(webhook, health(url)).outcome == "uninstalled", "the way out stays"


def test_an_earlier_versions_files_move_out_of_the_webhooks_reach(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    """0.1.x kept the CA (its key too) beside the serving pair, and the snapshot and its
    token-file backups in the state folder the webhook mounted whole. The same CA moves (the
    apiserver trusts it from its start on: no restart), the old snapshot goes, and the
    backups with tokens go once the node is verified in webhook mode (publish, every
    reconcile, does it: nothing else needs to change)."""
    _node, url = fake_node
    _apply(layout, _desired(Settings(), "alice"), url)
    webhook = _webhook_layout(layout)
    _apply(webhook, _desired(WEBHOOK, "alice"), url)
    ca_cert, ca_key = (path.read_bytes() for path in ca_files(webhook))
    kubeconfig = webhook_kubeconfig(webhook).read_bytes()
    for name, data in (("ca.crt", ca_cert), ("ca.key", ca_key)):
        (webhook.webhook_dir / name).write_bytes(data)
    for path in ca_files(webhook):
        path.unlink()
    (webhook.state_dir / "identities.json").write_bytes(webhook.identity_snapshot.read_bytes())
    backup = webhook.backups / "000099-0123456789abcdef"
    backup.mkdir()
    (backup / TOKEN_FILE).write_bytes(f"{long_token('tok-alice')},alice,u1\n".encode())
    written = publish_identities(webhook, _desired(WEBHOOK, "alice"), lambda: NOW)
    assert "ca.key" in written and "(removed backup 000099-0123456789abcdef" in written[-1]
    assert [path.read_bytes() for path in ca_files(webhook)] == [ca_cert, ca_key], "same CA"
    assert webhook_kubeconfig(webhook).read_bytes() == kubeconfig, "no restart needed"
    assert sorted(p.name for p in webhook.webhook_dir.iterdir()) == [
        "confirmed.json", "digest.key", "identities.json", "serving.crt", "serving.key"]  # fmt: skip
    assert not (webhook.state_dir / "identities.json").exists()
    assert _clear_tokens_on(webhook.root, [long_token("tok-alice")]) == []


def test_the_snapshot_holds_no_digest_of_a_token_only_keyed_ones(layout: HostLayout) -> None:
    """Issue 36, finding 8: a plain SHA-256 of a 32-character token a person chose can be
    guessed against offline. On the node every digest is keyed with the node's own secret
    (HMAC), so the file alone (a backup, a support bundle) is nothing to guess against; the
    webhook finds people by the keyed digest. Before: the token's SHA-256, whose first 12 hex
    digits were also its fingerprint on the status."""
    layout = _webhook_layout(layout)
    desired = _desired(WEBHOOK, "alice", "bob")
    publish_identities(layout, desired, lambda: NOW)
    data = layout.identity_snapshot.read_bytes()
    tokens = [long_token("tok-alice"), long_token("tok-bob")]
    for token in tokens:
        assert token_digest(token) not in data.decode()
        assert fingerprint(token).removeprefix("sha256:") not in data.decode()
    assert json.loads(data)["digest"] == "hmac-sha256"
    key_file = layout.webhook_dir / "digest.key"
    key = digest_key(layout)
    assert key is not None and len(key) == 32 and key_file.stat().st_mode & 0o777 == 0o600
    identities = parse_identity_snapshot(data)
    assert {i.username: d for d, i in identities.items()} == {
        "alice": lookup_digest(tokens[0], key), "bob": lookup_digest(tokens[1], key)
    }  # fmt: skip
    review = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                         "spec": {"token": tokens[0]}}).encode()  # fmt: skip
    assert review_token(identities, review, NOW, key=key).body["status"]["authenticated"]
    assert not review_token(identities, review, NOW).body["status"]["authenticated"]
    # Another node's key, other digests; the same node's key, the same bytes (nothing written).
    assert render_keyed_snapshot(desired.identities, bytes(32)) != data
    assert publish_identities(layout, desired, lambda: NOW) == []
    assert layout.identity_snapshot.read_bytes() == data


def test_a_corrupt_digest_key_is_the_nodes_to_fix_and_named(layout: HostLayout) -> None:
    """Before: a SnapshotError, retried on every reconcile and seen only in the log. Now the
    node is Blocked (a NodeConfigError is shown on the status and as an Event) with the file
    and what to do, and nothing is written."""
    layout = _webhook_layout(layout)
    desired = _desired(WEBHOOK, "alice")
    publish_identities(layout, desired, lambda: NOW)
    key_file = layout.webhook_dir / "digest.key"
    key_file.write_bytes(b"not a key\n")
    snapshot_before = layout.identity_snapshot.read_bytes()
    with pytest.raises(NodeConfigError) as refused:
        publish_identities(layout, _desired(WEBHOOK, "alice", "bob"), lambda: NOW)
    assert str(key_file) in str(refused.value) and "remove it" in str(refused.value)
    assert layout.identity_snapshot.read_bytes() == snapshot_before
    key_file.unlink()
    publish_identities(layout, _desired(WEBHOOK, "alice", "bob"), lambda: NOW)
    assert _people(layout) == ["alice", "bob"]


def test_a_new_ca_on_disk_restarts_the_apiserver_that_trusts_the_old_one(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    """Issue 36 finding 9: kube-apiserver reads the webhook's CA from its kubeconfig only at
    its start. The CA folder removed (a restore, a clean-up by hand): the node makes a new CA
    and a new serving certificate, and the running apiserver refuses every token. Before, the
    manifest stayed as it was and the node's status said live; now the manifest carries the
    CA's fingerprint (outside the config hash: the same on every node), so it changes and the
    apiserver restarts through the normal apply, and trusts the new CA."""
    node, url = fake_node
    layout = _webhook_layout(layout)
    desired = _desired(WEBHOOK, "alice")
    assert _apply(layout, desired, url).restarted
    manifest = parse_manifest(layout.manifest.read_text())
    first_ca = ca_files(layout)[0].read_bytes()
    assert webhook_ca_of(manifest) == "sha256:" + hashlib.sha256(first_ca).hexdigest()
    assert _apply(layout, desired, url).outcome == "unchanged"
    hostfs.remove_tree(layout.webhook_ca_dir)
    probes = node.probes
    result = _apply(layout, desired, url)
    assert result.outcome == "applied" and result.restarted, result
    assert node.probes > probes, "the apiserver was restarted and waited for"
    new_ca = ca_files(layout)[0].read_bytes()
    assert new_ca != first_ca
    again = parse_manifest(layout.manifest.read_text())
    assert webhook_ca_of(again) == "sha256:" + hashlib.sha256(new_ca).hexdigest()
    assert config_hash_of(again) == config_hash_of(manifest), "the config hash is the cluster's"
    assert _apply(layout, desired, url).outcome == "unchanged"


def test_a_manifest_from_before_the_ca_fingerprint_is_not_restarted_for_it(
    layout: HostLayout, fake_node: tuple[FakeNode, str]
) -> None:
    """An upgrade restarts nothing: a webhook-mode manifest written without the fingerprint
    (0.2.0) keeps running until the node's next change, which brings it."""
    _, url = fake_node
    layout = _webhook_layout(layout)
    assert _apply(layout, _desired(WEBHOOK, "alice"), url).restarted
    manifest = parse_manifest(layout.manifest.read_text())
    del manifest["metadata"]["annotations"][WEBHOOK_CA_ANNOTATION]
    layout.manifest.write_text(render_manifest(manifest))
    assert _apply(layout, _desired(WEBHOOK, "alice", "bob"), url).outcome == "unchanged"
    assert webhook_ca_of(parse_manifest(layout.manifest.read_text())) is None
    settings = replace(WEBHOOK, log_maxbackup=3)
    assert _apply(replace(layout, settings=settings), _desired(settings, "alice"), url).restarted
    assert webhook_ca_of(parse_manifest(layout.manifest.read_text())) is not None
