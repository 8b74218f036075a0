"""Fixtures of the router tests; the process helpers live in router_helpers.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from router_helpers import Proc


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Register processes here; all are killed at the end of the test."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()
