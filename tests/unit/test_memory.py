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
def block(tmp_path, request):
    """A RAM block of ``request.param`` MiB in a file on tmpfs where there is one (where guest RAM
    lives: it allocates exactly the pages touched)."""
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else tmp_path) as tmp:
        ram = RAMBlock("ram", request.param * MIB, str(Path(tmp) / "ram"))
        try:
            yield ram
        finally:
            ram.close()


def allocated_pages(block: RAMBlock) -> int:
    return os.stat(block.mem_path).st_blocks * 512 // PAGE_SIZE


def allocation_after(block: RAMBlock, expected: int, timeout: float = 5.0) -> int:
    """The block's allocated pages once they reach *expected* (or time is up), and 0.2 s later."""
    deadline = time.monotonic() + timeout
    while allocated_pages(block) < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    return allocated_pages(block)


def write_run(block: RAMBlock, first: int, count: int, value: int) -> None:
    block.write_pages(np.arange(first, first + count), np.full((count, PAGE_SIZE), value, np.uint8))


@pytest.mark.parametrize("block", [64], indirect=True)
def test_a_long_run_allocates_as_far_ahead_as_it_has_come(block):
    for first in range(0, 1024, 256):
        write_run(block, first, 256, 7)
    assert allocation_after(block, 2048) == 2048, "1024 pages written, 1024 allocated ahead"
    assert (block.pages[:1024] == 7).all() and not block.pages[1024:2048].any()


@pytest.mark.parametrize("block", [256], indirect=True)
def test_lookahead_is_capped(block):
    for first in range(0, 16384, 1024):
        write_run(block, first, 1024, 1)
    assert allocation_after(block, 16384 + Prefaulter.MAX_AHEAD) == 16384 + Prefaulter.MAX_AHEAD


@pytest.mark.parametrize("block", [64], indirect=True)
def test_short_runs_allocate_only_what_they_write(block):
    """Data pages scattered among zero pages: the zero pages stay unbacked."""
    for first in range(0, 8192, 512):
        write_run(block, first, 100, 3)
    assert allocation_after(block, 16 * 100) == 16 * 100
    assert int(block.unbacked_pages().sum()) == block.npages - 16 * 100


@pytest.mark.parametrize("block", [64], indirect=True)
def test_packets_out_of_order_still_make_a_run(block):
    """Two multifd channels: each pair of 128-page packets lands second one first."""
    for first in range(0, 1024, 256):
        write_run(block, first + 128, 128, 5)
        write_run(block, first, 128, 5)
    assert allocation_after(block, 2048) == 2048


@pytest.mark.parametrize("block", [64], indirect=True)
def test_a_forked_worker_allocates_only_what_it_writes(block):
    """A worker's runs are every few batches of the stream: what follows them is another worker's."""
    block.forked()
    for first in range(0, 1024, 256):
        write_run(block, first, 256, 7)
    assert allocation_after(block, 2048, timeout=0.5) == 1024
    assert (block.pages[:1024] == 7).all()
