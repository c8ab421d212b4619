"""The source's XBZRLE page cache and its per-page decisions (docs/qemu/ram.md §4).

The destination has no cache: XBZRLE deltas apply to whatever its page
holds.  So the source's cache must hold exactly what the destination got
for each cached page, and QEMU's rules ensure it: a missed page is
inserted and sent *from the cache copy*; an encoded or overflowing page
updates the cache copy to the bytes that were encoded; a zero page becomes
a zero copy.  In the last stage (VM stopped, nothing is sent again) the
cache is no longer updated.

Everything works on a batch of pages of one RAMBlock: one gather of the
guest pages (the snapshot every decision and every byte sent is taken
from), one vectorised lookup, one batch encode.  A batch whose pages could
share a cache slot is split so that the direct-mapped cache sees them in
order, as QEMU's page-at-a-time loop does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vmigrate.machine.memory import PAGE_SIZE, RAMBlock
from vmigrate.migration.stats import XbzrleStats
from vmigrate.migration.wire import ram as wire_ram
from vmigrate.migration.wire import xbzrle as wire_xbzrle

#: A cached page stays "fresh" (not evictable by another page) for this many dirty syncs.
CACHED_PAGE_LIFETIME = 2


class PageCache:
    """QEMU's page_cache.c: direct-mapped, ``size / 4096`` slots, keyed by page address.

    The slot array is ``np.zeros``, so the kernel hands its memory out on
    first write, as QEMU allocates slot pages on first insert.
    """

    def __init__(self, size: int) -> None:
        slots = size // PAGE_SIZE
        if slots < 1 or slots & (slots - 1):
            raise ValueError("the XBZRLE cache must be a power-of-two number of pages")
        self.slots = slots
        self.data = np.zeros((slots, PAGE_SIZE), np.uint8)
        self.addr = np.full(slots, -1, np.int64)
        self.age = np.zeros(slots, np.int64)

    def slot(self, keys: np.ndarray) -> np.ndarray:
        return keys & (self.slots - 1)

    def lookup(self, keys: np.ndarray, age: int) -> np.ndarray:
        """Hit mask; a hit refreshes the slot's age (cache_is_cached)."""
        slots = self.slot(keys)
        hit = self.addr[slots] == keys
        self.age[slots[hit]] = age
        return hit

    def insert(self, keys: np.ndarray, rows: np.ndarray | None, age: int) -> np.ndarray:
        """Store ``rows`` (None: zero pages) unless the slot holds another, fresh page.

        Returns the mask of inserted pages (cache_insert's success).
        """
        slots = self.slot(keys)
        held = self.addr[slots]
        ok = (held == -1) | (held == keys) | (self.age[slots] + CACHED_PAGE_LIFETIME <= age)
        target = slots[ok]
        self.data[target] = 0 if rows is None else rows[ok]
        self.age[target] = age
        self.addr[target] = keys[ok]
        return ok


@dataclass(slots=True)
class XbzrleSendCounts:
    """What one batch added to the RAM counters (docs/qemu/ram.md §7)."""

    zero_pages: int = 0
    normal_pages: int = 0
    xbzrle_records: int = 0
    bytes: int = 0


class XbzrleSender:
    """Sends pages once XBZRLE is active: zero, cached delta, or full page.

    ``bases`` gives each RAMBlock's first page number in one address space
    (QEMU's ram_addr_t / 4096), so the cache keys of different blocks never
    coincide.
    """

    def __init__(self, cache_size: int, stats: XbzrleStats, blocks: list[RAMBlock]) -> None:
        self.cache = PageCache(cache_size)
        self.stats = stats
        self.bases: dict[str, int] = {}
        base = 0
        for block in blocks:
            self.bases[block.idstr] = base
            base += block.npages

    def send(self, block: RAMBlock, pages: np.ndarray, channel: wire_ram.ChannelState, age: int,
             last_stage: bool) -> tuple[list[memoryview], XbzrleSendCounts]:
        """Records for ``pages`` (ascending indices of ``block``); ``age`` = dirty-sync-count."""
        parts: list[memoryview] = []
        counts = XbzrleSendCounts()
        start = 0
        while start < len(pages):
            end = int(np.searchsorted(pages, pages[start] + self.cache.slots, side="left"))
            self._send_chunk(block, pages[start:end], channel, age, last_stage, parts, counts)
            start = end
        return parts, counts

    def _send_chunk(self, block: RAMBlock, pages: np.ndarray, channel: wire_ram.ChannelState, age: int,
                    last_stage: bool, parts: list[memoryview], counts: XbzrleSendCounts) -> None:
        cache, stats = self.cache, self.stats
        snapshot = block.pages[pages]
        keys = pages.astype(np.int64) + self.bases[block.idstr]
        nonzero = wire_ram.nonzero_pages(snapshot, np.arange(len(pages)))

        zero = ~nonzero
        if zero.any():
            cache.insert(keys[zero], None, age)
            records = wire_ram.page_records(block.idstr, pages[zero], None, channel)
            parts.append(records)
            counts.zero_pages += int(zero.sum())
            counts.bytes += len(records)

        keys, pages, snapshot = keys[nonzero], pages[nonzero], snapshot[nonzero]
        hit = cache.lookup(keys, age)
        misses = int((~hit).sum())
        stats.cache_miss += misses
        if misses and not last_stage:
            cache.insert(keys[~hit], snapshot[~hit], age)
        full = ~hit

        hits = np.flatnonzero(hit)
        stats.pages += len(hits)
        if len(hits):
            slots = cache.slot(keys[hits])
            records, enc = wire_xbzrle.xbzrle_records(block.idstr, pages[hits], cache.data[slots],
                                                      snapshot[hits], channel)
            lengths = enc.lengths
            if not last_stage:
                update = lengths != 0
                cache.data[slots[update]] = snapshot[hits[update]]
            overflow = hits[lengths < 0]
            full[overflow] = True
            stats.overflow += len(overflow)
            stats.bytes += PAGE_SIZE * len(overflow) + len(records) - 8 * int((lengths > 0).sum())
            if len(records):
                parts.append(records)
                counts.xbzrle_records += int((lengths > 0).sum())
                counts.bytes += len(records)

        if full.any():
            records = wire_ram.page_records(block.idstr, pages[full], snapshot[full], channel)
            parts.append(records)
            counts.normal_pages += int(full.sum())
            counts.bytes += len(records)
