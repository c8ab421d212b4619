"""The COLO secondary's RAM cache (vmigrate/migration/colo.py RamCache, docs/colo.md).

Between checkpoints the secondary's own guest writes RAM; at a checkpoint its
writes must go and the primary's pages come, so that guest RAM equals the
primary's RAM — including pages the primary did not resend because it did not
write them.
"""

from __future__ import annotations

import numpy as np
import pytest

from vmigrate.machine.memory import PAGE_SIZE, RAMBlock
from vmigrate.machine.softcpu import SoftVcpus
from vmigrate.migration.colo import RamCache

NPAGES = 256


@pytest.fixture
def ram():
    block = RAMBlock("ram", NPAGES * PAGE_SIZE)
    vcpus = SoftVcpus(1, None)
    yield block, vcpus
    vcpus.shutdown()
    block.close()


def guest_write(block: RAMBlock, pages: np.ndarray, value: int) -> None:
    """What a software vCPU does on a write: the bytes, then the dirty log's mark."""
    block.pages[pages] = value
    block.dirty.mark_pages(pages)


def test_checkpoint_reverts_the_secondary_and_applies_the_primary(ram):
    block, vcpus = ram
    rng = np.random.default_rng(5)
    primary = rng.integers(0, 256, (NPAGES, PAGE_SIZE), dtype=np.uint8)
    block.pages[:] = primary  # the first load
    cache = RamCache([block], vcpus)
    try:
        for round_ in range(3):
            # The secondary's guest diverges; the primary's writes a different set of pages.
            guest_write(block, rng.choice(NPAGES, 40, replace=False), 0xA0 + round_)
            sent = np.sort(rng.choice(NPAGES, 30, replace=False))
            primary[sent] = rng.integers(0, 256, (sent.size, PAGE_SIZE), dtype=np.uint8)

            assert cache.revert() == 40
            block.pages[sent] = primary[sent]  # the checkpoint's records, as the RAM loader writes them
            cache.received["ram"][sent] = True
            cache.commit()
            assert np.array_equal(block.pages, primary)
            assert np.array_equal(cache.copies["ram"], primary)
            assert not cache.received["ram"].any()
    finally:
        cache.close()
