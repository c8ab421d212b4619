"""Page compression threads (the ``compress`` capability, docs/qemu/ram.md §6).

Every compressed page is an independent zlib stream (``zlib.compress``
output; QEMU resets its deflate stream per page), so this is the one place
where the work is a Python call per page: there is no batch API for
independent streams.  The calls run on worker threads and zlib releases
the GIL while it deflates or inflates, so ``compress-threads`` /
``decompress-threads`` workers run in parallel.

Source, as QEMU does it: a worker is handed a chunk of pages of the block
last named on the main channel; it copies them, turns zero pages into ZERO
records and the others into COMPRESS_PAGE records (always CONTINUE).  Its
output waits in the worker until the worker is handed its next chunk or a
flush happens (wrap of the scan, block switch, completion), so records
leave out of address order.  With ``compress-wait-thread`` off, a chunk that
finds no idle worker is sent uncompressed and counted as ``busy``.

Destination: runs of COMPRESS_PAGE records are inflated by a thread pool
and written into guest RAM; the load waits for all of them before it goes
on with a record that is not compressed, as QEMU waits at every EOS.

What a thread runs on its chunk or part is a :class:`Compressor` or an
:class:`Inflater`: here in the thread itself, or handed to a process of
its own (migration/compress_worker.py, which also makes the choice).
"""

from __future__ import annotations

import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import numpy as np

from vmigrate.machine.memory import PAGE_SIZE, RAMBlock
from vmigrate.migration.channel import ChannelError
from vmigrate.migration.stats import CompressionStats
from vmigrate.migration.wire import ram as wire_ram
from vmigrate.migration.wire.errors import WireError

#: Pages handed to a worker at a time (QEMU hands one; chunks amortise the hand-over).
CHUNK_PAGES = 16
WAIT_SLICE = 0.5


class CompressError(ChannelError):
    pass


@dataclass(slots=True)
class ChunkOutput:
    """Records a worker produced for one chunk, with what they add to the counters."""

    data: bytes = b""
    zero_pages: int = 0
    compressed_pages: int = 0
    compressed_size: int = 0


def compress_chunk(block: RAMBlock, pages: np.ndarray, level: int) -> ChunkOutput:
    """ZERO / COMPRESS_PAGE records (all CONTINUE) for ``pages`` of ``block``."""
    snapshot = block.pages[pages]
    nonzero = wire_ram.nonzero_pages(snapshot, np.arange(len(pages)))
    parts: list[bytes] = []
    out = ChunkOutput()
    channel = wire_ram.ChannelState(block.idstr)
    zero = pages[~nonzero]
    if zero.size:
        parts.append(bytes(wire_ram.page_records(block.idstr, zero, None, channel)))
        out.zero_pages = int(zero.size)
    for page, row in zip(pages[nonzero].tolist(), snapshot[nonzero]):
        z = zlib.compress(row, level)
        parts.append(wire_ram.compressed_page(block.idstr, page * PAGE_SIZE, z, channel))
        out.compressed_size += 4 + len(z)
    out.compressed_pages = int(nonzero.sum())
    out.data = b"".join(parts)
    return out


class Compressor(Protocol):
    """A compression thread's work on one chunk of at most :attr:`chunk_pages` pages."""

    chunk_pages: int

    def __call__(self, block: RAMBlock, pages: np.ndarray) -> ChunkOutput: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ThreadCompressor:
    """:func:`compress_chunk` in the thread: zlib releases the lock while it deflates."""

    level: int
    chunk_pages: ClassVar[int] = CHUNK_PAGES

    def __call__(self, block: RAMBlock, pages: np.ndarray) -> ChunkOutput:
        return compress_chunk(block, pages, self.level)

    def close(self) -> None:
        pass


class _Worker:
    def __init__(self, owner: "CompressSender", index: int, compressor: Compressor) -> None:
        self.owner = owner
        self.compressor = compressor
        #: Signalled when this worker gets a job (or must quit): only it wakes, not all of them.
        self.cond = threading.Condition(owner.lock)
        self.job: tuple[RAMBlock, np.ndarray] | None = None
        self.output: ChunkOutput | None = None
        self.done = True
        self.thread = threading.Thread(target=self._run, name=f"compress_{index}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        owner = self.owner
        while True:
            with owner.lock:
                while self.job is None and not owner.quit:
                    self.cond.wait(WAIT_SLICE)
                if owner.quit:
                    return
                block, pages = self.job
            try:
                output = self.compressor(block, pages)
            except (zlib.error, ValueError) as err:
                owner.error = f"compressed data failed: {err}"
                output = ChunkOutput()
            except CompressError as err:
                owner.error = str(err)
                output = ChunkOutput()
            with owner.lock:
                self.output = output
                self.job = None
                self.done = True
                owner.cond.notify()


class CompressSender:
    """The source's compression threads.

    ``write(output)`` appends a worker's records to the main channel and
    accounts them as RAM bytes and zero pages (QEMU's
    update_compress_thread_counts); the compression counters are kept here.
    """

    def __init__(self, compressors: list[Compressor], wait: bool, stats: CompressionStats,
                 write: Callable[[ChunkOutput], None]) -> None:
        self.chunk_pages = compressors[0].chunk_pages
        self.wait = wait
        self.stats = stats
        self._write = write
        self.lock = threading.Lock()
        #: Signalled when a worker finishes a job (only the migration thread waits on it).
        self.cond = threading.Condition(self.lock)
        self.quit = False
        self.error: str | None = None
        self.workers = [_Worker(self, i, c) for i, c in enumerate(compressors)]

    def _emit(self, output: ChunkOutput | None) -> None:
        if output is not None and output.data:
            self.stats.pages += output.compressed_pages
            self.stats.compressed_size += output.compressed_size
            self._write(output)

    def submit(self, block: RAMBlock, pages: np.ndarray) -> np.ndarray:
        """Hand ``pages`` to the workers; returns the pages no worker took (``busy``)."""
        busy: list[np.ndarray] = []
        for start in range(0, len(pages), self.chunk_pages):
            chunk = pages[start:start + self.chunk_pages]
            with self.cond:
                while True:
                    if self.error is not None:
                        raise CompressError(self.error)
                    worker = next((w for w in self.workers if w.done), None)
                    if worker is not None or not self.wait:
                        break
                    self.cond.wait(WAIT_SLICE)
                if worker is None:
                    self.stats.busy += len(chunk)
                    busy.append(chunk)
                    continue
                worker.done = False
                output, worker.output = worker.output, None
                worker.job = (block, chunk)
                worker.cond.notify()
            self._emit(output)
        return np.concatenate(busy) if busy else pages[:0]

    def flush(self) -> None:
        """Wait for every worker and append all pending outputs (QEMU's flush_compressed_data)."""
        with self.cond:
            while not all(w.done for w in self.workers):
                if self.error is not None:
                    raise CompressError(self.error)
                self.cond.wait(WAIT_SLICE)
            outputs = [w.output for w in self.workers]
            for worker in self.workers:
                worker.output = None
        for output in outputs:
            self._emit(output)

    def close(self) -> None:
        """Stop the threads; a compressor closed under a thread's call makes that call fail, unseen."""
        with self.lock:
            self.quit = True
            for worker in self.workers:
                worker.cond.notify()
        for worker in self.workers:
            worker.compressor.close()
        for worker in self.workers:
            worker.thread.join(timeout=10)


class Inflater(Protocol):
    """A decompression thread's work: one part of a run of compressed pages into ``block``.

    ``view[starts[i]:starts[i] + lengths[i]]`` is the zlib stream of the
    page at byte ``offsets[i]``; a bad stream raises WireError.
    """

    def __call__(self, block: RAMBlock, offsets: np.ndarray, view: memoryview, starts: np.ndarray,
                 lengths: np.ndarray) -> None: ...

    def close(self) -> None: ...


class ThreadInflater:
    """:func:`inflate_into` in the thread: zlib releases the lock while it inflates."""

    def __call__(self, block: RAMBlock, offsets: np.ndarray, view: memoryview, starts: np.ndarray,
                 lengths: np.ndarray) -> None:
        inflate_into(block, offsets, view, starts, lengths)

    def close(self) -> None:
        pass


class DecompressPool:
    """The destination's ``decompress-threads``: inflates runs of compressed pages into RAM."""

    def __init__(self, inflaters: list[Inflater]) -> None:
        self.threads = len(inflaters)
        self._inflaters = inflaters
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="decompress")

    def load(self, block: RAMBlock, offsets: np.ndarray, buf, starts: np.ndarray, lengths: np.ndarray) -> None:
        """Inflate each page (offset, payload) into ``block``; WireError if any stream is bad."""
        n = len(offsets)
        step = max(1, -(-n // self.threads))
        parts = [(s, min(n, s + step)) for s in range(0, n, step)]
        view = memoryview(buf)
        futures = [self._pool.submit(inflate, block, offsets[a:b], view, starts[a:b], lengths[a:b])
                   for inflate, (a, b) in zip(self._inflaters, parts)]
        errors = [f.exception() for f in futures]
        for err in errors:
            if err is not None:
                raise err

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for inflate in self._inflaters:
            inflate.close()


def inflate_pages(buf, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Whole pages from compressed records, into fresh memory: a postcopy destination places
    them atomically (docs/qemu/postcopy.md §1).  A page whose stream inflates short was a
    missing, hence zero, page before: the rest stays zero."""
    view = memoryview(buf)
    out = np.zeros((len(starts), PAGE_SIZE), dtype=np.uint8)
    for i, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        data = _inflate(view, start, length)
        out[i, :len(data)] = np.frombuffer(data, np.uint8)
    return out


def _inflate(view: memoryview, start: int, length: int) -> bytes:
    """QEMU inflates into the page with 4096 bytes of room and requires the stream's end."""
    d = zlib.decompressobj()
    try:
        data = d.decompress(view[start:start + length], PAGE_SIZE + 1)
    except zlib.error:
        raise WireError("decompress data failed") from None
    if not d.eof or len(data) > PAGE_SIZE:
        raise WireError("decompress data failed")
    return data


def inflate_into(block: RAMBlock, offsets: np.ndarray, view: memoryview, starts: np.ndarray,
                 lengths: np.ndarray) -> None:
    pages = block.pages
    full: list[bytes] = []
    full_idx: list[int] = []
    for offset, start, length in zip(offsets.tolist(), starts.tolist(), lengths.tolist()):
        data = _inflate(view, start, length)
        if len(data) == PAGE_SIZE:
            full.append(data)
            full_idx.append(offset >> 12)
        else:
            pages[offset >> 12, :len(data)] = np.frombuffer(data, np.uint8)
    if full:
        write_pages(block, np.array(full_idx, np.int64), np.frombuffer(b"".join(full), np.uint8).reshape(-1, PAGE_SIZE))


def write_pages(block: RAMBlock, pages: np.ndarray, data: np.ndarray) -> None:
    """RAMBlock.write_pages for pages in any order (compressed records come out of order)."""
    if len(pages) > 1 and not (np.diff(pages) > 0).all():
        order = np.argsort(pages, kind="stable")
        pages, data = pages[order], data[order]
    block.write_pages(pages, data)
