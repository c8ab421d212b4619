"""qcow2 reference counts: the refcount table, cached refcount blocks, cluster allocation.

Structure from docs/interop/qcow2.txt ("Host cluster management"); the way a new refcount
block may describe itself and the table grows by relocation follows what block/qcow2-refcount.c
does (facts only).  Everything is written through at once, refcount increases before anything
references the clusters and decreases after the references are gone, so a crash can only
leak clusters.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from vmigrate.block.qcow2_file import HostFile
from vmigrate.block.qcow2_format import MAX_REFTABLE_BYTES

log = logging.getLogger(__name__)

OFFSET_MASK = 0x00FFFFFFFFFFFE00
_DTYPES = {3: np.dtype(">u1"), 4: np.dtype(">u2"), 5: np.dtype(">u4"), 6: np.dtype(">u8")}
_BLOCK_CACHE = 256
_EMPTY = np.zeros(0, np.int64)


class Refcounts:
    """Refcounts of host clusters (cluster indexes, not byte offsets, throughout)."""

    def __init__(self, file: HostFile, cluster_bits: int, refcount_order: int,
                 table_offset: int, table_clusters: int,
                 on_table_moved: Callable[[int, int], None]) -> None:
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.dtype = _DTYPES[refcount_order]
        #: 64-bit refcounts are capped where int64 arithmetic ends.
        self.max = min((1 << (1 << refcount_order)) - 1, (1 << 63) - 1)
        self.block_bits = cluster_bits + 3 - refcount_order
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self._on_table_moved = on_table_moved
        raw = file.read_meta(table_offset, table_clusters << cluster_bits, "refcount table")
        self.table = np.frombuffer(raw, ">u8").astype(np.uint64)
        bad = np.flatnonzero((self.table & ~np.uint64(OFFSET_MASK))
                             | (self.table & np.uint64(self.cluster_size - 1)))
        if bad.size:
            raise file.corrupt(f"refcount table entry {bad[0]} (0x{int(self.table[bad[0]]):x}) "
                               "invalid or not cluster aligned")
        beyond = np.flatnonzero(self.table + np.uint64(self.cluster_size)
                                > np.uint64(file.size))
        beyond = beyond[self.table[beyond] != 0]
        if beyond.size:
            raise file.corrupt(f"refcount block offset 0x{int(self.table[beyond[0]]):x} "
                               "beyond the end of the file")
        self._blocks: dict[int, np.ndarray] = {}
        self._pending_table = False
        self.free_hint = 0
        #: Called with (first cluster, count) before free clusters are taken: the image
        #: refuses clusters that hold metadata (a refcount of 0 there means damage).
        self.vet: Callable[[int, int], None] = lambda first, count: None

    # -- reading -------------------------------------------------------------------------

    def _block(self, index: int) -> np.ndarray | None:
        """A refcount block's array (cached), None where the table has no block."""
        block = self._blocks.get(index)
        if block is not None:
            return block
        if index >= len(self.table) or not self.table[index]:
            return None
        offset = int(self.table[index])
        raw = self.file.read_meta(offset, self.cluster_size, "refcount block")
        block = np.frombuffer(raw, self.dtype).copy()
        if len(self._blocks) >= _BLOCK_CACHE:
            self._blocks.pop(next(iter(self._blocks)))
        self._blocks[index] = block
        return block

    def get(self, clusters: np.ndarray) -> np.ndarray:
        """Refcounts of the given cluster indexes (any order, repeats allowed)."""
        clusters = np.asarray(clusters, np.int64)
        out = np.zeros(clusters.shape, np.int64)
        order = np.argsort(clusters, kind="stable")
        ordered = clusters[order]
        blocks = ordered >> self.block_bits
        bounds = np.flatnonzero(np.diff(blocks)) + 1
        mask = (1 << self.block_bits) - 1
        for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(ordered)]):
            block = self._block(int(blocks[lo])) if hi > lo else None
            if block is not None:
                out[order[lo:hi]] = block[ordered[lo:hi] & mask]
        return out

    def _range(self, start: int, count: int) -> np.ndarray:
        return self.get(np.arange(start, start + count, dtype=np.int64))

    def _first_free(self, index: int) -> int:
        """The first cluster at or after ``index`` whose refcount is zero."""
        per = 1 << self.block_bits
        while True:
            block = self._block(index >> self.block_bits)
            if block is None:
                return index
            lo = index & (per - 1)
            free = np.flatnonzero(block[lo:] == 0)
            if free.size:
                return index + int(free[0])
            index += per - lo

    def find_free(self, count: int) -> int:
        """The first run of ``count`` free clusters from the allocation hint (first fit)."""
        index = self.free_hint
        while True:
            index = self._first_free(index)
            used = np.flatnonzero(self._range(index, count))
            if not used.size:
                return index
            index += int(used[-1]) + 1

    # -- changing ------------------------------------------------------------------------

    def allocate(self, count: int) -> int:
        """``count`` contiguous clusters, refcount 1 on disk; returns the byte offset."""
        start = self.find_free(count)
        if (start + count) << self.cluster_bits > OFFSET_MASK:
            raise self.file.error("image file would exceed the largest qcow2 offset")
        self.vet(start, count)
        self.free_hint = start + count
        self.change(np.arange(start, start + count, dtype=np.int64), 1)
        return start << self.cluster_bits

    def check(self, clusters: np.ndarray,
              delta: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The distinct clusters, their multiplicities and new refcounts after adding
        ``delta`` per occurrence; raises if a count would leave its range."""
        uniq, counts = np.unique(np.asarray(clusters, np.int64), return_counts=True)
        new = self.get(uniq) + counts * delta
        if (new < 0).any():
            bad = int(uniq[np.flatnonzero(new < 0)[0]])
            raise self.file.corrupt(f"refcount of cluster 0x{bad << self.cluster_bits:x} "
                                    "would drop below zero")
        if (new > self.max).any():
            raise self.file.error(f"refcount would exceed its maximum {self.max}")
        return uniq, counts, new

    def change(self, clusters: np.ndarray, delta: int) -> np.ndarray:
        """Add ``delta`` once per occurrence of each cluster index; returns the freed ones.

        All new values are checked before anything is written: an underflow means the
        metadata is inconsistent, an overflow is refused.
        """
        clusters = np.asarray(clusters, np.int64)
        if not clusters.size:
            return _EMPTY
        uniq, counts, new = self.check(clusters, delta)
        blocks = uniq >> self.block_bits
        bounds = (np.flatnonzero(np.diff(blocks)) + 1).tolist()
        mask = (1 << self.block_bits) - 1
        width = self.dtype.itemsize
        for start, stop in zip([0, *bounds], [*bounds, len(uniq)]):
            b = int(blocks[start])
            block = self._ensure_block(b)
            idx = uniq[start:stop] & mask
            block[idx] = block[idx].astype(np.int64) + counts[start:stop] * delta
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            self.file.write(int(self.table[b]) + lo * width, block[lo:hi].tobytes())
        freed = uniq[new == 0] if delta < 0 else _EMPTY
        if freed.size:
            self.free_hint = min(self.free_hint, int(freed[0]))
        return freed

    def _ensure_block(self, index: int) -> np.ndarray:
        """The refcount block ``index``, created (and the table grown) when missing.

        A new block is placed in the first free cluster; when that cluster falls in the
        range the block itself describes, the block counts itself.
        """
        while True:
            block = self._block(index)
            if block is not None:
                return block
            if index >= len(self.table):
                self._grow_table(index + 1)
                continue
            where = self.find_free(1)
            self.vet(where, 1)
            self.free_hint = where + 1
            block = np.zeros(1 << self.block_bits, self.dtype)
            if where >> self.block_bits == index:
                block[where & ((1 << self.block_bits) - 1)] = 1
            else:
                self.change(np.array([where]), 1)
                if self.table[index]:
                    self.change(np.array([where]), -1)
                    continue
            self.file.write(where << self.cluster_bits, block.tobytes())
            self._set_entry(index, where << self.cluster_bits)
            self._blocks[index] = block
            log.debug("%s: refcount block %d at 0x%x", self.file.name, index,
                      where << self.cluster_bits)

    def _set_entry(self, index: int, offset: int) -> None:
        self.table[index] = offset
        if not self._pending_table:
            self.file.write(self.table_offset + 8 * index,
                            np.array([offset], ">u8").tobytes())

    def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a bigger one at free clusters, covering itself.

        The new table is built in memory, the refcounts of its own clusters set (which may
        create refcount blocks whose entries go to the new table only), then it is written
        and the header switched; the old table is freed last.
        """
        per_cluster = self.cluster_size // 8
        per_block = 1 << self.block_bits
        entries = max(min_entries, len(self.table) + 1)
        while True:
            clusters = -(-entries // per_cluster)
            entries = clusters * per_cluster
            if clusters << self.cluster_bits > MAX_REFTABLE_BYTES:
                raise self.file.error("refcount table would exceed its maximum size")
            start = self.find_free(clusters)
            last = start + clusters + clusters // per_block + 4
            if last >> self.block_bits < entries:
                break
            entries = (last >> self.block_bits) + 1
        self.vet(start, clusters)
        old_offset, old_clusters = self.table_offset, self.table_clusters
        table = np.zeros(entries, np.uint64)
        table[:len(self.table)] = self.table
        self.table = table
        self._pending_table = True
        try:
            self.free_hint = start + clusters
            self.change(np.arange(start, start + clusters, dtype=np.int64), 1)
        finally:
            self._pending_table = False
        offset = start << self.cluster_bits
        self.file.write(offset, self.table.astype(">u8").tobytes())
        self.table_offset, self.table_clusters = offset, clusters
        self._on_table_moved(offset, clusters)
        log.debug("%s: refcount table moved to 0x%x (%d clusters)", self.file.name, offset,
                  clusters)
        first = old_offset >> self.cluster_bits
        self.change(np.arange(first, first + old_clusters, dtype=np.int64), -1)
