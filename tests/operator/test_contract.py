"""The API contract on the emulator (the same checks run on the real apiserver)."""

from __future__ import annotations

import pytest

from tests.contract import check_api_contract
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
