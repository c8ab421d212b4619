"""Guest RAM: RAM blocks backed by anonymous or shared file mappings.

A block's bytes are one ``mmap``; numpy views of it give the page-run
operations (copy, compare, zero test) their speed.  The dirty log lives next
to the memory because every writer (software vCPU, KVM dirty log, the
incoming migration) must mark pages in the same place.
"""

from __future__ import annotations

import mmap
import os
import re
import threading

import numpy as np

PAGE_SIZE = 4096


class DirtyLog:
    """Per-page dirty flags set by the vCPU backend, one bitmap per client.

    Clients are QEMU's dirty-memory users: the migration and the dirty-rate
    measurement each get their own bitmap, so measuring never steals pages a
    migration must resend.  Without clients marking costs nothing.  One byte
    per page (not bits) so marking a run is one slice assignment and
    collecting is one vectorised OR; 4 GiB of RAM costs 1 MiB per client.
    """

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self._clients: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def start(self, client: str) -> None:
        with self._lock:
            self._clients[client] = np.zeros(self.npages, dtype=np.bool_)

    def stop(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)

    def mark_range(self, first: int, count: int) -> None:
        with self._lock:
            for bits in self._clients.values():
                bits[first : first + count] = True

    def mark_pages(self, pages: np.ndarray) -> None:
        with self._lock:
            for bits in self._clients.values():
                bits[pages] = True

    def mark_bitmap(self, words: np.ndarray, first: int, count: int) -> int:
        """Mark pages [first, first + count) whose bit is set in *words* (KVM's little-endian bitmap).

        Returns how many bits were set.
        """
        marked = np.unpackbits(words.view(np.uint8), count=count, bitorder="little").view(np.bool_)
        with self._lock:
            for bits in self._clients.values():
                bits[first:first + count] |= marked
        return int(np.count_nonzero(marked))

    def collect_into(self, client: str, target: np.ndarray) -> int:
        """OR *client*'s log into *target*, clear it, return how many pages were newly dirty."""
        with self._lock:
            bits = self._clients[client]
            fresh = int(np.count_nonzero(bits & ~target))
            target |= bits
            bits[:] = False
        return fresh


class RAMBlock:
    """One named RAM region (QEMU's RAMBlock), e.g. ``ram`` for ``-M none -m``."""

    def __init__(self, idstr: str, size: int, mem_path: str | None = None) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"RAM size must be a positive multiple of {PAGE_SIZE} bytes")
        self.idstr = idstr
        self.size = size
        self.mem_path = mem_path
        self.shared = mem_path is not None
        if mem_path is None:
            self._mmap = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            # Transparent huge pages make first-touch faults of guest RAM several times slower here.
            self._mmap.madvise(mmap.MADV_NOHUGEPAGE)
        else:
            fd = os.open(mem_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
                self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
        self.bytes = np.frombuffer(self._mmap, dtype=np.uint8)
        #: (npages, 4096) view: the unit of every migration operation.
        self.pages = self.bytes.reshape(-1, PAGE_SIZE)
        self.npages = size // PAGE_SIZE
        self.dirty = DirtyLog(self.npages)

    def write_pages(self, pages: np.ndarray, data: np.ndarray) -> None:
        """Store whole pages (incoming migration).

        A contiguous run is prefaulted with one MADV_POPULATE_WRITE before the
        copy: taking the first-touch faults in one call is several times
        faster than one fault per page inside the copy.
        """
        first, count = int(pages[0]), len(pages)
        if int(pages[-1]) - first + 1 == count and (count == 1 or bool((np.diff(pages) == 1).all())):
            _populate_write(self._mmap, first * PAGE_SIZE, count * PAGE_SIZE)
            self.pages[first : first + count] = data
        else:
            self.pages[pages] = data

    def unbacked_pages(self) -> np.ndarray:
        """Pages with no memory behind them yet (hence zero), as a bool per page.

        Fresh anonymous memory is all unbacked; for a RAM file the holes are
        found with SEEK_DATA/SEEK_HOLE.  Knowing this lets an incoming
        migration skip zero pages without reading (and so allocating) them.
        """
        holes = np.ones(self.npages, dtype=np.bool_)
        if self.mem_path is None:
            return holes
        fd = os.open(self.mem_path, os.O_RDONLY)
        try:
            pos = 0
            while pos < self.size:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                if data >= self.size:
                    break
                end = min(os.lseek(fd, data, os.SEEK_HOLE), self.size)
                holes[data // PAGE_SIZE : (end + PAGE_SIZE - 1) // PAGE_SIZE] = False
                pos = end
        finally:
            os.close(fd)
        return holes

    def close(self) -> None:
        self.pages = self.bytes = None  # type: ignore[assignment]
        self._mmap.close()


_MADV_POPULATE_WRITE = 23
_populate_supported = True


def _populate_write(mem: mmap.mmap, offset: int, length: int) -> None:
    """Prefault a range for writing; a no-op on kernels without MADV_POPULATE_WRITE (< 5.14)."""
    global _populate_supported
    if _populate_supported:
        try:
            mem.madvise(_MADV_POPULATE_WRITE, offset, length)
        except OSError:
            _populate_supported = False


def parse_size(text: str, default_suffix: str = "M") -> int:
    """Parse QEMU-style sizes: ``256M``, ``4G``, ``8K``, ``1.5GiB``; a bare number takes *default_suffix*."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"invalid size '{text}'")
    unit = (m.group(2) or default_suffix).upper()
    return int(float(m.group(1)) * {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])
