"""qcow2 images, versions 2 and 3, written from QEMU's docs/interop/qcow2.txt.

Guest offsets map through the L1 table to L2 tables (cached as numpy arrays) to host
clusters.  Writes allocate at the first free clusters and go through in a crash-safe order
(data and refcount increases first, then L2, then L1, then refcount decreases), so that an
interrupted write leaks clusters at worst.  Internal snapshots share clusters by reference
count; the COPIED flag (bit 63) of L1 and L2 entries says "refcount is exactly 1, write in
place", as block/qcow2-cluster.c and block/qcow2-snapshot.c keep it.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib

import numpy as np

from vmigrate.block.driver import BlockDriver, ImageError, Snapshot, StoredBitmap
from vmigrate.block.qcow2_bitmap import (
    FLAG_AUTO, FLAG_IN_USE, MAX_BITMAPS, MAX_BITS, MAX_DATA_BYTES, MAX_DIRECTORY_BYTES,
    MAX_GRANULARITY_BITS, MAX_NAME_BYTES as MAX_BITMAP_NAME, MAX_TABLE_ENTRIES,
    MIN_GRANULARITY_BITS, TABLE_ALL_ONES, BitmapEntry, BitmapsExtension, check_entry,
    decode_bits, encode_bits, entry_bytes, pack_directory, pack_extension, parse_directory,
    parse_bitmap_table, parse_extension)
from vmigrate.block.qcow2_file import HostFile
from vmigrate.block.qcow2_format import (
    AUTOCLEAR_BITMAPS, COMPAT_LAZY_REFCOUNTS, EXT_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
    MAX_L1_BYTES, MAX_SNAPSHOTS, OFF_AUTOCLEAR, OFF_BACKING, OFF_L1, OFF_REFTABLE, OFF_SIZE,
    OFF_SNAPSHOTS, Header, check_table, cluster_bits_of, extensions_bytes, parse_header)
from vmigrate.block.qcow2_l2 import (
    COMPRESSED_KIND, COPIED, NORMAL, OFFSET, UNALLOCATED, ZERO, EntryFormat)
from vmigrate.block.qcow2_refcount import OFFSET_MASK, Refcounts
from vmigrate.block.qcow2_snapshot import (
    MAX_NAME_BYTES, MAX_TABLE_BYTES, SnapshotEntry, next_id, pack_table, parse_table)

log = logging.getLogger(__name__)

_L2_CACHE = 512


class Qcow2Image(BlockDriver):
    """An open qcow2 image; ``backing`` is set by :func:`vmigrate.block.formats.open_image`."""

    format_name = "qcow2"

    def __init__(self, filename: str, read_only: bool = False) -> None:
        self.filename = filename
        self.read_only = read_only
        self.backing = None
        self.owns_backing = False
        try:
            fd = os.open(filename, os.O_RDONLY if read_only else os.O_RDWR)
        except OSError as err:
            raise ImageError(f"Could not open '{filename}': {err.strerror}") from None
        self.file = HostFile(filename, fd)
        try:
            self._open()
        except BaseException:
            os.close(fd)
            raise

    def _open(self) -> None:
        f = self.file
        cluster = 1 << cluster_bits_of(os.pread(f.fd, 24, 0))
        h = parse_header(os.pread(f.fd, min(cluster, f.size), 0), f.size, self.filename)
        if h.incompatible & INCOMPAT_DIRTY:
            raise f.error("the dirty bit is set (refcounts may be stale); "
                          "run 'qemu-img check -r all' on it first")
        if h.incompatible & INCOMPAT_CORRUPT and not self.read_only:
            raise f.error("image is marked corrupt; it can be opened read-only, "
                          "or repaired with 'qemu-img check -r all'")
        self.header: Header = h
        self.cluster_bits = h.cluster_bits
        self.l2_bits = h.l2_bits
        self._size = h.size
        self.entries = EntryFormat(h.cluster_bits, h.version >= 3)
        self.l1_offset = h.l1_table_offset
        self.l1 = self._load_l1(h.l1_table_offset, h.l1_size, "active L1 table")
        self.refs = Refcounts(f, h.cluster_bits, h.refcount_order, h.refcount_table_offset,
                              h.refcount_table_clusters, self._reftable_moved)
        self._l2_cache: dict[int, np.ndarray] = {}
        self._snapshots: list[SnapshotEntry] = []
        self._snapshot_bytes = 0
        if h.nb_snapshots:
            base = h.snapshots_offset

            def read(pos: int, length: int) -> bytes:
                return f.read_meta(base + pos, length, "snapshot table")
            self._snapshots, self._snapshot_bytes = parse_table(read, h.nb_snapshots, h.size,
                                                                self.filename)
            for sn in self._snapshots:
                if sn.l1_size > MAX_L1_BYTES // 8:
                    raise f.corrupt(f"snapshot '{sn.id}' L1 table too large")
                check_table(self.filename, f"snapshot '{sn.id}' L1 table", sn.l1_table_offset,
                            sn.l1_size * 8, self.cluster_size, f.size)
        self._sn_l1_spans = self._snapshot_l1_spans()
        self._load_bitmap_directory()
        self._check_layout()
        self.refs.vet = self._vet
        self._autoclear_pending = bool(h.autoclear & ~self._autoclear_known)
        if self._bitmaps and not self.read_only:
            self._mark_bitmaps_in_use()

    # -- metadata placement --------------------------------------------------------------

    def _clusters(self, offset: int, length: int) -> tuple[int, int]:
        """[first, end) host cluster indexes of a byte range."""
        return (offset >> self.cluster_bits,
                (offset + length + self.cluster_size - 1) >> self.cluster_bits)

    def _snapshot_l1_spans(self) -> np.ndarray:
        spans = [self._clusters(sn.l1_table_offset, sn.l1_size * 8)
                 for sn in self._snapshots if sn.l1_size]
        return np.array(spans, np.int64).reshape(-1, 2)

    def _fixed_metadata(self) -> list[tuple[int, int, str]]:
        spans = [(0, 1, "the image header"),
                 (*self._clusters(self.l1_offset, len(self.l1) * 8), "the active L1 table"),
                 (*self._clusters(self.refs.table_offset,
                                  self.refs.table_clusters << self.cluster_bits),
                  "the refcount table")]
        if self._snapshot_bytes:
            spans.append((*self._clusters(self.header.snapshots_offset, self._snapshot_bytes),
                          "the snapshot table"))
        if self._bitmap_dir.directory_size:
            spans.append((*self._clusters(self._bitmap_dir.directory_offset,
                                          self._bitmap_dir.directory_size),
                          "the bitmap directory"))
        spans.extend((*self._clusters(e.table_offset, 8 * e.table_size),
                      f"bitmap '{e.name}' table") for e, _ in self._bitmaps)
        return spans

    def _overlap(self, first: int, end: int) -> str | None:
        """Which metadata the host clusters [first, end) hold, if any (what QEMU's
        qcow2_check_metadata_overlap guards in its default "cached" mode)."""
        for a, b, what in self._fixed_metadata():
            if a < end and b > first:
                return what
        spans = self._sn_l1_spans
        if ((spans[:, 0] < end) & (spans[:, 1] > first)).any():
            return "an internal snapshot's L1 table"
        blocks = (self.refs.table >> np.uint64(self.cluster_bits)).astype(np.int64)
        if ((blocks >= first) & (blocks < end) & (blocks != 0)).any():
            return "a refcount block"
        l2 = ((self.l1 & OFFSET) >> np.uint64(self.cluster_bits)).astype(np.int64)
        if ((l2 >= first) & (l2 < end)).any():
            return "an L2 table"
        return None

    def _vet(self, first: int, count: int) -> None:
        """Refuse to write data or new metadata over existing metadata."""
        what = self._overlap(first, first + count)
        if what is not None:
            raise self.file.corrupt(f"refusing to write over {what} at host cluster "
                                    f"0x{first << self.cluster_bits:x}: mappings or refcounts "
                                    "are inconsistent")

    def _check_layout(self) -> None:
        """L2 tables and refcount blocks must not sit on the header or the fixed tables."""
        cb = np.uint64(self.cluster_bits)
        tables = (("L2 table", ((self.l1 & OFFSET) >> cb).astype(np.int64)),
                  ("refcount block", (self.refs.table >> cb).astype(np.int64)))
        for a, b, what in self._fixed_metadata():
            for label, clusters in tables:
                bad = clusters[(clusters >= a) & (clusters < b) & (clusters != 0)]
                if bad.size:
                    raise self.file.corrupt(f"{label} at 0x{int(bad[0]) << self.cluster_bits:x} "
                                            f"overlaps {what}")

    # -- properties ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def supports_snapshots(self) -> bool:
        return True

    @property
    def backing_file(self) -> str | None:
        return self.header.backing_file

    @property
    def backing_format(self) -> str | None:
        return self.header.backing_format

    @property
    def dirty_flag(self) -> bool:
        return bool(self.header.incompatible & INCOMPAT_DIRTY)

    def format_specific(self) -> dict:
        """ImageInfoSpecificQCow2 as qemu-img info / query-block show it."""
        h = self.header
        data: dict = {"compat": "1.1" if h.version >= 3 else "0.10",
                      "compression-type": "zlib"}
        if h.version >= 3:
            data["lazy-refcounts"] = bool(h.compatible & COMPAT_LAZY_REFCOUNTS)
        if self._bitmaps:
            data["bitmaps"] = [
                {"flags": [f for bit, f in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto"))
                           if e.flags & bit],
                 "name": e.name, "granularity": e.granularity} for e, _ in self._bitmaps]
        data["refcount-bits"] = 1 << h.refcount_order
        if h.version >= 3:
            data["corrupt"] = bool(h.incompatible & INCOMPAT_CORRUPT)
            data["extended-l2"] = False
        return {"type": "qcow2", "data": data}

    def actual_size(self) -> int:
        return os.fstat(self.file.fd).st_blocks * 512

    # -- metadata I/O ----------------------------------------------------------------------

    def _load_l1(self, offset: int, count: int, what: str) -> np.ndarray:
        raw = self.file.read_meta(offset, count * 8, what) if count else b""
        l1 = np.frombuffer(raw, ">u8").astype(np.uint64)
        problem = self.entries.l1_problem(l1, self.file.size)
        if problem:
            raise self.file.corrupt(f"{what}: {problem}")
        return l1

    def _l2(self, offset: int) -> np.ndarray:
        """An L2 table (native uint64, cached), validated when read."""
        table = self._l2_cache.get(offset)
        if table is not None:
            return table
        raw = self.file.read_meta(offset, self.cluster_size, "L2 table")
        table = np.frombuffer(raw, ">u8").astype(np.uint64)
        problem = self.entries.l2_problem(table, self.file.size)
        if problem:
            raise self.file.corrupt(f"L2 table at 0x{offset:x}: {problem}")
        self._cache_l2(offset, table)
        return table

    def _cache_l2(self, offset: int, table: np.ndarray) -> None:
        """Write-through cache: evicting is free (oldest first)."""
        if len(self._l2_cache) >= _L2_CACHE:
            self._l2_cache.pop(next(iter(self._l2_cache)))
        self._l2_cache[offset] = table

    def _write_l2(self, offset: int, table: np.ndarray, lo: int, hi: int) -> None:
        self.file.write(offset + 8 * lo, table[lo:hi].astype(">u8").tobytes())

    def _write_l1(self, lo: int, hi: int) -> None:
        self.file.write(self.l1_offset + 8 * lo, self.l1[lo:hi].astype(">u8").tobytes())

    def _write_header(self, offset: int, fmt: str, *values: int) -> None:
        self.file.write(offset, struct.pack(fmt, *values))

    def _reftable_moved(self, offset: int, clusters: int) -> None:
        self._write_header(OFF_REFTABLE, ">QI", offset, clusters)

    def _forget(self, freed: np.ndarray) -> None:
        """Drop cached L2 tables whose clusters were just freed (they may be reused)."""
        for cluster in freed.tolist():
            self._l2_cache.pop(cluster << self.cluster_bits, None)

    def _release(self, clusters: np.ndarray) -> None:
        self._forget(self.refs.change(clusters, -1))

    def _begin_write(self) -> None:
        """Refuse writes we must not do; clear autoclear bits we do not maintain (qcow2.txt:
        a program that does not understand them clears them when it modifies the image).
        Version 3 images keep bit 0: vmigrate maintains their bitmaps."""
        if self.read_only:
            raise ImageError(f"Image '{self.filename}' is read-only")
        if self.file.inconsistent:
            raise self.file.error("refusing to write to an image with inconsistent metadata")
        if self._autoclear_pending:
            self.header.autoclear &= self._autoclear_known
            self._write_header(OFF_AUTOCLEAR, ">Q", self.header.autoclear)
            self._autoclear_pending = False

    def _decompress(self, entry: int) -> bytes:
        """A compressed cluster: raw deflate, 4 KiB window (block/qcow2-threads.c)."""
        starts, lengths = self.entries.compressed_extent(np.array([entry], np.uint64))
        start, length = int(starts[0]), int(lengths[0])
        raw = os.pread(self.file.fd, length, start)
        try:
            out = zlib.decompressobj(-12).decompress(raw, self.cluster_size)
        except zlib.error as err:
            raise self.file.error(f"compressed cluster at 0x{start:x} is damaged: {err}") from None
        if len(out) != self.cluster_size:
            raise self.file.error(f"compressed cluster at 0x{start:x} is damaged (short)")
        return out

    # -- reading ---------------------------------------------------------------------------

    def _backing_into(self, view: memoryview, offset: int) -> None:
        """Bytes of the backing image where there is one (zeroes past its end, and past ours:
        the VM-state area never reads through)."""
        if self.backing is None:
            return
        end = min(self.backing.size, self._size)
        if offset < end:
            n = min(len(view), end - offset)
            view[:n] = self.backing.read(offset, n)

    def _chunks(self, start: int, stop: int):
        """Split [start, stop) per L2 table: (L1 index, guest start, guest stop, first entry,
        end entry)."""
        shift = self.cluster_bits + self.l2_bits
        mask = (1 << self.l2_bits) - 1
        pos = start
        while pos < stop:
            l1_index = pos >> shift
            end = min(stop, (l1_index + 1) << shift)
            yield (l1_index, pos, end, (pos >> self.cluster_bits) & mask,
                   (((end - 1) >> self.cluster_bits) & mask) + 1)
            pos = end

    def _l2_offset(self, l1_index: int) -> int:
        return int(self.l1[l1_index] & OFFSET) if l1_index < len(self.l1) else 0

    def _read_into(self, out: memoryview, offset: int) -> None:
        """Coalesced: one pread per run of host-contiguous clusters."""
        cs = self.cluster_size
        for l1_index, pos, end, first, stop in self._chunks(offset, offset + len(out)):
            view = out[pos - offset:end - offset]
            l2_offset = self._l2_offset(l1_index)
            if not l2_offset:
                self._backing_into(view, pos)
                continue
            entries = self._l2(l2_offset)[first:stop]
            kinds = self.entries.kinds(entries)
            host = entries & OFFSET
            base = (pos >> self.cluster_bits) << self.cluster_bits
            for a, b in self.entries.runs(kinds, host):
                lo, hi = max(pos, base + a * cs), min(end, base + b * cs)
                part = view[lo - pos:hi - pos]
                if kinds[a] == NORMAL:
                    self.file.read_into(part, int(host[a]) + lo - (base + a * cs))
                elif kinds[a] == UNALLOCATED:
                    self._backing_into(part, lo)
                elif kinds[a] == COMPRESSED_KIND:
                    skip = lo - (base + a * cs)
                    part[:] = self._decompress(int(entries[a]))[skip:skip + hi - lo]

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ImageError(f"Request at {offset}+{length} beyond the end of image "
                             f"'{self.filename}' ({self._size} bytes)")

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        return self._read_bytes(offset, length)

    def _read_bytes(self, offset: int, length: int) -> bytes:
        """One pread straight into the ``bytes`` returned when the range is a single run of
        allocated clusters (block migration's chunks, the sequentially written VM state);
        else gathered in a buffer.  The buffer and its copy into ``bytes`` cost as much as the
        read itself at 1 GiB."""
        host = self._host_run(offset, length)
        if host is not None:
            data = self.file.read_data(host, length)
            if len(data) == length:
                return data
        out = bytearray(length)
        self._read_into(memoryview(out), offset)
        return bytes(out)

    def _host_run(self, offset: int, length: int) -> int | None:
        """The host offset of guest range [offset, offset + length) if it is one run of
        host-contiguous allocated clusters under one L2 table, else None."""
        chunks = self._chunks(offset, offset + length)
        l1_index, pos, end, first, stop = next(chunks, (0, 0, 0, 0, 0))
        if end != offset + length or not length:
            return None
        l2_offset = self._l2_offset(l1_index)
        if not l2_offset:
            return None
        entries = self._l2(l2_offset)[first:stop]
        kinds = self.entries.kinds(entries)
        if kinds[0] != NORMAL or len(self.entries.runs(kinds, entries & OFFSET)) != 1:
            return None
        return int(entries[0] & OFFSET) + (offset & (self.cluster_size - 1))

    def allocated(self, offset: int, length: int) -> bool:
        """Any cluster of the range mapped or zero here (QEMU's bdrv_is_allocated)."""
        self._check_range(offset, length)
        for l1_index, _, _, first, stop in self._chunks(offset, offset + length):
            l2_offset = self._l2_offset(l1_index)
            if l2_offset and (self.entries.kinds(self._l2(l2_offset)[first:stop])
                              != UNALLOCATED).any():
                return True
        return False

    # -- writing ---------------------------------------------------------------------------

    def _cluster_content(self, entry: int, guest: int) -> bytearray:
        """What a guest cluster reads as now (for copy-on-write of a partial write)."""
        out = bytearray(self.cluster_size)
        kind = int(self.entries.kinds(np.array([entry], np.uint64))[0])
        if kind == NORMAL:
            self.file.read_into(memoryview(out), entry & OFFSET_MASK)
        elif kind == COMPRESSED_KIND:
            out[:] = self._decompress(entry)
        elif kind == UNALLOCATED:
            self._backing_into(memoryview(out), guest)
        return out

    def _cow_edges(self, entries: np.ndarray, fresh: np.ndarray, base: int, a: int, b: int,
                   lo: int, hi: int) -> tuple[bytes, bytes]:
        """The old bytes around a write of [lo, hi) into new clusters a..b-1 (guest cluster
        ``base`` is entry 0): the parts of its first and last cluster it leaves alone."""
        cs = self.cluster_size
        first, last = base + a * cs, base + (b - 1) * cs
        head = tail = b""
        content = None
        if lo > first and fresh[a]:
            content = self._cluster_content(int(entries[a]), first)
            head = bytes(content[:lo - first])
        if hi < last + cs and fresh[b - 1]:
            if content is None or b - 1 != a:
                content = self._cluster_content(int(entries[b - 1]), last)
            tail = bytes(content[hi - last:])
        return head, tail

    def _ensure_l1(self, entries: int) -> None:
        """Grow the active L1 table (to a fresh place) to hold ``entries``: the VM-state area
        lies beyond the disk's part of it (block/qcow2-cluster.c qcow2_grow_l1_table)."""
        if entries <= len(self.l1):
            return
        if entries > MAX_L1_BYTES // 8:
            raise self.file.error("active L1 table would exceed its maximum size")
        old_offset, old_count = self.l1_offset, len(self.l1)
        clusters = -(-entries * 8 // self.cluster_size)
        offset = self.refs.allocate(clusters)
        l1 = np.zeros(clusters * self.cluster_size // 8, np.uint64)
        l1[:old_count] = self.l1
        self.file.write(offset, l1.astype(">u8").tobytes())
        self._write_header(OFF_L1, ">IQ", entries, offset)
        self.l1, self.l1_offset = l1[:entries].copy(), offset
        if old_count:
            first = old_offset >> self.cluster_bits
            count = -(-old_count * 8 // self.cluster_size)
            self._release(np.arange(first, first + count, dtype=np.int64))

    def _writable_l2(self, l1_index: int) -> tuple[int, np.ndarray]:
        """The L2 table for ``l1_index`` with refcount 1: allocated if missing, copied if
        shared with a snapshot (its data clusters keep their counts: the copy replaces the
        active L1's path to them)."""
        self._ensure_l1(l1_index + 1)
        entry = int(self.l1[l1_index])
        old = entry & OFFSET_MASK
        if old and entry & (1 << 63):
            return old, self._l2(old)
        table = (self.entries.with_copied(self._l2(old), self.refs.get) if old
                 else np.zeros(1 << self.l2_bits, np.uint64))
        offset = self.refs.allocate(1)
        self.file.write(offset, table.astype(">u8").tobytes())
        self._cache_l2(offset, table)
        self.l1[l1_index] = np.uint64(offset) | COPIED
        self._write_l1(l1_index, l1_index + 1)
        if old:
            self._release(np.array([old >> self.cluster_bits]))
        return offset, table

    def _write(self, offset: int, data: memoryview) -> None:
        """Clusters with refcount 1 are written in place, all others get new clusters in one
        contiguous allocation per L2 table; then the L2 entries, then old references drop."""
        cs = self.cluster_size
        for l1_index, pos, end, first, stop in self._chunks(offset, offset + len(data)):
            l2_offset, table = self._writable_l2(l1_index)
            entries = table[first:stop]
            inplace = (self.entries.kinds(entries) == NORMAL) & ((entries & COPIED) != 0)
            fresh = np.flatnonzero(~inplace)
            host = entries & OFFSET
            old = entries[fresh]
            if fresh.size:
                new_base = self.refs.allocate(int(fresh.size))
                host[fresh] = (np.uint64(new_base)
                               + np.arange(fresh.size, dtype=np.uint64) * np.uint64(cs))
            base = (pos >> self.cluster_bits) << self.cluster_bits
            for a, b in self.entries.runs(np.full(len(entries), NORMAL, np.int8), host):
                lo, hi = max(pos, base + a * cs), min(end, base + b * cs)
                head, tail = self._cow_edges(entries, ~inplace, base, a, b, lo, hi)
                self._vet(int(host[a]) >> self.cluster_bits, b - a)
                self.file.write(int(host[a]) + lo - (base + a * cs) - len(head), head,
                                data[lo - offset:hi - offset], tail)
            if fresh.size:
                entries[fresh] = host[fresh] | COPIED
                self._write_l2(l2_offset, table, first, stop)
                self._release(self.entries.referenced_clusters(old))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        self._begin_write()
        self._write(offset, view)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Whole clusters become zero clusters (their host clusters released); partial ones
        get zero bytes (block/qcow2-cluster.c zero_in_l2_slice does the former)."""
        self._check_range(offset, length)
        self._begin_write()
        cs = self.cluster_size
        start = (offset + cs - 1) & ~(cs - 1)
        stop = (offset + length) & ~(cs - 1)
        if self.header.version < 3 or start >= stop:
            self._write_zero_bytes(offset, offset + length)
            return
        self._write_zero_bytes(offset, start)
        self._zero_clusters(start, stop, ZERO)
        self._write_zero_bytes(stop, offset + length)

    def _write_zero_bytes(self, start: int, stop: int) -> None:
        step = 1 << 20
        for pos in range(start, stop, step):
            self._write(pos, memoryview(bytes(min(step, stop - pos))))

    def _zero_clusters(self, start: int, stop: int, value: np.uint64,
                       only_allocated: bool = False) -> None:
        """Set the L2 entries of whole clusters in [start, stop) to ``value`` (ZERO or 0) and
        drop their references; ``only_allocated`` leaves unallocated ones and missing L2
        tables alone (the VM-state discard after a snapshot, block/qcow2-snapshot.c)."""
        for l1_index, _, _, first, stop_entry in self._chunks(start, stop):
            if only_allocated:
                l2_offset = self._l2_offset(l1_index)
                if not l2_offset or not (self.entries.kinds(self._l2(l2_offset)[first:stop_entry])
                                         != UNALLOCATED).any():
                    continue
            l2_offset, table = self._writable_l2(l1_index)
            entries = table[first:stop_entry]
            change = entries != value
            if only_allocated:
                change &= self.entries.kinds(entries) != UNALLOCATED
            if change.any():
                old = entries[change]
                entries[change] = value
                self._write_l2(l2_offset, table, first, stop_entry)
                self._release(self.entries.referenced_clusters(old))

    def flush(self) -> None:
        """fdatasync only when something was written since the last flush."""
        if self.file.written:
            os.fdatasync(self.file.fd)
            self.file.written = False

    def close(self) -> None:
        if self.file.fd >= 0:
            os.close(self.file.fd)
            self.file.fd = -1
        if self.owns_backing and self.backing is not None:
            self.backing.close()
            self.backing = None

    # -- VM state --------------------------------------------------------------------------

    def _vmstate_offset(self) -> int:
        """First guest offset beyond the disk's L1 entries (block/qcow2.h qcow2_vm_state_offset)."""
        return self.header.l1_entries_for(self._size) << (self.cluster_bits + self.l2_bits)

    def write_vmstate(self, pos: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if pos < 0:
            raise ImageError("negative VM state position")
        self._begin_write()
        self._write(self._vmstate_offset() + pos, view)

    def read_vmstate(self, pos: int, length: int) -> bytes:
        if pos < 0 or length < 0:
            raise ImageError("negative VM state position or length")
        return self._read_bytes(self._vmstate_offset() + pos, length)

    # -- snapshots -------------------------------------------------------------------------

    def snapshots(self) -> list[Snapshot]:
        return [sn.info() for sn in self._snapshots]

    def _find(self, snapshot_id: str) -> SnapshotEntry:
        for sn in self._snapshots:
            if sn.id == snapshot_id:
                return sn
        for sn in self._snapshots:
            if sn.name == snapshot_id:
                return sn
        raise ImageError(f"Snapshot '{snapshot_id}' not found in '{self.filename}'")

    def _tree_clusters(self, l1: np.ndarray) -> np.ndarray:
        """Every reference an L1 table holds: its L2 tables and their data clusters, each once
        per path, the way qemu-img check counts them (block/qcow2-refcount.c)."""
        offsets = (l1 & OFFSET)[(l1 & OFFSET) != 0]
        parts = [(offsets >> np.uint64(self.cluster_bits)).astype(np.int64)]
        for offset in offsets.tolist():
            parts.append(self.entries.referenced_clusters(self._l2(offset)))
        return np.concatenate(parts)

    def _update_copied(self) -> None:
        """Recompute COPIED over the active L1 and its L2 tables after refcounts changed
        wholesale (snapshot create, goto, delete)."""
        offsets = (self.l1 & OFFSET).astype(np.int64)
        used = np.flatnonzero(offsets)
        counts = self.refs.get(offsets[used] >> self.cluster_bits)
        new = self.l1.copy()
        new[used] = np.where(counts == 1, self.l1[used] | COPIED, self.l1[used] & ~COPIED)
        for offset in offsets[used].tolist():
            table = self._l2(offset)
            fixed = self.entries.with_copied(table, self.refs.get)
            if (fixed != table).any():
                table[:] = fixed
                self._write_l2(offset, table, 0, len(table))
        changed = np.flatnonzero(new != self.l1)
        self.l1 = new
        if changed.size:
            self._write_l1(int(changed[0]), int(changed[-1]) + 1)

    def _write_snapshot_table(self, entries: list[SnapshotEntry]) -> None:
        """Write the table to fresh clusters, switch the header, free the old table."""
        raw = pack_table(entries)
        if len(raw) > MAX_TABLE_BYTES:
            raise self.file.error("snapshot table would exceed its maximum size")
        old_offset, old_bytes = self.header.snapshots_offset, self._snapshot_bytes
        offset = 0
        if entries:
            clusters = -(-len(raw) // self.cluster_size)
            offset = self.refs.allocate(clusters)
            self.file.write(offset, raw, bytes(clusters * self.cluster_size - len(raw)))
        self._write_header(OFF_SNAPSHOTS, ">IQ", len(entries), offset)
        self.header.nb_snapshots, self.header.snapshots_offset = len(entries), offset
        self._snapshots, self._snapshot_bytes = entries, len(raw)
        self._sn_l1_spans = self._snapshot_l1_spans()
        if old_bytes:
            first = old_offset >> self.cluster_bits
            count = -(-old_bytes // self.cluster_size)
            self._release(np.arange(first, first + count, dtype=np.int64))

    def create_snapshot(self, name: str, date_sec: int, date_nsec: int, vm_clock_nsec: int,
                        vm_state_size: int, icount: int = -1) -> Snapshot:
        """block/qcow2-snapshot.c's order: copy the L1, count the new references, add the
        table entry; then drop the VM state from the active L1 (the snapshot keeps it)."""
        self._begin_write()
        if len(self._snapshots) >= MAX_SNAPSHOTS:
            raise self.file.error("too many snapshots")
        if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise self.file.error(f"snapshot name longer than {MAX_NAME_BYTES} bytes")
        tree = self._tree_clusters(self.l1)
        self.refs.check(tree, 1)
        count = len(self.l1)
        l1_offset = 0
        if count:
            clusters = -(-count * 8 // self.cluster_size)
            l1_offset = self.refs.allocate(clusters)
            copy = np.zeros(clusters * self.cluster_size // 8, np.uint64)
            copy[:count] = self.l1 & ~COPIED
            self.file.write(l1_offset, copy.astype(">u8").tobytes())
        self.refs.change(tree, 1)
        self._update_copied()
        entry = SnapshotEntry(l1_offset, count, next_id(self._snapshots), name, date_sec,
                              date_nsec, vm_clock_nsec, vm_state_size, self._size, icount)
        self._write_snapshot_table(self._snapshots + [entry])
        if vm_state_size:
            start = self._vmstate_offset()
            stop = start + ((vm_state_size + self.cluster_size - 1) & ~(self.cluster_size - 1))
            value = ZERO if self.header.version >= 3 else np.uint64(0)
            self._zero_clusters(start, stop, value, only_allocated=True)
        log.info("%s: snapshot %s '%s' created", self.filename, entry.id, name)
        return entry.info()

    def goto_snapshot(self, snapshot_id: str) -> None:
        """Reference the snapshot's tree, make the active L1 a copy of its L1, drop the old
        active tree (block/qcow2-snapshot.c qcow2_snapshot_goto)."""
        self._begin_write()
        sn = self._find(snapshot_id)
        sn_l1 = self._load_l1(sn.l1_table_offset, sn.l1_size, f"snapshot '{sn.id}' L1 table")
        tree = self._tree_clusters(sn_l1)
        self.refs.check(tree, 1)
        if sn.disk_size != self._size:
            self._write_header(OFF_SIZE, ">Q", sn.disk_size)
            self._size = self.header.size = sn.disk_size
        self._ensure_l1(max(sn.l1_size, self.header.l1_entries_for(self._size)))
        self.refs.change(tree, 1)
        old = self.l1.copy()
        self.l1[:] = 0
        self.l1[:len(sn_l1)] = sn_l1 & ~COPIED
        self._write_l1(0, len(self.l1))
        self._release(self._tree_clusters(old))
        self._update_copied()
        log.info("%s: reverted to snapshot %s '%s'", self.filename, sn.id, sn.name)

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Remove the table entry first, then the snapshot's references and its L1 table."""
        self._begin_write()
        sn = self._find(snapshot_id)
        sn_l1 = self._load_l1(sn.l1_table_offset, sn.l1_size, f"snapshot '{sn.id}' L1 table")
        tree = self._tree_clusters(sn_l1)
        self._write_snapshot_table([s for s in self._snapshots if s is not sn])
        self._release(tree)
        if sn.l1_size:
            first = sn.l1_table_offset >> self.cluster_bits
            count = -(-sn.l1_size * 8 // self.cluster_size)
            self._release(np.arange(first, first + count, dtype=np.int64))
        self._update_copied()
        log.info("%s: snapshot %s '%s' deleted", self.filename, sn.id, sn.name)

    # -- persistent dirty bitmaps ------------------------------------------------------------

    @property
    def _autoclear_known(self) -> int:
        """Autoclear bits this driver maintains: the bitmaps bit, on version 3 images."""
        return AUTOCLEAR_BITMAPS if self.header.version >= 3 else 0

    def _load_bitmap_directory(self) -> None:
        """Parse and validate the directory and every bitmap table; the bitmaps are ignored
        (their clusters only leak) when autoclear bit 0 says a program without bitmap support
        modified the image, as block/qcow2.c does."""
        self._bitmaps: list[tuple[BitmapEntry, np.ndarray]] = []
        self._bitmap_dir = BitmapsExtension(0, 0, 0)
        #: Bitmaps found in use at open (not saved by their last writer): never read.
        self._inconsistent: set[str] = set()
        h, f, cs = self.header, self.file, self.cluster_size
        data = next((d for kind, d in h.extensions if kind == EXT_BITMAPS), None)
        if data is None or h.version < 3:
            return
        if not h.autoclear & AUTOCLEAR_BITMAPS:
            log.warning("%s: a program lacking bitmap support modified this file, so its "
                        "bitmaps are ignored (their clusters leak)", self.filename)
            return
        ext = parse_extension(data, cs, self.filename)
        check_table(self.filename, "bitmap directory", ext.directory_offset,
                    ext.directory_size, cs, f.size)
        raw = f.read_meta(ext.directory_offset, ext.directory_size, "bitmap directory")
        for entry in parse_directory(raw, ext.nb_bitmaps, self.filename):
            check_entry(entry, cs, self._size, f.size, self.filename)
            table = parse_bitmap_table(f.read_meta(entry.table_offset, 8 * entry.table_size,
                                            f"bitmap '{entry.name}' table"),
                                cs, f.size, self.filename, entry.name)
            self._bitmaps.append((entry, table))
            if entry.in_use:
                self._inconsistent.add(entry.name)
        self._bitmap_dir = ext

    def _mark_bitmaps_in_use(self) -> None:
        """Set in_use on every bitmap while the image is open read-write, in place, so that
        a crash leaves them marked inconsistent (block/qcow2-bitmap.c does the same)."""
        self._begin_write()
        for entry, _ in self._bitmaps:
            entry.flags |= FLAG_IN_USE
        self.file.write(self._bitmap_dir.directory_offset,
                        pack_directory([e for e, _ in self._bitmaps]))

    @property
    def supports_persistent_bitmaps(self) -> bool:
        return True

    def stored_bitmaps(self) -> list[StoredBitmap]:
        cs = self.cluster_size
        out = []
        for entry, table in self._bitmaps:
            nbits = -(-self._size // entry.granularity)
            inconsistent = entry.name in self._inconsistent
            if inconsistent:
                bits = np.zeros(nbits, bool)
            else:
                bits = decode_bits(table, lambda offset: self.file.read_meta(
                    offset, cs, f"bitmap '{entry.name}' data"), nbits, cs)
            out.append(StoredBitmap(entry.name, entry.granularity,
                                    entry.auto and not inconsistent, inconsistent, bits))
        return out

    def can_store_new_bitmap(self, name: str, granularity: int, existing: list[str]) -> None:
        """qcow2_co_can_store_new_dirty_bitmap's checks and texts (block/qcow2-bitmap.c)."""
        if self.header.version < 3:
            raise ImageError("Cannot store dirty bitmaps in qcow2 v2 files")
        self._check_bitmap(name, granularity)
        self._check_directory([*existing, name])

    def _check_bitmap(self, name: str, granularity: int) -> None:
        """check_constraints_on_bitmap (block/qcow2-bitmap.c); vmigrate also caps a bitmap
        at MAX_BITS."""
        bits = granularity.bit_length() - 1
        if bits > MAX_GRANULARITY_BITS:
            raise ImageError(f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)")
        if bits < MIN_GRANULARITY_BITS:
            raise ImageError(f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)")
        nbits = -(-self._size // granularity)
        data_bytes = -(-nbits // 8)
        if (data_bytes > MAX_DATA_BYTES or data_bytes > MAX_TABLE_ENTRIES * self.cluster_size
                or nbits > MAX_BITS):
            raise ImageError("Too much space will be occupied by the bitmap. "
                             "Use larger granularity")
        if len(name.encode()) > MAX_BITMAP_NAME:
            raise ImageError(f"Name length exceeds maximum ({MAX_BITMAP_NAME} characters)")

    @staticmethod
    def _check_directory(names: list[str]) -> None:
        if len(names) > MAX_BITMAPS:
            raise ImageError("Maximum number of persistent bitmaps is already reached")
        if sum(entry_bytes(len(n.encode())) for n in names) > MAX_DIRECTORY_BYTES:
            raise ImageError("Not enough space in the bitmap directory")

    def store_bitmaps(self, bitmaps: list[StoredBitmap]) -> None:
        """Write each consistent bitmap to fresh clusters, then a fresh directory and the
        header extension, then free the old clusters: a crash leaks at worst.  An
        inconsistent bitmap keeps its old entry (in use) and clusters, as QEMU keeps it.
        The stored bitmaps are no longer in use: call this when they stop changing (close)."""
        if not bitmaps and not self._bitmaps:
            return
        self._begin_write()
        if self.header.version < 3:
            raise ImageError("Cannot store dirty bitmaps in qcow2 v2 files")
        names = [b.name for b in bitmaps]
        if len(set(names)) != len(names):
            raise self.file.error("duplicate bitmap names")
        self._check_directory(names)
        for b in bitmaps:
            if not b.inconsistent:
                self._check_bitmap(b.name, b.granularity)
                if len(b.bits) != -(-self._size // b.granularity):
                    raise self.file.error(f"bitmap '{b.name}' does not match the disk size")
        old = {e.name: (e, t) for e, t in self._bitmaps}
        new: list[tuple[BitmapEntry, np.ndarray]] = []
        written: list[tuple[BitmapEntry, np.ndarray]] = []
        try:
            for b in bitmaps:
                if not b.inconsistent:
                    written.append(self._write_bitmap(b))
                    new.append(written[-1])
                elif b.name in old:
                    new.append(old.pop(b.name))
            self._commit_directory(new)
        except BaseException:
            for entry, table in written:
                self._release(self._bitmap_clusters(entry, table))
            raise
        for entry, table in old.values():
            self._release(self._bitmap_clusters(entry, table))
        self._inconsistent = {e.name for e, _ in new if e.in_use}
        log.info("%s: stored %d persistent bitmaps", self.filename, len(new))

    def remove_stored_bitmap(self, name: str) -> None:
        """block/qcow2-bitmap.c qcow2_co_remove_persistent_dirty_bitmap: a new directory
        without it, then its clusters freed; the others stay as they are."""
        gone = [(e, t) for e, t in self._bitmaps if e.name == name]
        if not gone:
            return
        self._begin_write()
        self._commit_directory([(e, t) for e, t in self._bitmaps if e.name != name])
        self._release(self._bitmap_clusters(*gone[0]))
        self._inconsistent.discard(name)

    def _bitmap_clusters(self, entry: BitmapEntry, table: np.ndarray) -> np.ndarray:
        """The host clusters a bitmap holds: its data clusters and its table."""
        data = (table[table > np.uint64(TABLE_ALL_ONES)] >> np.uint64(self.cluster_bits))
        first, end = self._clusters(entry.table_offset, 8 * entry.table_size)
        return np.concatenate([data.astype(np.int64), np.arange(first, end, dtype=np.int64)])

    def _write_bitmap(self, bitmap: StoredBitmap) -> tuple[BitmapEntry, np.ndarray]:
        """Data clusters (one contiguous run; all-zero and all-one clusters are table
        entries 0 and 1), then the table."""
        cs = self.cluster_size
        kinds, clusters = encode_bits(bitmap.bits, cs)
        table = kinds.astype(np.uint64)
        data = np.flatnonzero(kinds < 0)
        tclusters = -(-8 * len(table) // cs)
        base = self.refs.allocate(int(data.size)) if data.size else 0
        try:
            table_offset = self.refs.allocate(tclusters)
        except BaseException:
            first = base >> self.cluster_bits
            self._release(np.arange(first, first + data.size, dtype=np.int64))
            raise
        if data.size:
            table[data] = np.uint64(base) + np.arange(data.size, dtype=np.uint64) * np.uint64(cs)
            self.file.write(base, clusters[data].tobytes())
        padded = np.zeros(tclusters * cs // 8, np.uint64)
        padded[:len(table)] = table
        self.file.write(table_offset, padded.astype(">u8").tobytes())
        entry = BitmapEntry(bitmap.name, table_offset, len(table),
                            FLAG_AUTO if bitmap.enabled else 0,
                            bitmap.granularity.bit_length() - 1)
        return entry, table

    def _commit_directory(self, bitmaps: list[tuple[BitmapEntry, np.ndarray]]) -> None:
        """A fresh directory, then the header switched to it (or the extension removed and
        autoclear bit 0 cleared when no bitmap is left), then the old directory freed."""
        cs = self.cluster_size
        old = self._bitmap_dir
        ext = BitmapsExtension(0, 0, 0)
        if bitmaps:
            raw = pack_directory([e for e, _ in bitmaps])
            clusters = -(-len(raw) // cs)
            ext = BitmapsExtension(len(bitmaps), len(raw), self.refs.allocate(clusters))
            self.file.write(ext.directory_offset, raw, bytes(clusters * cs - len(raw)))
        try:
            self._write_extensions(pack_extension(ext) if bitmaps else None)
        except BaseException:
            if bitmaps:
                self._release(np.arange(*self._clusters(ext.directory_offset,
                                                        ext.directory_size), dtype=np.int64))
            raise
        self._bitmaps, self._bitmap_dir = bitmaps, ext
        if old.directory_size:
            self._release(np.arange(*self._clusters(old.directory_offset, old.directory_size),
                                    dtype=np.int64))

    def _write_extensions(self, bitmaps_ext: bytes | None) -> None:
        """Rewrite the header cluster's extension area with the bitmaps extension replaced,
        added or removed, the backing file name after the end marker, and autoclear bit 0
        saying whether the extension is there: one write of the header's first bytes."""
        h, cs = self.header, self.cluster_size
        extensions = [(k, d) for k, d in h.extensions if k != EXT_BITMAPS]
        if bitmaps_ext is not None:
            extensions.append((EXT_BITMAPS, bitmaps_ext))
        backing = (h.backing_file or "").encode("utf-8", "surrogateescape")
        area = extensions_bytes(extensions)
        old_end = max(h.header_length + len(extensions_bytes(h.extensions)),
                      h.backing_file_offset + h.backing_file_size)
        if h.header_length + len(area) + len(backing) > cs:
            raise self.file.error("no room in the header cluster for the bitmaps extension")
        autoclear = (h.autoclear | AUTOCLEAR_BITMAPS if bitmaps_ext is not None
                     else h.autoclear & ~AUTOCLEAR_BITMAPS)
        head = bytearray(self.file.read_meta(0, h.header_length, "image header"))
        backing_offset = h.header_length + len(area) if backing else 0
        struct.pack_into(">QI", head, OFF_BACKING, backing_offset, len(backing))
        struct.pack_into(">Q", head, OFF_AUTOCLEAR, autoclear)
        out = bytes(head) + area + backing
        self.file.write(0, out, bytes(max(0, old_end - len(out))))
        h.extensions, h.autoclear = extensions, autoclear
        h.backing_file_offset, h.backing_file_size = backing_offset, len(backing)
