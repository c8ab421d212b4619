"""The destination's checks of an x-ignore-shared block list (QEMU's ram_load_precopy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmigrate.machine.memory import PAGE_SIZE, RAMBlock
from vmigrate.migration.ram import RamLoader
from vmigrate.migration.savevm import LoadError
from vmigrate.migration.wire import ram as R


@pytest.fixture
def shared(tmp_path: Path):
    path = tmp_path / "ram"
    path.write_bytes(b"\x5a" * PAGE_SIZE * 2)
    block = RAMBlock("ram", 2 * PAGE_SIZE, str(path))
    yield block
    block.close()


def block_list(gpa: int) -> R.RamMemSize:
    return R.RamMemSize((R.RamBlockInfo("ram", 2 * PAGE_SIZE, gpa=gpa),))


def test_same_gpa_is_accepted_and_the_contents_kept(shared):
    loader = RamLoader([shared], ignore_shared=True)
    assert loader.ignored == {"ram"} and loader.known_zero == {}
    loader.check_block_list(block_list(0))
    loader.close()
    assert bytes(shared.bytes[:4]) == b"\x5a" * 4


def test_mismatched_gpa_is_refused_with_qemus_text(shared):
    with pytest.raises(LoadError, match=r"^Mismatched GPAs for block ram 4096!= 0$"):
        RamLoader([shared], ignore_shared=True).check_block_list(block_list(4096))


def test_block_not_shared_here_is_refused():
    block = RAMBlock("ram", 2 * PAGE_SIZE)
    try:
        loader = RamLoader([block], ignore_shared=True)
        assert not loader.ignored
        with pytest.raises(LoadError, match="Block ram is not shared here"):
            loader.check_block_list(block_list(0))
    finally:
        block.close()


def test_without_the_capability_nothing_is_ignored(shared):
    loader = RamLoader([shared])
    assert not loader.ignored
    loader.check_block_list(R.RamMemSize((R.RamBlockInfo("ram", 2 * PAGE_SIZE),)))
