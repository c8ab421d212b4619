"""qcow2 L1 and L2 entries as whole numpy arrays: validation, kinds, references, runs.

Pure functions over uint64 arrays, after docs/interop/qcow2.txt ("Cluster mapping",
"Compressed Clusters Descriptor"); the kinds are QEMU's QCow2ClusterType (block/qcow2.h).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from vmigrate.block.qcow2_refcount import OFFSET_MASK

COPIED = np.uint64(1 << 63)
COMPRESSED = np.uint64(1 << 62)
ZERO = np.uint64(1)
OFFSET = np.uint64(OFFSET_MASK)
#: Bits an L1 entry / a standard L2 entry must leave clear.
L1_RESERVED = np.uint64(~(OFFSET_MASK | (1 << 63)) & (2**64 - 1))
L2_RESERVED = np.uint64(0x3F000000000001FE)

UNALLOCATED, ZERO_PLAIN, ZERO_ALLOC, NORMAL, COMPRESSED_KIND = range(5)


@dataclass(frozen=True)
class EntryFormat:
    """How entries decode for one image: its cluster size and whether bit 0 means zero."""

    cluster_bits: int
    zero_flag: bool

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def csize_shift(self) -> int:
        return 62 - (self.cluster_bits - 8)

    def l1_problem(self, l1: np.ndarray, file_size: int) -> str | None:
        """Why an L1 table is unusable (reserved bits, L2 offsets misaligned or past EOF)."""
        bad = np.flatnonzero(l1 & L1_RESERVED)
        if bad.size:
            return f"entry {bad[0]} (0x{int(l1[bad[0]]):x}) has reserved bits set"
        offs = l1 & OFFSET
        bad = np.flatnonzero(offs & np.uint64(self.cluster_size - 1))
        if bad.size:
            return f"L2 table offset 0x{int(offs[bad[0]]):x} not cluster aligned"
        bad = np.flatnonzero((offs != 0)
                             & (offs + np.uint64(self.cluster_size) > np.uint64(file_size)))
        if bad.size:
            return f"L2 table offset 0x{int(offs[bad[0]]):x} beyond the end of the file"
        return None

    def l2_problem(self, table: np.ndarray, file_size: int) -> str | None:
        """Why an L2 table is unusable (reserved bits, data offsets misaligned or past EOF)."""
        std = (table & COMPRESSED) == 0
        host = table & OFFSET
        bad = np.flatnonzero(std & ((table & L2_RESERVED) != 0))
        if bad.size:
            return f"entry {bad[0]} (0x{int(table[bad[0]]):x}) has reserved bits set"
        bad = np.flatnonzero(std & ((host & np.uint64(self.cluster_size - 1)) != 0))
        if bad.size:
            return f"data cluster offset 0x{int(host[bad[0]]):x} not cluster aligned"
        start = np.where(std, host, table & np.uint64((1 << self.csize_shift) - 1))
        bad = np.flatnonzero((start != 0) & (start >= np.uint64(file_size)))
        if bad.size:
            return f"data cluster offset 0x{int(start[bad[0]]):x} beyond the end of the file"
        return None

    def kinds(self, entries: np.ndarray) -> np.ndarray:
        """The kind of each entry (int8 array of UNALLOCATED .. COMPRESSED_KIND)."""
        host = (entries & OFFSET) != 0
        kinds = np.full(entries.shape, UNALLOCATED, np.int8)
        kinds[host] = NORMAL
        if self.zero_flag:
            zero = (entries & ZERO) != 0
            kinds[zero] = ZERO_PLAIN
            kinds[zero & host] = ZERO_ALLOC
        kinds[(entries & COMPRESSED) != 0] = COMPRESSED_KIND
        return kinds

    def compressed_extent(self, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Host byte offsets and lengths of compressed data: the sectors it spans, from its
        offset to the end of the last one."""
        start = (entries & np.uint64((1 << self.csize_shift) - 1)).astype(np.int64)
        mask = (1 << (self.cluster_bits - 8)) - 1
        sectors = ((entries >> np.uint64(self.csize_shift)).astype(np.int64) & mask) + 1
        return start, sectors * 512 - (start & 511)

    def referenced_clusters(self, entries: np.ndarray) -> np.ndarray:
        """Host cluster indexes the entries hold references to, once per entry; compressed
        data counts every cluster it touches (as qemu-img check counts)."""
        comp = (entries & COMPRESSED) != 0
        plain = entries[~comp] & OFFSET
        plain = (plain[plain != 0] >> np.uint64(self.cluster_bits)).astype(np.int64)
        if not comp.any():
            return plain
        start, length = self.compressed_extent(entries[comp])
        first = start >> self.cluster_bits
        last = (start + length - 1) >> self.cluster_bits
        spans = [first + k for k in range(int((last - first).max()) + 1)]
        return np.concatenate([plain] + [s[s <= last] for s in spans])

    def runs(self, kinds: np.ndarray, host: np.ndarray) -> list[tuple[int, int]]:
        """[start, stop) runs of entries of one kind, NORMAL ones contiguous on the host,
        compressed ones alone: each run is one pread or pwrite."""
        n = len(kinds)
        brk = np.ones(n, bool)
        if n > 1:
            brk[1:] = ((kinds[1:] != kinds[:-1]) | (kinds[1:] == COMPRESSED_KIND)
                       | ((kinds[1:] == NORMAL)
                          & (host[1:] != host[:-1] + np.uint64(self.cluster_size))))
        starts = np.flatnonzero(brk).tolist()
        return list(zip(starts, starts[1:] + [n]))

    def with_copied(self, table: np.ndarray,
                    refcounts: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """The entries with COPIED set exactly where the host cluster's refcount is 1; never
        on compressed or unallocated entries (qemu-img check's OFLAG_COPIED rule)."""
        host = table & OFFSET
        idx = np.flatnonzero(((table & COMPRESSED) == 0) & (host != 0))
        want = np.zeros(table.shape, bool)
        if idx.size:
            want[idx] = refcounts((host[idx] >> np.uint64(self.cluster_bits))
                                  .astype(np.int64)) == 1
        return np.where(want, table | COPIED, table & ~COPIED)
