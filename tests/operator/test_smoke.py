from __future__ import annotations

from kube_audit.core.manifest import config_hash_of, parse_manifest
from kube_audit.core.tokens import parse_token_file
from tests.operator.conftest import Harness, eventually


def test_user_and_policy_end_to_end(harness: Harness) -> None:
    harness.add_control_plane("cp-1")
    node = harness.start("cp-1")
    harness.apply_user("alice", groups=["developer"])
    harness.apply_policy("dev", rules=[{"level": "Metadata", "userGroups": ["developer"]}])
    eventually(node.applied, what="an apply")
    secret = eventually(
        lambda: harness.cluster.objects("secrets").get("audituser-alice"), what="token Secret"
    )
    manifest = parse_manifest(node.layout.manifest.read_text())
    assert config_hash_of(manifest)
    ready = eventually(
        lambda: (
            (harness.condition("auditusers", "alice") or {}).get("status") == "True"
            and harness.condition("auditusers", "alice")
        )
    )
    assert ready["reason"] == "Applied"
    token_dir = next(node.layout.config_dir.iterdir())
    records = parse_token_file((token_dir / "tokens.csv").read_bytes())
    assert [r.username for r in records] == ["alice"]
    assert secret["metadata"]["ownerReferences"][0]["name"] == "alice"
