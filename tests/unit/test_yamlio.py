"""Strings Go's YAML 1.1 resolver would read as booleans, numbers or null are quoted."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from kube_audit.core import yamlio
from kube_audit.core.manifest import parse_manifest, render_manifest
from tests.conftest import kubeadm_manifest_text

GO_NOT_STRINGS = [
    "y", "Y", "n", "N", "yes", "No", "on", "OFF", "true", "null", "~", "", "1e3", "1E+3",
    "0o17", "017", "089", "0x1F", "0b101", "+1", "-1.5", ".5", "5.", ".inf", "-.Inf", ".NaN",
    "1_000", "2001-12-14", "2001-12-14 21:59:43.10", "<<",
]  # fmt: skip
GO_STRINGS = ["198.18.0.1:6443", "-", ".", "1abc", "abc", "--secure-port=6443", "10.96.0.0/12"]


@pytest.mark.parametrize("value", GO_NOT_STRINGS)
def test_go_special_scalars_are_quoted(value: str) -> None:
    assert not yamlio.go_reads_as_string(value)
    line = yamlio.dump({"k": value}).strip()
    assert line in (f"k: '{value}'", f'k: "{value}"'), line


@pytest.mark.parametrize("value", GO_STRINGS)
def test_plain_strings_stay_plain(value: str) -> None:
    assert yamlio.go_reads_as_string(value)
    assert yamlio.dump({"k": value}).strip() in (f"k: {value}", f"k: '{value}'")


@given(st.recursive(st.text(), lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner)))
def test_round_trip(doc: object) -> None:
    assert yamlio.load(yamlio.dump(doc)) == doc


@pytest.mark.parametrize("version", ["v1.17", "v1.31"])
def test_kubeadm_manifests_keep_their_bytes(version: str) -> None:
    text = kubeadm_manifest_text(version)
    assert render_manifest(parse_manifest(text)) == text
