"""Fixtures of the conformance suite: QEMU/vmigrate pairs, shared or fresh."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import EXCHANGES, Options, Pair  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A pair shared by a module's tests: only for tests that leave both sides alike."""
    p = Pair.start(tmp_path_factory.mktemp("pair"))
    yield p
    p.close()


@pytest.fixture
def fresh_pair(tmp_path):
    """``fresh_pair(name=..., uuid=..., paused=..., incoming=...)``: a new pair for this test."""
    started: list[Pair] = []

    def start(**options) -> Pair:
        p = Pair.start(tmp_path, Options(**options))
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()


def pytest_terminal_summary(terminalreporter):
    if EXCHANGES:
        total = sum(EXCHANGES.values())
        detail = ", ".join(f"{Path(m).name}: {n}" for m, n in sorted(EXCHANGES.items()))
        terminalreporter.write_line(f"conformance: {total} exchanges compared with QEMU 7.2 ({detail})")
