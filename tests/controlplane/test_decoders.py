"""What we write is read back as written by kubelet's and kube-apiserver's own decoders, and
what we read of a token file is what kube-apiserver reads.

Go reads YAML with a YAML 1.1 resolver: a plain ``y`` is a boolean there, ``1e3`` a number.
Arbitrary strings go into a real kubeadm manifest (env value, annotation) and into an audit
policy (users, groups, namespaces, resourceNames); the stand-in decodes each file with kubelet's
static pod source and the apiserver's policy loader, and every string must come back unchanged.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings, strategies as st

from kube_audit.core.manifest import apiserver_container, parse_manifest, render_manifest
from kube_audit.core.policy import parse_audit_policy, render_audit_policy
from kube_audit.core.tokens import TokenFileError, TokenRecord, parse_token_file
from tests.conftest import audit_policy, kubeadm_manifest_text
from tests.controlplane.cluster import BIN

GO_SPECIAL = [
    "y", "Y", "n", "N", "yes", "No", "on", "OFF", "true", "null", "~", "1e3", "1E+3", "0o17",
    "017", "089", "0x1F", "0b101", "-0b1", "+1", "-1.5", ".5", "5.", ".inf", "-.Inf", ".NaN",
    "1_000", "2001-12-14", "2001-12-14 21:59:43.10", "<<", "198.18.0.1:6443", "-", "=", "'", '"',
]  # fmt: skip
STRINGS = st.one_of(
    st.sampled_from(GO_SPECIAL),
    st.from_regex(r"[-+.]?[0-9][0-9._eExXoObB+-]{0,6}", fullmatch=True),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12),
)
BATCH = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))


def decode(
    command: str, folder: Path, texts: list[str], suffix: str = ".yaml"
) -> list[dict[str, Any]]:
    """Each text as a file (UTF-8, byte for byte), read by the stand-in's ``command``."""
    paths = []
    for i, text in enumerate(texts):
        path = folder / f"{i:04d}{suffix}"
        path.write_bytes(text.encode())
        paths.append(str(path))
    out = subprocess.run(
        [str(BIN / "kubelet-standin"), command, *paths],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


@given(values=st.lists(STRINGS, min_size=1, max_size=40))
@example(values=GO_SPECIAL)
@BATCH
def test_kubelet_reads_every_manifest_string_as_written(
    standin: Path, tmp_path_factory: Any, values: list[str]
) -> None:
    base = parse_manifest(kubeadm_manifest_text("v1.31"))
    texts = []
    for value in values:
        manifest = copy.deepcopy(base)
        manifest["metadata"].setdefault("annotations", {})["example.com/value"] = value
        apiserver_container(manifest)["env"] = [{"name": "VALUE", "value": value}]
        texts.append(render_manifest(manifest))
    for value, line in zip(
        values, decode("decode-pod", tmp_path_factory.mktemp("pods"), texts), strict=True
    ):
        assert "pod" in line, (value, line.get("error"))
        pod = line["pod"]
        assert pod["metadata"]["annotations"]["example.com/value"] == value
        assert pod["spec"]["containers"][0]["env"][0]["value"] == value


@given(values=st.lists(STRINGS, min_size=1, max_size=40))
@example(values=GO_SPECIAL)
@BATCH
def test_the_apiserver_reads_every_policy_string_as_written(
    standin: Path, tmp_path_factory: Any, values: list[str]
) -> None:
    texts, kept = [], []
    for value in values:
        rule = {
            "level": "Metadata",
            "users": [value],
            "userGroups": [value],
            "namespaces": [value],
            "resources": [{"group": "", "resources": ["pods"], "resourceNames": [value]}],
        }
        try:
            policy = parse_audit_policy(audit_policy("p", rules=[rule]))
        except Exception:  # refused by our validation: nothing is written for it
            continue
        text = render_audit_policy([policy])
        assert text is not None
        texts.append(text.decode())
        kept.append(value)
    for value, line in zip(
        kept, decode("decode-audit-policy", tmp_path_factory.mktemp("p"), texts), strict=True
    ):
        assert "policy" in line, (value, line.get("error"))
        (rule,) = line["policy"]["rules"]
        assert rule["users"] == rule["userGroups"] == rule["namespaces"] == [value]
        assert rule["resources"][0]["resourceNames"] == [value]


# Token files: the characters Go's encoding/csv treats specially, and a few it does not.
TOKEN_TEXT = st.text(st.sampled_from(["a", "b", ",", '"', "\n", "\r", " ", "#", "é"]), max_size=30)
TOKEN_EXAMPLES = [
    "tok,alice,1\n", "# a comment\n", 'a"b,c,d\n', '"a"b,c,d\n', "a,b,c\r\nd,e,f\r\n",
    'a,b,"c\r\nd"\n', "a\rb,c,d\n", "a,b,c\r", "\n\n", ' "a",b,c\n', "a,b,c,\n", "a,b,c,d,e\n",
    '"unterminated,b,c\n', 'a,b,"c""d",\n', "x,y,z\nx,w,v\n", ",b,c\n", "a,b\n", "",
]  # fmt: skip


def _fields(record: TokenRecord) -> tuple[str, str, str, tuple[str, ...]]:
    return record.token, record.username, record.uid, record.groups


@given(texts=st.lists(TOKEN_TEXT, min_size=1, max_size=40))
@example(texts=TOKEN_EXAMPLES)
@BATCH
def test_token_files_read_as_kube_apiserver_reads_them(
    standin: Path, tmp_path_factory: Any, texts: list[str]
) -> None:
    """Our reader against kube-apiserver's own (tokenfile.NewCSV, encoding/csv beneath it):
    the same records, the same person per token, and refused exactly when it would not start."""
    answers = decode("decode-token-file", tmp_path_factory.mktemp("tokens"), texts, ".csv")
    for text, line in zip(texts, answers, strict=True):
        try:
            ours = parse_token_file(text.encode())
        except TokenFileError as error:
            assert line.get("error"), f"{text!r}: we refuse ({error}), kube-apiserver does not"
            continue
        assert not line.get("error"), f"{text!r}: kube-apiserver refuses: {line['error']}"
        go = [
            (r[0], r[1], r[2], tuple(r[3].split(",")) if len(r) >= 4 else ())
            for r in line["records"]
        ]
        assert [_fields(r) for r in ours] == go, text
        people = {r.token: (r.username, r.uid, list(r.groups)) for r in ours if r.token}
        assert people == {t: (u["name"], u["uid"], u["groups"]) for t, u in line["users"].items()}
