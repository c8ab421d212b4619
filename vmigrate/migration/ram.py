"""The ``ram`` live section: dirty tracking and page sending (source), page loading (destination).

Source side (QEMU's ram.c): a migration bitmap per block starts all-dirty;
each sync ORs the vCPU dirty log into it.  Pages are sent in batches found
with one ``flatnonzero`` over a bitmap window and encoded by the vectorised
wire encoder, so the per-page work happens inside numpy and the socket
call, never in a Python loop.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol

import numpy as np

from vmigrate.machine.memory import PAGE_SIZE, RAMBlock
from vmigrate.migration.qemu_file import QEMUFileOut
from vmigrate.migration.stats import RamStats
from vmigrate.migration.wire import ram as wire_ram

#: Pages per encoded batch: big enough to amortise Python, small enough for the rate limiter.
BATCH_PAGES = 1024
#: Bitmap entries examined per scan step.
SCAN_PAGES = 1 << 16
#: QEMU stops an iteration after 50 ms so the loop can re-check limits and convergence.
ITERATION_MAX_SECONDS = 0.05
EOS_SIZE = 8
DIRTY_CLIENT = "migration"


class DirtyLogSource(Protocol):
    """The vCPU backend's dirty logging (KVM needs it switched on and pulled into the log)."""

    def dirty_log_start(self) -> None: ...

    def dirty_log_sync(self) -> None: ...

    def dirty_log_stop(self) -> None: ...


class RamSaver:
    def __init__(
        self,
        blocks: list[RAMBlock],
        stats: RamStats,
        phase: Callable[[], str],
        on_sync: Callable[[int], None],
        accel: "DirtyLogSource",
    ) -> None:
        self.blocks = blocks
        self.accel = accel
        self.stats = stats
        self._phase = phase
        self._on_sync = on_sync
        self.bitmaps = [np.zeros(b.npages, dtype=np.bool_) for b in blocks]
        self._cursor_block = 0
        self._cursor_page = 0
        self._channel = wire_ram.ChannelState()
        self._period_start = 0.0
        self._period_dirty = 0
        self._period_xfer = 0
        #: Hook for auto-converge, called at each ≥1 s period end with (dirty bytes, transferred bytes).
        self.on_period: Callable[[int, int], None] | None = None

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self.blocks)

    def remaining_bytes(self) -> int:
        return self.stats.remaining_pages * PAGE_SIZE

    def setup(self, f: QEMUFileOut) -> None:
        """START body: the block list; then every page dirty and the first sync (pass 1)."""
        f.put(wire_ram.mem_size([(b.idstr, b.size) for b in self.blocks]))
        for block, bitmap in zip(self.blocks, self.bitmaps):
            bitmap[:] = True
        self.stats.remaining_pages = sum(b.npages for b in self.blocks)
        for block in self.blocks:
            block.dirty.start(DIRTY_CLIENT)
        self.accel.dirty_log_start()
        self._period_start = time.monotonic()
        self.sync()
        f.put(wire_ram.eos())

    def sync(self) -> None:
        """Pull the dirty log into the migration bitmap (one 'pass')."""
        self.accel.dirty_log_sync()
        fresh = 0
        for block, bitmap in zip(self.blocks, self.bitmaps):
            fresh += block.dirty.collect_into(DIRTY_CLIENT, bitmap)
        self.stats.remaining_pages += fresh
        self.stats.dirty_sync_count += 1
        self._period_dirty += fresh
        now = time.monotonic()
        if now > self._period_start + 1.0:
            elapsed_ms = (now - self._period_start) * 1000
            if self.on_period is not None:
                self.on_period(self._period_dirty * PAGE_SIZE, self.stats.transferred - self._period_xfer)
            self.stats.dirty_pages_rate = int(self._period_dirty * 1000 // elapsed_ms)
            self._period_start = now
            self._period_dirty = 0
            self._period_xfer = self.stats.transferred
        self._on_sync(self.stats.dirty_sync_count)

    def iterate(self, f: QEMUFileOut) -> bool:
        """One PART body: send dirty pages until rate-limited, 50 ms, or none left.

        Returns True when nothing was left to send.
        """
        deadline = time.monotonic() + ITERATION_MAX_SECONDS
        done = False
        while not f.rate_limited():
            if not self._send_batch(f):
                done = True
                break
            if time.monotonic() > deadline:
                break
        f.put(wire_ram.eos())
        self.stats.account(EOS_SIZE, self._phase())
        return done

    def complete(self, f: QEMUFileOut) -> None:
        """END body with the VM stopped: final sync, every remaining page, EOS."""
        self.sync()
        while self._send_batch(f):
            pass
        f.put(wire_ram.eos())

    def cleanup(self) -> None:
        """Migration over (any outcome): dirty logging is no longer needed."""
        for block in self.blocks:
            block.dirty.stop(DIRTY_CLIENT)
        self.accel.dirty_log_stop()

    def _send_batch(self, f: QEMUFileOut) -> bool:
        found = self._next_batch()
        if found is None:
            return False
        block, pages = found
        records, counts = wire_ram.encode_pages(block.idstr, block.pages, pages, self._channel)
        f.put(records)
        stats = self.stats
        stats.duplicate += counts.zero_pages
        stats.normal += counts.normal_pages
        stats.remaining_pages -= len(pages)
        stats.account(counts.bytes, self._phase())
        return True

    def _next_batch(self) -> tuple[RAMBlock, np.ndarray] | None:
        """Next run of dirty pages from the cursor, cleared from the bitmap."""
        if self.stats.remaining_pages <= 0:
            return None
        nblocks = len(self.blocks)
        # Two rounds over all blocks at most: the cursor may start mid-block.
        for _ in range(2 * nblocks + 1):
            block = self.blocks[self._cursor_block]
            bitmap = self.bitmaps[self._cursor_block]
            while self._cursor_page < block.npages:
                start = self._cursor_page
                window = bitmap[start : start + SCAN_PAGES]
                hits = np.flatnonzero(window)
                if hits.size:
                    pages = hits[:BATCH_PAGES] + start
                    bitmap[pages] = False
                    self._cursor_page = int(pages[-1]) + 1
                    return block, pages
                self._cursor_page = start + window.size
            self._cursor_block = (self._cursor_block + 1) % nblocks
            self._cursor_page = 0
            if self._cursor_block == 0:
                self.on_round_complete()
        return None

    def on_round_complete(self) -> None:
        """The scan wrapped past the last block (QEMU enables XBZRLE from here on)."""


class RamLoader:
    """Destination side: applies decoded RAM records to guest memory.

    It remembers which pages are known to be zero (never backed, or zeroed
    by this migration) so a zero page costs nothing there: reading a page to
    test it would allocate it, and most of a fresh guest's pages are zero.
    The guest of an incoming VM has not run, so nothing else writes its RAM.
    """

    def __init__(self, blocks: list[RAMBlock]) -> None:
        self.blocks = {b.idstr: b for b in blocks}
        self.known_zero = {b.idstr: b.unbacked_pages() for b in blocks}

    def known_blocks(self) -> dict[str, int]:
        return {name: b.size for name, b in self.blocks.items()}

    def load_pages(self, event: "wire_ram.RamPages") -> None:
        self.blocks[event.block].write_pages(event.pages, event.data)
        self.known_zero[event.block][event.pages] = False

    def load_zero_pages(self, event: "wire_ram.RamZeroPages") -> None:
        block = self.blocks[event.block]
        known = self.known_zero[event.block]
        pages = event.pages
        if event.fill.any():
            block.pages[pages] = event.fill[:, None]
            known[pages] = event.fill == 0
        else:
            block.pages[pages[~known[pages]]] = 0
            known[pages] = True
