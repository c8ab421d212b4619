"""The ``compress`` capability's threads with their zlib work in processes (docs/benchmarks.md,
"Legacy compress in processes").

Every compressed page is a Python call (``zlib.compress`` of one page), and
each thread retakes the VM process's interpreter lock after every call:
on many cores the lock, not zlib, bounds the threads.  Here each
compression or decompression thread hands its chunk to a forked process
of its own (migration/worker_process.py) and waits for the answer without
the lock; the process runs the thread path's own :func:`compress_chunk` or
:func:`inflate_into` over the shared RAM file.  Records, order
rules and counters are the thread path's: only where the work runs moves.

Source: a job is ``(block, pages)``; the answer is the chunk's records and
counters, which the thread gives :class:`CompressSender` as it would its
own.  Destination: a job is one part of a run of compressed pages, its
offsets, the positions of the streams and the stretch of the main
channel's buffer that holds them; the process writes the pages into guest
RAM and answers ``K`` or an error text.

:func:`compress_sender` and :func:`decompress_pool` choose between threads
and processes (:func:`worker_process.wanted`): processes wherever they
apply, since they are faster even on two cores (docs/benchmarks.md,
"Legacy compress in processes").
"""

from __future__ import annotations

import logging
import struct
import zlib
from typing import Callable

import numpy as np

from vmigrate.machine.memory import RAMBlock
from vmigrate.migration.channel import ChannelError, SocketChannel
from vmigrate.migration.compress import (ChunkOutput, CompressError, CompressSender, Compressor, DecompressPool,
                                         Inflater, ThreadCompressor, ThreadInflater, compress_chunk, inflate_into)
from vmigrate.migration.multifd import recv_exact
from vmigrate.migration.stats import CompressionStats
from vmigrate.migration.wire.errors import WireError
from vmigrate.migration.worker_process import Worker, start, wanted

log = logging.getLogger(__name__)

#: Pages handed to a compression process at a time: four times a thread's chunk, so that the VM
#: process's lock is taken once per 64 pages (one job and one answer) rather than once per page.
PROCESS_CHUNK_PAGES = 64
#: A compression job: block index, page count; the pages follow as int64.
_JOB = struct.Struct("<iI")
#: A compression answer: kind (``D`` records, ``E`` error text), zero pages, compressed pages,
#: compressed size, bytes that follow.
_OUTPUT = struct.Struct("<cIIQQ")
#: A decompression job: block index, page count, bytes of streams; offsets, starts and lengths
#: follow as int64, then the streams.
_PART = struct.Struct("<iIQ")
#: A decompression answer: kind (``K`` done, ``W`` a bad stream's error text), bytes of text that follow.
_DONE = struct.Struct("<cI")


def compress_sender(threads: int, level: int, wait: bool, stats: CompressionStats,
                    write: Callable[[ChunkOutput], None], blocks: list[RAMBlock]) -> CompressSender:
    """The source's ``compress-threads``: each with a process of its own where workers are wanted."""
    compressors: list[Compressor]
    if wanted(blocks, True):
        log.info("compress: %d compression workers (processes)", threads)
        compressors = [ProcessCompressor(i, blocks, level) for i in range(threads)]
    else:
        compressors = [ThreadCompressor(level)] * threads
    return CompressSender(compressors, wait, stats, write)


def decompress_pool(threads: int, blocks: list[RAMBlock]) -> DecompressPool:
    """The destination's ``decompress-threads``: each with a process of its own where workers are wanted."""
    inflaters: list[Inflater]
    if wanted(blocks, True):
        log.info("compress: %d decompression workers (processes)", threads)
        inflaters = [ProcessInflater(i, blocks) for i in range(threads)]
    else:
        inflaters = [ThreadInflater()] * threads
    return DecompressPool(inflaters)


class _Process:
    """The thread's side of one worker: a job out, its answer back, one at a time."""

    def __init__(self, worker: Worker, blocks: list[RAMBlock]) -> None:
        self.worker = worker
        self.ctrl = SocketChannel(worker.ctrl)
        self.index = {b.idstr: i for i, b in enumerate(blocks)}

    def receive(self, size: int) -> bytearray:
        data = bytearray(size)
        try:
            recv_exact(self.ctrl, memoryview(data))
        except ChannelError:
            raise CompressError(f"compress: worker {self.worker.id} exited") from None
        return data

    def answer(self, head: struct.Struct) -> tuple:
        """The answer's fields; an error text (kind ``E``, or ``W`` for a bad stream) is raised."""
        fields = head.unpack(self.receive(head.size))
        if fields[0] in (b"E", b"W"):
            text = self.receive(fields[-1]).decode(errors="replace")
            raise (WireError if fields[0] == b"W" else CompressError)(text)
        return fields

    def send(self, buffers: list) -> None:
        try:
            self.ctrl.writev(buffers)
        except ChannelError:
            raise CompressError(f"compress: worker {self.worker.id} exited") from None

    def close(self) -> None:
        self.worker.stop()
        self.worker.ctrl.close()


class ProcessCompressor:
    """:func:`compress_chunk` in a worker process; the calling thread waits without the lock."""

    chunk_pages = PROCESS_CHUNK_PAGES

    def __init__(self, worker_id: int, blocks: list[RAMBlock], level: int) -> None:
        self._process = _Process(start(worker_id, [], lambda ctrl: _compress_loop(ctrl, blocks, level)), blocks)

    def __call__(self, block: RAMBlock, pages: np.ndarray) -> ChunkOutput:
        p = self._process
        job = np.ascontiguousarray(pages, np.int64)
        p.send([_JOB.pack(p.index[block.idstr], len(job)), job])
        _, zero, compressed, size, length = p.answer(_OUTPUT)
        return ChunkOutput(bytes(p.receive(length)), zero, compressed, size)

    def close(self) -> None:
        self._process.close()


class ProcessInflater:
    """:func:`inflate_into` in a worker process; the calling thread waits without the lock."""

    def __init__(self, worker_id: int, blocks: list[RAMBlock]) -> None:
        self._process = _Process(start(worker_id, [], lambda ctrl: _inflate_loop(ctrl, blocks)), blocks)

    def __call__(self, block: RAMBlock, offsets: np.ndarray, view: memoryview, starts: np.ndarray,
                 lengths: np.ndarray) -> None:
        p = self._process
        lo, hi = int(starts[0]), int(starts[-1] + lengths[-1])
        p.send([_PART.pack(p.index[block.idstr], len(offsets), hi - lo),
                np.ascontiguousarray(offsets, np.int64), np.ascontiguousarray(starts - lo, np.int64),
                np.ascontiguousarray(lengths, np.int64), view[lo:hi]])
        p.answer(_DONE)

    def close(self) -> None:
        self._process.close()


# -- in the worker process ----------------------------------------------------------------


def _compress_loop(ctrl: SocketChannel, blocks: list[RAMBlock], level: int) -> None:
    head = bytearray(_JOB.size)
    pages = np.empty(PROCESS_CHUNK_PAGES, np.int64)
    while recv_exact(ctrl, memoryview(head), eof_ok=True):
        index, count = _JOB.unpack(head)
        recv_exact(ctrl, memoryview(pages[:count]).cast("B"))
        try:
            out = compress_chunk(blocks[index], pages[:count], level)
        except (zlib.error, ValueError) as err:
            text = f"compressed data failed: {err}".encode()
            ctrl.write(_OUTPUT.pack(b"E", 0, 0, 0, len(text)) + text)
            continue
        ctrl.writev([_OUTPUT.pack(b"D", out.zero_pages, out.compressed_pages, out.compressed_size,
                                  len(out.data)), out.data])


def _inflate_loop(ctrl: SocketChannel, blocks: list[RAMBlock]) -> None:
    for b in blocks:
        b.forked()
    head = bytearray(_PART.size)
    while recv_exact(ctrl, memoryview(head), eof_ok=True):
        index, count, size = _PART.unpack(head)
        arrays = np.empty((3, count), np.int64)
        streams = bytearray(size)
        recv_exact(ctrl, memoryview(arrays).cast("B"))
        recv_exact(ctrl, memoryview(streams))
        offsets, starts, lengths = arrays
        try:
            inflate_into(blocks[index], offsets, memoryview(streams), starts, lengths)
        except WireError as err:
            text = str(err).encode()
            ctrl.write(_DONE.pack(b"W", len(text)) + text)
            continue
        ctrl.write(_DONE.pack(b"K", 0))
