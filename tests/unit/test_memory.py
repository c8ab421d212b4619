"""Guest RAM blocks: page writes of an incoming migration and the allocation that goes with them."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from vmigrate.machine.memory import PAGE_SIZE, RAMBlock, Prefaulter

MIB = 1 << 20


@pytest.fixture
def ram_dir(tmp_path):
    """tmpfs where there is one (where guest RAM lives): it allocates exactly the pages touched."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        yield Path(tmp)


def allocated_pages(path: Path) -> int:
    return os.stat(path).st_blocks * 512 // PAGE_SIZE


def allocation_after(path: Path, expected: int, timeout: float = 5.0) -> int:
    """The file's allocated pages once they reach *expected* (or time is up), and 0.2 s later."""
    deadline = time.monotonic() + timeout
    while allocated_pages(path) < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    return allocated_pages(path)


def write_run(block: RAMBlock, first: int, count: int, value: int) -> None:
    block.write_pages(np.arange(first, first + count), np.full((count, PAGE_SIZE), value, np.uint8))


def test_a_long_run_allocates_as_far_ahead_as_it_has_come(ram_dir):
    path = ram_dir / "ram"
    block = RAMBlock("ram", 64 * MIB, str(path))
    try:
        for first in range(0, 1024, 256):
            write_run(block, first, 256, 7)
        assert allocation_after(path, 2048) == 2048, "1024 pages written, 1024 allocated ahead"
        assert (block.pages[:1024] == 7).all() and not block.pages[1024:2048].any()
    finally:
        block.close()


def test_lookahead_is_capped(ram_dir):
    path = ram_dir / "ram"
    block = RAMBlock("ram", 256 * MIB, str(path))
    try:
        for first in range(0, 16384, 1024):
            write_run(block, first, 1024, 1)
        assert allocation_after(path, 16384 + Prefaulter.MAX_AHEAD) == 16384 + Prefaulter.MAX_AHEAD
    finally:
        block.close()


def test_short_runs_allocate_only_what_they_write(ram_dir):
    """Data pages scattered among zero pages: the zero pages stay unbacked."""
    path = ram_dir / "ram"
    block = RAMBlock("ram", 64 * MIB, str(path))
    try:
        for first in range(0, 8192, 512):
            write_run(block, first, 100, 3)
        assert allocation_after(path, 16 * 100) == 16 * 100
        assert int(block.unbacked_pages().sum()) == block.npages - 16 * 100
    finally:
        block.close()
