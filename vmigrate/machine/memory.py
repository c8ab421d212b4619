"""Guest RAM: RAM blocks backed by anonymous or shared file mappings.

A block's bytes are one ``mmap``; numpy views of it give the page-run
operations (copy, compare, zero test) their speed.  The dirty log lives next
to the memory because every writer (software vCPU, KVM dirty log, the
incoming migration) must mark pages in the same place.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import threading

import numpy as np

from vmigrate.machine.userfaultfd import fault_in

PAGE_SIZE = 4096


def page_runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """Page indices as ``(first, count)`` runs of consecutive pages, in their order (offsets into *pages* follow).

    Multifd calls it for every packet on both sides, so the common one-run
    case (a first pass over RAM) takes two numpy calls.
    """
    if not pages.size:
        return []
    steps = np.diff(pages) != 1
    if not steps.any():
        return [(int(pages[0]), int(pages.size))]
    breaks = np.flatnonzero(steps) + 1
    bounds = np.concatenate(([0], breaks, [pages.size]))
    return [(int(pages[a]), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]


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

    def __init__(self, idstr: str, size: int, mem_path: str | None = None, gpa: int = 0) -> None:
        """*gpa* is where the block sits in guest physical memory (QEMU's ``mr->addr``): ``-M
        none`` maps its machine RAM at 0.  A *mem_path* block is mapped MAP_SHARED (QEMU's
        RAM_SHARED, ``memory-backend-file,share=on``), which ``x-ignore-shared`` leaves unsent."""
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"RAM size must be a positive multiple of {PAGE_SIZE} bytes")
        self.idstr = idstr
        self.size = size
        self.mem_path = mem_path
        self.shared = mem_path is not None
        self.gpa = gpa
        #: The RAM file, open for writes through the page cache (:meth:`write_pages`, multifd's
        #: ``splice``); None for anonymous RAM and where the file system takes no write(2) (hugetlbfs).
        self.file: int | None = None
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
            except BaseException:
                os.close(fd)
                raise
            if _takes_writes(fd):
                self.file = fd
            else:
                os.close(fd)
        self.bytes = np.frombuffer(self._mmap, dtype=np.uint8)
        #: (npages, 4096) view: the unit of every migration operation.
        self.pages = self.bytes.reshape(-1, PAGE_SIZE)
        self.npages = size // PAGE_SIZE
        self.dirty = DirtyLog(self.npages)
        #: The block's first byte in this process, for system calls on its pages.
        self.address = self.bytes.ctypes.data
        #: Set while a postcopy destination fetches missing pages on demand: see :meth:`access`.
        self.faulting = False
        #: Set while a background snapshot write-protects the block (machine/write_tracking.py).
        self.write_tracked = False
        self._prefaulter: Prefaulter | None = None
        #: Multifd channel threads write pages concurrently: one of them starts the one Prefaulter.
        self._prefaulter_lock = threading.Lock()
        #: Whether incoming runs start a :class:`Prefaulter` (not in a forked worker: see :meth:`forked`).
        self._look_ahead = True

    def write_pages(self, pages: np.ndarray, data: np.ndarray) -> None:
        """Store whole pages (incoming migration).

        Into a RAM file they go with ``pwrite``, run by run, through the page
        cache: a fresh tmpfs page written whole is never zeroed first, and
        no page table of this process is filled for it, which halves the
        kernel's time per page against first-touch faults and a copy
        (docs/benchmarks.md, "Writing incoming pages through the RAM file").
        While userfaultfd watches the mapping (postcopy, background
        snapshot) the writes must go through it, as they do for anonymous
        RAM: there a contiguous run is prefaulted with one
        MADV_POPULATE_WRITE before the copy, several times faster than one
        fault per page inside it, and long runs let the :class:`Prefaulter`
        allocate what is likely to come next.
        """
        if self.writes_to_file():
            done = 0
            for first, count in page_runs(pages):
                write_file(self.file, np.ascontiguousarray(data[done:done + count]), first * PAGE_SIZE)
                done += count
            return
        first, count = int(pages[0]), len(pages)
        if int(pages[-1]) - first + 1 == count and (count == 1 or bool((np.diff(pages) == 1).all())):
            self.incoming_run(first, count)[:] = data
        else:
            self.pages[pages] = data

    def writes_to_file(self) -> bool:
        """Whether incoming pages go into the RAM file with system calls rather than through the mapping."""
        return self.file is not None and not self.faulting and not self.write_tracked

    def incoming_run(self, first: int, count: int) -> np.ndarray:
        """Pages [first, first + count), allocated, for an incoming stream to fill (write_pages, or a
        multifd channel's ``recv_into`` straight into guest RAM)."""
        if not self._look_ahead:
            _populate_write(self.address + first * PAGE_SIZE, count * PAGE_SIZE)
            return self.pages[first : first + count]
        with self._prefaulter_lock:
            if self._prefaulter is None:
                self._prefaulter = Prefaulter(self.bytes.ctypes.data, self.npages)
            prefaulter = self._prefaulter
        prefaulter.populate(first, count)
        return self.pages[first : first + count]

    def forked(self) -> None:
        """This is a forked worker's copy (migration/multifd_worker.py, compress_worker.py): the VM
        process's Prefaulter thread and RAM file descriptor are not here, and its lock may have been
        copied held.

        A worker allocates only the runs it writes, with no lookahead: it sees
        every few batches of the stream, so the pages after its run are
        another worker's, which a helper here would map into the wrong
        process (about 7 % more worker CPU at 8 channels, docs/benchmarks.md,
        "One message per batch, and no lookahead in workers").
        """
        self._prefaulter = None
        self._prefaulter_lock = threading.Lock()
        self._look_ahead = False
        if self.file is not None:
            # The fork kept only the descriptors the worker asked for (worker_process.start).
            self.file = os.open(self.mem_path, os.O_RDWR)

    def access(self, first: int, count: int) -> None:
        """Pages [first, first + count) are about to be touched from Python (a software vCPU).

        While postcopy fetches pages on demand, a touch of a missing page
        blocks until the page arrives.  Taken inside numpy, that fault would
        block holding the interpreter lock, which the threads that receive
        and place the page need; taken here, in a system call made without
        it, only this thread waits (docs/qemu/postcopy.md §4.2).

        While a background snapshot tracks writes, a write to a page not
        saved yet blocks the same way until the snapshot saved it
        (docs/background-snapshot.md): the workloads write what they
        access, so the access is populated as a write.
        """
        if self.write_tracked:
            fault_in(self.address + first * PAGE_SIZE, count * PAGE_SIZE, write=True)
        elif self.faulting:
            fault_in(self.address + first * PAGE_SIZE, count * PAGE_SIZE)

    def discard(self, start: int, length: int) -> None:
        """Drop a byte range's pages so that they read as missing (a postcopy discard).

        Anonymous memory is simply unmapped; a shared file's pages live in
        the page cache, so the range is punched out of the file as well.
        """
        advice = mmap.MADV_REMOVE if self.shared else mmap.MADV_DONTNEED
        self._mmap.madvise(advice, start, length)

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

    def end_incoming(self) -> None:
        """An incoming load is over: its :class:`Prefaulter` thread ends (the next load starts another)."""
        with self._prefaulter_lock:
            prefaulter, self._prefaulter = self._prefaulter, None
        if prefaulter is not None:
            prefaulter.stop()

    def close(self) -> None:
        self.end_incoming()
        self.pages = self.bytes = None  # type: ignore[assignment]
        self._mmap.close()
        if self.file is not None:
            os.close(self.file)
            self.file = None


def write_file(fd: int, data: np.ndarray | memoryview, offset: int) -> None:
    """All of *data* into a file at *offset* (``pwrite`` may write less than asked, e.g. on a full tmpfs)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if not written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]
        offset += written


def _takes_writes(fd: int) -> bool:
    """Whether a RAM file can be written with write(2): hugetlbfs has only its mapping (EINVAL)."""
    try:
        os.pwrite(fd, b"", 0)
    except OSError:
        return False
    return True


_MADV_POPULATE_WRITE = 23
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_populate_supported = True


def _populate_write(addr: int, length: int) -> None:
    """Prefault a range for writing, without the GIL; a no-op on kernels without MADV_POPULATE_WRITE (< 5.14)."""
    global _populate_supported
    if _populate_supported and _libc.madvise(addr, length, _MADV_POPULATE_WRITE) != 0:
        _populate_supported = False


class Prefaulter:
    """Allocates a RAM block's pages ahead of an incoming stream's long runs, on its own thread.

    Allocating a fresh page (the kernel zeroes it, and on a nested host the
    outer host may have to back it first) was two thirds of the receiving
    thread's time in a 4 GiB precopy, on one core while the other idled.  A
    stream that has just sent a dense run of data pages is about to send the
    pages after it, so a helper thread allocates them while the receivers
    copy.  Writes a little out of order (multifd channels) continue a run;
    the lookahead is never longer than the data the run has brought, so
    memory allocated for pages that turn out to be zero (and would otherwise
    stay unbacked) is at most what the run itself used.
    """

    #: Runs with fewer data pages than this start no lookahead: zero-heavy RAM stays unbacked.
    MIN_RUN = 256
    #: The most the helper works ahead of the stream, in pages (32 MiB).
    MAX_AHEAD = 8192
    #: Pages per helper call: small enough to track the stream, large enough to amortise the call.
    CHUNK = 256
    #: A write this close (in pages) to the run continues it: multifd channels deliver packets out of order.
    SLACK = 1024

    def __init__(self, addr: int, npages: int) -> None:
        self._addr = addr
        self._npages = npages
        self._cond = threading.Condition()
        #: The current run spans pages [start, written) and brought data_pages of them.
        self._start = self._written = self._data_pages = 0
        #: The helper allocated [ahead_from, ready) and works on towards goal.
        self._ahead_from = self._ready = self._goal = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="prefault", daemon=True)
        self._thread.start()

    def populate(self, first: int, count: int) -> None:
        """Pages [first, first + count) are about to be written: allocate them, and what follows a dense run."""
        end = first + count
        with self._cond:
            if not self._start - self.SLACK <= first <= self._written + self.SLACK:
                self._start, self._written, self._data_pages = first, end, 0
                self._ahead_from = self._ready = self._goal = end
            self._start = min(self._start, first)
            self._written = max(self._written, end)
            self._data_pages += count
            covered = self._ahead_from <= first and end <= self._ready
            dense = self._data_pages * 10 >= (self._written - self._start) * 9
            if self._data_pages >= self.MIN_RUN and dense:
                self._goal = min(self._written + min(self._data_pages, self.MAX_AHEAD), self._npages)
                self._cond.notify()
        if not covered:
            _populate_write(self._addr + first * PAGE_SIZE, count * PAGE_SIZE)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and max(self._ready, self._written) >= self._goal:
                    self._cond.wait()
                if self._stopped:
                    return
                if self._ready < self._written:
                    # The writers got past the helper (they allocate their own pages): restart ahead of them.
                    self._ahead_from = self._ready = self._written
                start = self._ready
                stop = min(start + self.CHUNK, self._goal)
            _populate_write(self._addr + start * PAGE_SIZE, (stop - start) * PAGE_SIZE)
            with self._cond:
                if self._ready == start:
                    self._ready = stop


def parse_size(text: str, default_suffix: str = "M") -> int:
    """Parse QEMU-style sizes: ``256M``, ``4G``, ``8K``, ``1.5GiB``; a bare number takes *default_suffix*."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"invalid size '{text}'")
    unit = (m.group(2) or default_suffix).upper()
    return int(float(m.group(1)) * {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])
