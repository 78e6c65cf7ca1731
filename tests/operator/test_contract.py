"""The API contract on the emulator (the same checks run on the real apiserver)."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from tests.contract import check_api_contract
from tests.operator.cluster import ADMIN_TOKEN
from tests.operator.conftest import Harness


def test_the_emulator_keeps_the_api_contract(harness: Harness) -> None:
    check_api_contract(harness.api)


def test_the_emulator_refuses_what_it_does_not_implement(harness: Harness) -> None:
    """An ignored query parameter once made a test pass that the real apiserver failed."""
    refused = (
        {"fieldSelector": "spec.nodeName=x"},
        {"fieldSelector": "metadata.name!=x"},
        {"labelSelector": "a in (b)"},
    )
    for query in refused:
        with pytest.raises(Exception, match="400"):
            harness.api._json("list", "GET", "/api/v1/nodes", query=query)


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        (None, False),
        ("Bearer wrong-token", False),
        (f"Bearer bearer {ADMIN_TOKEN}", False),  # the in-cluster prefix doubled
        (f"Bearer {ADMIN_TOKEN}", True),
        (f"bearer {ADMIN_TOKEN}", True),  # the scheme in any case, as the apiserver reads it
    ],
)
def test_the_emulator_checks_credentials_as_the_apiserver_does(
    harness: Harness, header: str | None, accepted: bool
) -> None:
    request = urllib.request.Request(f"{harness.cluster.url}/api/v1/nodes")
    if header is not None:
        request.add_header("Authorization", header)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    assert status == (200 if accepted else 401)
