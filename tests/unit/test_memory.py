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


def through_the_mapping(block: RAMBlock) -> RAMBlock:
    """The block as on hugetlbfs, whose files take no write(2): pages go through the mapping, as into
    anonymous RAM, and the Prefaulter allocates them (here on tmpfs, where allocation can be counted)."""
    os.close(block.file)
    block.file = None
    return block


@pytest.mark.parametrize("block", [64], indirect=True)
def test_a_long_run_allocates_as_far_ahead_as_it_has_come(block):
    through_the_mapping(block)
    for first in range(0, 1024, 256):
        write_run(block, first, 256, 7)
    assert allocation_after(block, 2048) == 2048, "1024 pages written, 1024 allocated ahead"
    assert (block.pages[:1024] == 7).all() and not block.pages[1024:2048].any()


@pytest.mark.parametrize("block", [256], indirect=True)
def test_lookahead_is_capped(block):
    through_the_mapping(block)
    for first in range(0, 16384, 1024):
        write_run(block, first, 1024, 1)
    assert allocation_after(block, 16384 + Prefaulter.MAX_AHEAD) == 16384 + Prefaulter.MAX_AHEAD


@pytest.mark.parametrize("path", ["file", "mapping"])
@pytest.mark.parametrize("block", [64], indirect=True)
def test_short_runs_allocate_only_what_they_write(block, path):
    """Data pages scattered among zero pages: the zero pages stay unbacked."""
    if path == "mapping":
        through_the_mapping(block)
    for first in range(0, 8192, 512):
        write_run(block, first, 100, 3)
    assert allocation_after(block, 16 * 100) == 16 * 100
    assert int(block.unbacked_pages().sum()) == block.npages - 16 * 100


@pytest.mark.parametrize("block", [64], indirect=True)
def test_packets_out_of_order_still_make_a_run(block):
    """Two multifd channels: each pair of 128-page packets lands second one first."""
    through_the_mapping(block)
    for first in range(0, 1024, 256):
        write_run(block, first + 128, 128, 5)
        write_run(block, first, 128, 5)
    assert allocation_after(block, 2048) == 2048


@pytest.mark.parametrize("block", [64], indirect=True)
def test_a_forked_worker_allocates_only_what_it_writes(block):
    """A worker's runs are every few batches of the stream: what follows them is another worker's."""
    through_the_mapping(block)
    block.forked()
    for first in range(0, 1024, 256):
        write_run(block, first, 256, 7)
    assert allocation_after(block, 2048, timeout=0.5) == 1024
    assert (block.pages[:1024] == 7).all()


@pytest.mark.parametrize("block", [64], indirect=True)
def test_pages_go_through_the_ram_file_and_allocate_nothing_ahead(block):
    """A RAM file takes incoming pages with pwrite: the mapping sees them, and no lookahead runs
    (the page cache, not this process's page tables, gets the pages)."""
    assert block.writes_to_file()
    for first in range(0, 1024, 256):
        write_run(block, first, 256, 7)
    assert allocation_after(block, 2048, timeout=0.5) == 1024
    assert (block.pages[:1024] == 7).all() and block._prefaulter is None
    with open(block.mem_path, "rb") as f:
        assert f.read(1024 * PAGE_SIZE) == bytes([7]) * (1024 * PAGE_SIZE)


@pytest.mark.parametrize("path", ["file", "mapping"])
@pytest.mark.parametrize("block", [1], indirect=True)
def test_pages_in_any_order_land_where_they_belong(block, path):
    if path == "mapping":
        through_the_mapping(block)
    pages = np.array([9, 3, 4, 5, 200, 201, 0, 255])
    data = np.arange(len(pages), dtype=np.uint8)[:, None].repeat(PAGE_SIZE, axis=1) + 1
    block.write_pages(pages, data)
    expected = np.zeros((block.npages, PAGE_SIZE), np.uint8)
    expected[pages] = data
    assert (block.pages == expected).all()


@pytest.mark.parametrize("block", [1], indirect=True)
def test_userfaultfd_clients_get_their_writes_through_the_mapping(block):
    """Postcopy and background snapshot watch the mapping with userfaultfd: a write beside it
    would slip past them (docs/qemu/postcopy.md, docs/background-snapshot.md)."""
    block.faulting = True
    assert not block.writes_to_file()
    block.faulting, block.write_tracked = False, True
    assert not block.writes_to_file()
    block.write_tracked = False
    assert block.writes_to_file()


def test_a_forked_worker_reopens_the_ram_file(tmp_path):
    """Workers keep only the descriptors they name (worker_process.start): the block's own is gone."""
    block = RAMBlock("ram", MIB, str(tmp_path / "ram"))
    try:
        inherited = block.file
        os.close(inherited)
        block.forked()
        assert block.file is not None
        write_run(block, 3, 2, 9)
        assert (block.pages[3:5] == 9).all() and not block.pages[:3].any()
    finally:
        block.close()


def test_anonymous_ram_has_no_file():
    block = RAMBlock("ram", MIB)
    try:
        assert block.file is None and not block.writes_to_file()
        write_run(block, 1, 3, 4)
        assert (block.pages[1:4] == 4).all() and not block.pages[4:].any()
    finally:
        block.close()
