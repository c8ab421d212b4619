"""The ``ram`` live section: dirty tracking and page sending (source), page loading (destination).

Source side (QEMU's ram.c): a migration bitmap per block starts all-dirty;
each sync ORs the vCPU dirty log into it.  Pages are sent in batches found
with one ``flatnonzero`` over a bitmap window and encoded by the vectorised
wire encoder, so the per-page work happens inside numpy and the socket
call, never in a Python loop.  A batch goes out, in the precedence of
QEMU's ram_save_target_page, to the compression threads, as ZERO records,
to the multifd channels, as XBZRLE deltas (:mod:`.xbzrle`) or as PAGE
records; the destination applies whole runs of each kind.

With ``x-ignore-shared`` a block mapped from a shared file is ignored
(QEMU's ramblock_is_ignored, migration/ram.c): it is listed in the setup
record with its guest physical address but has no bitmap, is never synced
nor sent, and counts in no RAM total but the listed one; the destination
maps the same file, so its memory already holds the pages
(docs/qemu/ram.md §1.1).

A background snapshot (docs/background-snapshot.md) uses no dirty log: the
all-dirty bitmap is sent once, pages the guest writes to are queued in
front of the scan, and each saved range loses its write protection once the
stream holding its old content is flushed.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from vmigrate.machine.memory import PAGE_SIZE, RAMBlock, page_runs
from vmigrate.machine.vcpus import VcpuBackend
from vmigrate.migration.compress import ChunkOutput, CompressSender, inflate_pages
from vmigrate.migration.compress_worker import compress_sender, decompress_pool
from vmigrate.migration.multifd import MultifdReceiver
from vmigrate.migration.multifd_worker import multifd_receiver
from vmigrate.migration.postcopy import MAX_DISCARDS_PER_COMMAND, PageRequests, discard_ranges
from vmigrate.migration.postcopy_incoming import PostcopyIncoming
from vmigrate.migration.qemu_file import QEMUFileOut
from vmigrate.migration.config import MigrationConfig
from vmigrate.migration.savevm import LoadContext, LoadError, SaveContext
from vmigrate.migration.stats import PeriodRates
from vmigrate.migration.wire import ram as wire_ram
from vmigrate.migration.wire import stream
from vmigrate.migration.wire import xbzrle as wire_xbzrle
from vmigrate.migration.wire.errors import WireError
from vmigrate.migration.xbzrle import XbzrleSender
from vmigrate.trace import trace

#: Pages per encoded batch: big enough to amortise Python, small enough for the rate limiter.
BATCH_PAGES = 1024
#: Bitmap entries examined per scan step.
SCAN_PAGES = 1 << 16
#: QEMU stops an iteration after 50 ms so the loop can re-check limits and convergence.
ITERATION_MAX_SECONDS = 0.05
#: Background batches in postcopy are small, so a page request waits behind at most 256 KiB.
#: A background snapshot's blocked guest write waits the same way.
POSTCOPY_BATCH_PAGES = 64
#: A write fault saves this many pages from the faulting one: a guest writing a run of
#: pages blocks once per run, not once per page (QEMU saves the one host page).
FAULT_PAGES = 64
EOS_SIZE = 8
DIRTY_CLIENT = "migration"


def ramblock_is_ignored(block: RAMBlock, config: MigrationConfig) -> bool:
    """QEMU's ramblock_is_ignored: with ``x-ignore-shared``, a shared block is not migrated
    (every vmigrate block is migratable)."""
    return config.caps.x_ignore_shared and block.shared


def migrated_blocks(blocks: list[RAMBlock], config: MigrationConfig) -> list[RAMBlock]:
    """The blocks whose pages a migration sends (QEMU's RAMBLOCK_FOREACH_NOT_IGNORED)."""
    return [b for b in blocks if not ramblock_is_ignored(b, config)]


class RamSaver:
    """The source side of one attempt (QEMU's RAMState): migration bitmaps, cursor, page senders."""

    def __init__(self, blocks: list[RAMBlock], dirty_log: VcpuBackend, ctx: SaveContext) -> None:
        """``ctx.config`` switches on XBZRLE and compression (their counters are the
        context's ``*_stats`` objects, which outlive this saver); ``ctx.multifd``
        routes non-zero pages to the multifd channels.  ``blocks`` are all of them; only
        those not ignored get a bitmap and pages."""
        self.ctx = ctx
        self.config = ctx.config
        #: Every block, as the setup record lists them (QEMU's RAMBLOCK_FOREACH_MIGRATABLE).
        self.listed = blocks
        self.blocks = migrated_blocks(blocks, self.config)
        self.xbzrle_stats = ctx.xbzrle_stats
        self.compression_stats = ctx.compression_stats
        self.multifd = ctx.multifd
        self.xbzrle: XbzrleSender | None = None
        #: Set when the first full round is done (the XBZRLE start rule of docs/qemu/ram.md §4).
        self.xbzrle_active = False
        self.compress: CompressSender | None = None
        #: Completion with the VM stopped: the XBZRLE cache is no longer updated.
        self.last_stage = False
        #: Pages emitted by the page loop (QEMU's target_page_count, for the period rates).
        self.target_pages = 0
        self._rates = PeriodRates()
        self._wrapped = False
        #: The first copy of RAM is out: every page was sent once (the cursor went round, or none was left).
        self.bulk_done = False
        self.dirty_log = dirty_log
        self.stats = ctx.stats
        self._phase = ctx.phase
        self.bitmaps = [np.zeros(b.npages, dtype=np.bool_) for b in blocks]
        self._cursor_block = 0
        self._cursor_page = 0
        self._channel = wire_ram.ChannelState()
        self._period_start = 0.0
        self._period_dirty = 0
        self._period_xfer = 0
        #: After the switch to postcopy: plain pages only, page requests first.
        self.in_postcopy = False
        #: The postcopy-preempt channel's own "last block", and whether it sent last.
        self._preempt_channel = wire_ram.ChannelState()
        self._on_preempt = False
        self._logging = False

    def remaining_bytes(self) -> int:
        return self.stats.remaining_pages * PAGE_SIZE

    def setup(self) -> None:
        """START body: the block list; then every page dirty and the first sync (pass 1)."""
        f = self.ctx.file
        caps, params = self.config.caps, self.config.params
        if caps.xbzrle:
            self.xbzrle = XbzrleSender(params.xbzrle_cache_size, self.xbzrle_stats, self.blocks)
        if caps.compress:
            self.compress = compress_sender(params.compress_threads, params.compress_level,
                                            params.compress_wait_thread, self.compression_stats,
                                            self._write_compressed, self.blocks)
        gpa = caps.x_ignore_shared
        f.put(wire_ram.mem_size([wire_ram.RamBlockInfo(b.idstr, b.size, gpa=b.gpa if gpa else None)
                                 for b in self.listed]))
        for block, bitmap in zip(self.blocks, self.bitmaps):
            bitmap[:] = True
        self.stats.remaining_pages = sum(b.npages for b in self.blocks)
        if self.ctx.write_tracking is None:
            self._dirty_log_start()
        f.put(wire_ram.eos())

    def _dirty_log_start(self) -> None:
        """Dirty logging and the first sync (pass 1); a background snapshot has neither (QEMU's ram_init_bitmaps)."""
        self._logging = True
        for block in self.blocks:
            block.dirty.start(DIRTY_CLIENT)
        self.dirty_log.dirty_log_start()
        self._period_start = time.monotonic()
        self.sync()
        if self.multifd is not None:
            self.multifd.sync()

    def sync(self) -> None:
        """Pull the dirty log into the migration bitmap (one 'pass')."""
        self.dirty_log.dirty_log_sync()
        fresh = 0
        for block, bitmap in zip(self.blocks, self.bitmaps):
            fresh += block.dirty.collect_into(DIRTY_CLIENT, bitmap)
        self.stats.remaining_pages += fresh
        self.stats.dirty_sync_count += 1
        self._period_dirty += fresh
        now = time.monotonic()
        if now > self._period_start + 1.0:
            elapsed_ms = (now - self._period_start) * 1000
            self.ctx.on_period(self._period_dirty * PAGE_SIZE, self.stats.transferred - self._period_xfer)
            self.stats.dirty_pages_rate = int(self._period_dirty * 1000 // elapsed_ms)
            self._rates.update(self.target_pages, self.xbzrle_stats if self.xbzrle is not None else None,
                               self.compression_stats if self.compress is not None else None)
            self._period_start = now
            self._period_dirty = 0
            self._period_xfer = self.stats.transferred
        trace("migration_bitmap_sync_end", dirty_pages=fresh)
        self.ctx.on_sync(self.stats.dirty_sync_count)

    def iterate(self) -> bool:
        """One PART body: send dirty pages until rate-limited, 50 ms, or none left.

        Returns True when nothing was left to send.
        """
        f = self.ctx.file
        requests = self.ctx.page_requests
        tracking = self.ctx.write_tracking
        deadline = time.monotonic() + ITERATION_MAX_SECONDS
        batch = POSTCOPY_BATCH_PAGES if self.in_postcopy or tracking is not None else BATCH_PAGES
        done = False
        while not f.rate_limited() or (requests is not None and requests.pending()):
            if tracking is not None:
                for block, page in tracking.faults():
                    requests.put(block.idstr, page * PAGE_SIZE, FAULT_PAGES * PAGE_SIZE)
            if requests is not None and self._serve_requests(f, requests):
                continue
            if not self._send_batch(f, self.ctx.limiter.pages_left(PAGE_SIZE, batch)):
                done = True
                break
            if time.monotonic() > deadline:
                break
        if self.compress is not None and self.config.caps.postcopy_ram:
            # The switch to postcopy may follow any PART: no compressed page may be left
            # to come out after this section's end.
            self.compress.flush()
        if self.multifd is not None:
            self.multifd.sync()
        f.put(wire_ram.eos())
        self.stats.account(EOS_SIZE, self._phase())
        return done

    def empty_part(self) -> bool:
        """A PART body with no pages: EOS only."""
        self.ctx.file.put(wire_ram.eos())
        self.stats.account(EOS_SIZE, self._phase())
        return False

    def complete(self) -> None:
        """END body with the VM stopped: final sync, every remaining page, EOS."""
        f = self.ctx.file
        self.last_stage = True
        self.sync()
        while self._send_batch(f):
            pass
        if self.compress is not None:
            self.compress.flush()
        if self.multifd is not None:
            self.multifd.sync()
        f.put(wire_ram.eos())

    def postcopy_switch(self) -> None:
        """The guest stopped for postcopy: a last sync, then a discard of every page still dirty.

        Those are the pages re-dirtied since they were sent and the pages
        never sent; the destination drops them so that they fault and are
        asked for (docs/qemu/postcopy.md §3 step 4).  The next record names
        its block again, as after any reset of QEMU's "last sent block".
        """
        f = self.ctx.file
        self.sync()
        self.in_postcopy = True
        for block, bitmap in zip(self.blocks, self.bitmaps):
            ranges = discard_ranges(bitmap)
            for i in range(0, len(ranges), MAX_DISCARDS_PER_COMMAND):
                f.put(stream.postcopy_ram_discard(block.idstr, ranges[i:i + MAX_DISCARDS_PER_COMMAND]))
            if self.config.caps.release_ram:
                # What was sent and stayed clean is the destination's already.
                for start, length in discard_ranges(~bitmap):
                    block.discard(start, length)
        self._channel = wire_ram.ChannelState()

    def postcopy_resume(self, received: dict[str, np.ndarray]) -> None:
        """After a recovery every page the destination lacks is dirty again (docs/qemu/postcopy.md §7.2).

        Queued requests are dropped: the destination sends its outstanding
        ones again, and the next record names its block.
        """
        remaining = 0
        for block, bitmap in zip(self.blocks, self.bitmaps):
            got = received.get(block.idstr)
            if got is not None:
                np.logical_not(got[:block.npages], out=bitmap)
            remaining += int(np.count_nonzero(bitmap))
        self.stats.remaining_pages = remaining
        self._channel = wire_ram.ChannelState()
        self._preempt_channel = wire_ram.ChannelState()
        self._on_preempt = False
        if self.ctx.page_requests is not None:
            self.ctx.page_requests.clear()

    def _release(self, block: RAMBlock, pages: np.ndarray) -> None:
        """``release-ram``: in postcopy a page is the destination's once encoded (the records are
        a copy), so the source frees it at once (docs/qemu/postcopy.md §9)."""
        if self.in_postcopy and self.config.caps.release_ram:
            for first, count in page_runs(pages):
                block.discard(first * PAGE_SIZE, count * PAGE_SIZE)

    def complete_postcopy(self) -> None:
        """END body of a postcopy migration: whatever is still dirty (nothing, normally), EOS;
        the preempt channel ends with an EOS of its own."""
        f = self.ctx.file
        while self._send_batch(f):
            pass
        f.put(wire_ram.eos())
        preempt = self.ctx.preempt
        if preempt is not None:
            preempt.put(wire_ram.eos())
            preempt.flush()

    def _serve_requests(self, f: QEMUFileOut, requests: PageRequests) -> bool:
        """Send the next requested pages that are still dirty; the scan goes on from there.

        Returns False when no request was queued.  A requested page that is
        no longer dirty was already sent: the destination has it or will
        have it soon, so nothing is sent twice (docs/qemu/postcopy.md §5).
        """
        request = requests.take()
        if request is None:
            return False
        index = next((i for i, b in enumerate(self.blocks) if b.idstr == request.block), None)
        if index is None:
            return True
        block, bitmap = self.blocks[index], self.bitmaps[index]
        window = bitmap[request.first:request.first + request.count]
        pages = np.flatnonzero(window) + request.first
        trace("get_queued_page", block=block.idstr, page=request.first, dirty=int(pages.size))
        if pages.size:
            bitmap[pages] = False
            self.stats.remaining_pages -= len(pages)
            preempt = self.ctx.preempt
            if preempt is None:
                self._send_plain(f, block, pages)
                f.flush()
                self._release_protection(block, request.first, int(pages[-1]) + 1)
            else:
                self._send_preempt(preempt, block, pages)
        self._cursor_block, self._cursor_page = index, request.first + request.count
        return True

    def _send_preempt(self, preempt: QEMUFileOut, block: RAMBlock, pages: np.ndarray) -> None:
        """Requested pages on the postcopy-preempt channel, flushed at once (docs/qemu/postcopy.md §6).

        Each switch of channel resets the "last block" of the one switched
        to, so its first record names the block, as QEMU's sender does.
        """
        if not self._on_preempt:
            trace("postcopy_preempt_switch_channel", channel=1)
            self._preempt_channel.reset()
            self._on_preempt = True
        records, counts = wire_ram.encode_pages(block.idstr, block.pages, pages, self._preempt_channel)
        self._release(block, pages)
        preempt.put(records)
        preempt.flush()
        stats = self.stats
        stats.duplicate += counts.zero_pages
        stats.normal += counts.normal_pages
        stats.account(counts.bytes, self._phase())
        self.target_pages += len(pages)

    def cleanup(self) -> None:
        """Migration over (any outcome): dirty logging is no longer needed, nor the compression threads.

        The multifd channels belong to the attempt, which closes them."""
        if self.compress is not None:
            self.compress.close()
        if self._logging:
            for block in self.blocks:
                block.dirty.stop(DIRTY_CLIENT)
            self.dirty_log.dirty_log_stop()

    def _release_protection(self, block: RAMBlock, first: int, end: int) -> None:
        """Pages [first, end) of *block* are in the flushed stream: a background snapshot lets the
        guest write them again (QEMU's ram_save_release_protection).

        Every page of the range was saved: the ones just sent, and those
        between them, which the bitmap no longer holds because an earlier
        fault or scan saved (and unprotected) them.
        """
        tracking = self.ctx.write_tracking
        if tracking is not None:
            tracking.unprotect(block, first, end - first)

    def _send_batch(self, f: QEMUFileOut, max_pages: int = BATCH_PAGES) -> bool:
        """Send the next batch of dirty pages, choosing their encoding as QEMU's ram_save_target_page.

        In postcopy every page goes out plain.  Before, in order of
        precedence: compression (until XBZRLE starts), zero page, multifd,
        XBZRLE (once active), normal page.
        """
        found = self._next_batch(max_pages)
        if self._wrapped:
            self._wrapped = False
            if self.compress is not None and not self.xbzrle_active:
                self.compress.flush()
            if self.xbzrle is not None:
                self.xbzrle_active = True
        if found is None:
            return False
        block, pages = found
        self.stats.remaining_pages -= len(pages)
        if self.in_postcopy:
            if self._on_preempt:
                trace("postcopy_preempt_switch_channel", channel=0)
                self._channel.reset()
                self._on_preempt = False
            self._send_plain(f, block, pages)
        elif self.compress is not None and not self.xbzrle_active:
            self._send_compressed(f, block, pages)
        elif self.multifd is not None:
            self._send_multifd(f, block, pages)
        elif self.xbzrle_active:
            self._send_xbzrle(f, block, pages)
        else:
            self._send_plain(f, block, pages)
        if self.ctx.write_tracking is not None:
            f.flush()
            self._release_protection(block, int(pages[0]), int(pages[-1]) + 1)
        return True

    def _send_plain(self, f: QEMUFileOut, block: RAMBlock, pages: np.ndarray) -> None:
        records, counts = wire_ram.encode_pages(block.idstr, block.pages, pages, self._channel)
        self._release(block, pages)
        f.put(records)
        stats = self.stats
        stats.duplicate += counts.zero_pages
        stats.normal += counts.normal_pages
        stats.account(counts.bytes, self._phase())
        self.target_pages += len(pages)

    def _send_multifd(self, f: QEMUFileOut, block: RAMBlock, pages: np.ndarray) -> None:
        """Zero pages as ZERO records on the main channel, the others to the multifd channels."""
        nonzero = wire_ram.nonzero_pages(block.pages, pages)
        zero = pages[~nonzero]
        if zero.size:
            records = wire_ram.page_records(block.idstr, zero, None, self._channel)
            f.put(records)
            self.stats.duplicate += len(zero)
            self.stats.account(len(records), self._phase())
        if zero.size < pages.size:
            self.multifd.queue(block, pages[nonzero])
        self.target_pages += len(pages)

    def _send_xbzrle(self, f: QEMUFileOut, block: RAMBlock, pages: np.ndarray) -> None:
        hits = self.xbzrle_stats.pages
        parts, counts = self.xbzrle.send(block, pages, self._channel, self.stats.dirty_sync_count,
                                         self.last_stage)
        for part in parts:
            f.put(part)
        stats = self.stats
        stats.duplicate += counts.zero_pages
        stats.normal += counts.normal_pages
        stats.xbzrle_pages += self.xbzrle_stats.pages - hits
        stats.account(counts.bytes, self._phase())
        self.target_pages += counts.zero_pages + counts.normal_pages + counts.xbzrle_records

    def _send_compressed(self, f: QEMUFileOut, block: RAMBlock, pages: np.ndarray) -> None:
        """The first page after a block switch goes out plain (so compressed records always
        CONTINUE); the rest to the compression threads, or plain if they are busy."""
        if self._channel.last_block != block.idstr:
            self.compress.flush()
            self._send_plain(f, block, pages[:1])
            pages = pages[1:]
        if pages.size:
            busy = self.compress.submit(block, pages)
            self.target_pages += len(pages) - len(busy)
            if busy.size:
                self._send_plain(f, block, busy)

    def _write_compressed(self, output: ChunkOutput) -> None:
        """A compression worker's records reach the main channel (QEMU counts them now)."""
        self.ctx.file.put(output.data)
        stats = self.stats
        stats.account(len(output.data), self._phase())
        stats.duplicate += output.zero_pages
        stats.compressed_pages += output.compressed_pages

    def _next_batch(self, max_pages: int) -> tuple[RAMBlock, np.ndarray] | None:
        """Next run of at most *max_pages* dirty pages from the cursor, cleared from the bitmap."""
        if self.stats.remaining_pages <= 0:
            self.bulk_done = True
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
                    pages = hits[:max_pages] + start
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
        """The scan wrapped past the last block: compression is flushed and XBZRLE
        enabled before the next page is sent (docs/qemu/ram.md §3.1)."""
        self._wrapped = True
        self.bulk_done = True


class RamLoader:
    """Destination side: applies decoded RAM records to guest memory.

    It remembers which pages are known to be zero (never backed, or zeroed
    by this migration) so a zero page costs nothing there: reading a page to
    test it would allocate it, and most of a fresh guest's pages are zero.
    The guest of an incoming VM has not run, so nothing else writes its RAM;
    a snapshot-load's has (``ram_fresh``).
    """

    def __init__(self, blocks: list[RAMBlock], decompress_threads: int = 0,
                 postcopy: PostcopyIncoming | None = None, ignore_shared: bool = False,
                 ram_fresh: bool = True, colo_received: dict[str, np.ndarray] | None = None) -> None:
        """*colo_received* (a COLO secondary's checkpoints) gets every page loaded marked, by block.
        ``decompress_threads`` > 0 accepts compressed pages (the ``compress`` capability);
        with *postcopy*, pages are recorded as received, and placed through it once it listens.
        With *ignore_shared* (``x-ignore-shared``) the shared blocks receive nothing: their
        contents are the file's, kept as they are (no zeroing, no prefault, not even a scan
        for holes).  Without *ram_fresh* (the guest ran, as before a snapshot-load) only a RAM
        file's holes are known zero: anonymous memory may hold anything."""
        self.blocks = {b.idstr: b for b in blocks}
        self.postcopy = postcopy
        self.ignore_shared = ignore_shared
        #: Blocks whose pages the source does not send (QEMU's ramblock_is_ignored).
        self.ignored = frozenset(b.idstr for b in blocks if ignore_shared and b.shared)
        self.known_zero = {b.idstr: b.unbacked_pages() if ram_fresh or b.mem_path is not None
                           else np.zeros(b.npages, dtype=np.bool_)
                           for b in blocks if b.idstr not in self.ignored}
        self.decompress = decompress_pool(decompress_threads, blocks) if decompress_threads else None
        #: The multifd channels' receiver, once they are all connected.
        self.multifd: MultifdReceiver | None = None
        self.colo_received = colo_received

    def pages_written(self, block: str, pages: np.ndarray) -> None:
        """Pages got data from elsewhere (multifd channels): no longer known to be zero."""
        self._received(block, pages)
        self.known_zero[block][pages] = False

    def _received(self, block: str, pages: np.ndarray) -> None:
        if self.postcopy is not None:
            self.postcopy.mark_received(block, pages)
        if self.colo_received is not None:
            self.colo_received[block][pages] = True

    def load_xbzrle(self, event: "wire_ram.RamXbzrleRun") -> None:
        """Deltas onto the pages' current contents (the destination keeps no cache)."""
        if self.postcopy is not None and self.postcopy.placing:
            # A delta needs the page's old contents, which a postcopy destination lacks.
            raise LoadError("XBZRLE page received in postcopy")
        self._received(event.block, event.pages)
        block = self.blocks[event.block]
        wire_xbzrle.decode_into(block.bytes, event.offsets, event.buf, event.starts, event.lengths)
        self.known_zero[event.block][event.pages] = False

    def load_compressed(self, event: "wire_ram.RamCompressedRun") -> None:
        if self.decompress is None:
            raise WireError("Received an unexpected compressed page")
        if self.postcopy is not None and self.postcopy.placing:
            self.postcopy.place_pages(event.block, event.pages,
                                      inflate_pages(event.buf, event.starts, event.lengths))
            return
        self._received(event.block, event.pages)
        self.decompress.load(self.blocks[event.block], event.offsets, event.buf, event.starts, event.lengths)
        self.known_zero[event.block][event.pages] = False

    def end_of_section(self) -> None:
        """A RAM EOS: every multifd channel must have delivered its pages up to its SYNC."""
        if self.multifd is not None:
            self.multifd.sync_main()
            self.multifd.apply_staged()

    def close(self) -> None:
        """The load is over: decompression, multifd and prefault threads end (the next load starts its own)."""
        if self.decompress is not None:
            self.decompress.close()
        if self.multifd is not None:
            self.multifd.close()
        for block in self.blocks.values():
            block.end_incoming()

    def known_blocks(self) -> dict[str, int]:
        return {name: b.size for name, b in self.blocks.items()}

    def check_block_list(self, event: "wire_ram.RamMemSize") -> None:
        """The setup record's block list against the local blocks (names and sizes were checked
        by the decoder).

        With ``x-ignore-shared`` each entry carries the source block's guest physical address,
        which must be the local one for an ignored block, as QEMU's ram_load_precopy requires
        (migration/ram.c, its text).  A local block that is not shared is refused as well:
        QEMU 7.2 accepts it and runs the guest on memory the source never sent (a vmigrate
        block is shared exactly when it comes from ``--mem-path``; docs/qemu/ram.md §1.1).
        """
        if not self.ignore_shared:
            return
        for info in event.blocks:
            block = self.blocks[info.idstr]
            if not block.shared:
                raise LoadError(f"Block {info.idstr} is not shared here: x-ignore-shared needs the "
                                f"destination to map the source's RAM file (--mem-path)")
            if info.gpa != block.gpa:
                raise LoadError(f"Mismatched GPAs for block {info.idstr} {info.gpa}!= {block.gpa}")

    def load_pages(self, event: "wire_ram.RamPages") -> None:
        if self.postcopy is not None and self.postcopy.placing:
            self.postcopy.place_pages(event.block, event.pages, event.data)
            return
        self._received(event.block, event.pages)
        self.blocks[event.block].write_pages(event.pages, event.data)
        self.known_zero[event.block][event.pages] = False

    def load_zero_pages(self, event: "wire_ram.RamZeroPages") -> None:
        if self.postcopy is not None and self.postcopy.placing:
            self.postcopy.place_zero_pages(event.block, event.pages, event.fill)
            return
        self._received(event.block, event.pages)
        block = self.blocks[event.block]
        known = self.known_zero[event.block]
        pages = event.pages
        if event.fill.any():
            block.pages[pages] = event.fill[:, None]
            known[pages] = event.fill == 0
        else:
            block.pages[pages[~known[pages]]] = 0
            known[pages] = True


class RamSection:
    """The ``ram`` entry of the section registry (QEMU's savevm_ram_handlers).

    Long-lived, like the registration; each attempt gets a fresh
    :class:`RamSaver` or :class:`RamLoader` in its setup, dropped in its
    cleanup.
    """

    idstr = "ram"
    instance_id = 0
    section_id = 2
    version_id = 4

    def __init__(self, blocks: list[RAMBlock], vcpus: VcpuBackend,
                 block_bulk_active: Callable[[], bool] = lambda: False) -> None:
        """*block_bulk_active* says whether block migration is in its bulk phase, during which
        RAM sends nothing (ram_save_iterate asks blk_mig_bulk_active)."""
        self.blocks = blocks
        self.vcpus = vcpus
        self.block_bulk_active = block_bulk_active
        self._saver: RamSaver | None = None
        self._loader: RamLoader | None = None
        self._load_ctx: LoadContext | None = None
        #: The multifd receiver a COLO secondary's checkpoints take over from the first load.
        self._colo_multifd: MultifdReceiver | None = None

    # -- save -------------------------------------------------------------------------

    def is_active(self, config: MigrationConfig) -> bool:
        return True

    def is_active_iterate(self, ctx: SaveContext) -> bool:
        return True

    def save_setup(self, ctx: SaveContext) -> None:
        self._saver = RamSaver(self.blocks, self.vcpus, ctx)
        self._saver.setup()

    def save_iterate(self, ctx: SaveContext) -> bool:
        if self.block_bulk_active():
            # Pages sent now would be dirtied again long before the disks' first copy is out.
            return self._saver.empty_part()
        return self._saver.iterate()

    def pending_estimate(self) -> int:
        return self._saver.remaining_bytes()

    def pending_exact(self) -> int:
        """QEMU's ram_save_pending below the threshold: sync the dirty log first."""
        self._saver.sync()
        return self._saver.remaining_bytes()

    @property
    def first_copy_done(self) -> bool:
        return self._saver.bulk_done

    def save_complete(self, ctx: SaveContext) -> None:
        self._saver.complete()

    #: RAM goes on in postcopy (QEMU's has_postcopy).
    supports_postcopy = True

    def save_postcopy_switch(self, ctx: SaveContext) -> None:
        self._saver.postcopy_switch()

    def save_complete_postcopy(self, ctx: SaveContext) -> None:
        self._saver.complete_postcopy()

    def save_postcopy_resume(self, ctx: SaveContext, received: dict[str, np.ndarray]) -> None:
        self._saver.postcopy_resume(received)

    def save_cleanup(self) -> None:
        saver, self._saver = self._saver, None
        if saver is not None:
            saver.cleanup()

    # -- load -------------------------------------------------------------------------

    def load_setup(self, ctx: LoadContext) -> wire_ram.RamBodyDecoder:
        caps, params = ctx.config.caps, ctx.config.params
        loader = self._loader = RamLoader(self.blocks, params.decompress_threads if caps.compress else 0,
                                          ctx.postcopy, caps.x_ignore_shared, ctx.ram_fresh, ctx.colo_received)
        self._load_ctx = ctx
        if caps.multifd:
            receiver, self._colo_multifd = self._colo_multifd, None
            if receiver is not None:
                # COLO's checkpoints, on the first load's channels; each one's pages wait for
                # its RAM EOS, which the secondary applies only once the checkpoint is whole.
                receiver.on_pages = loader.pages_written
                receiver.stage()
            elif not ctx.multifd_channels:
                raise LoadError("multifd is not supported by current protocol")
            else:
                receiver = multifd_receiver(ctx.multifd_channels, params.multifd_compression,
                                            [b for b in self.blocks if b.idstr not in loader.ignored],
                                            loader.pages_written, ctx.abort)
            loader.multifd = receiver
        return wire_ram.RamBodyDecoder(loader.known_blocks(), accept_compressed=caps.compress, variable_runs=True,
                                       ignore_shared=caps.x_ignore_shared, ignored_blocks=loader.ignored)

    def load_state(self, event: object) -> None:
        loader = self._loader
        if isinstance(event, wire_ram.RamPages):
            loader.load_pages(event)
        elif isinstance(event, wire_ram.RamZeroPages):
            loader.load_zero_pages(event)
        elif isinstance(event, wire_ram.RamXbzrleRun):
            loader.load_xbzrle(event)
        elif isinstance(event, wire_ram.RamCompressedRun):
            loader.load_compressed(event)
        elif isinstance(event, wire_ram.RamEOS):
            loader.end_of_section()
        elif isinstance(event, wire_ram.RamMemSize):
            loader.check_block_list(event)

    def load_cleanup(self) -> None:
        loader, self._loader = self._loader, None
        if loader is not None:
            if loader.multifd is not None and self._load_ctx.colo:
                # The source's multifd channels stay open for COLO's checkpoints (QEMU 7.2 too).
                self._colo_multifd, loader.multifd = loader.multifd, None
            loader.close()
