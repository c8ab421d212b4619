"""The ``compress`` capability's work in worker processes: the thread path's records and pages,
its errors, and the processes gone when the threads are."""

from __future__ import annotations

import os
import signal
import zlib

import numpy as np
import pytest

from vmigrate.machine.memory import PAGE_SIZE, RAMBlock
from vmigrate.migration.compress import (ChunkOutput, CompressError, CompressSender, DecompressPool, ThreadCompressor,
                                         ThreadInflater, compress_chunk)
from vmigrate.migration.compress_worker import (PROCESS_CHUNK_PAGES, ProcessCompressor, ProcessInflater,
                                                compress_sender, decompress_pool)
from vmigrate.migration.stats import CompressionStats
from vmigrate.migration.wire import WireError
from vmigrate.migration.wire import ram as R
from vmigrate.migration.worker_process import ENV

from test_compress_pages import load_records

NPAGES = 1024


@pytest.fixture
def blocks(tmp_path):
    src = RAMBlock("ram", NPAGES * PAGE_SIZE, mem_path=str(tmp_path / "src.ram"))
    dst = RAMBlock("ram", NPAGES * PAGE_SIZE, mem_path=str(tmp_path / "dst.ram"))
    rng = np.random.default_rng(3)
    src.pages[::3] = rng.integers(0, 256, (len(src.pages[::3]), PAGE_SIZE), dtype=np.uint8)
    src.pages[1::3] = rng.integers(0, 4, (len(src.pages[1::3]), PAGE_SIZE), dtype=np.uint8)
    dst.pages[:] = 0xEE
    yield src, dst
    for b in (src, dst):
        b.close()


def gone(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_process_chunks_are_the_threads_records(blocks):
    src, _ = blocks
    compressor = ProcessCompressor(0, [src], 1)
    try:
        pages = np.array([5, 900, 3, 4, 6, 7, 1000, 2, 1], np.int64)
        got = compressor(src, pages)
        assert got == ThreadCompressor(1)(src, pages) == compress_chunk(src, pages, 1)
        src.pages[4] = 9
        assert compressor(src, pages[:5]) == compress_chunk(src, pages[:5], 1)
    finally:
        compressor.close()
    assert gone(compressor._process.worker.pid)


def test_sender_and_pool_in_processes_move_every_page(blocks, monkeypatch):
    src, dst = blocks
    monkeypatch.setenv(ENV, "1")
    outputs: list[ChunkOutput] = []
    stats = CompressionStats()
    sender = compress_sender(3, 1, True, stats, outputs.append, [src])
    pool = decompress_pool(2, [dst])
    pids = [w.compressor._process.worker.pid for w in sender.workers]
    pids += [i._process.worker.pid for i in pool._inflaters]
    try:
        assert all(isinstance(w.compressor, ProcessCompressor) for w in sender.workers)
        assert sender.chunk_pages == PROCESS_CHUNK_PAGES
        assert len(sender.submit(src, np.arange(NPAGES))) == 0
        sender.flush()
        load_records(dst, b"".join(o.data for o in outputs), pool)
    finally:
        sender.close()
        pool.close()
    assert np.array_equal(dst.pages, src.pages)
    zero = int((~src.pages.any(axis=1)).sum())
    assert sum(o.zero_pages for o in outputs) == zero and stats.pages == NPAGES - zero
    assert all(gone(pid) for pid in pids)


def test_processes_by_default_wherever_ram_is_a_file(blocks, monkeypatch):
    src, dst = blocks
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    sender = compress_sender(1, 1, True, CompressionStats(), lambda out: None, [src])
    pool = decompress_pool(1, [dst])
    try:
        assert isinstance(sender.workers[0].compressor, ProcessCompressor)
        assert isinstance(pool._inflaters[0], ProcessInflater)
    finally:
        sender.close()
        pool.close()
    anonymous = RAMBlock("ram", NPAGES * PAGE_SIZE)
    try:
        pool = decompress_pool(2, [anonymous])
        assert all(isinstance(i, ThreadInflater) for i in pool._inflaters)
        pool.close()
    finally:
        anonymous.close()


def test_threads_when_told(blocks, monkeypatch):
    src, dst = blocks
    monkeypatch.setenv(ENV, "0")
    sender = compress_sender(3, 1, True, CompressionStats(), lambda out: None, [src])
    pool = decompress_pool(2, [dst])
    try:
        assert all(isinstance(w.compressor, ThreadCompressor) for w in sender.workers)
        assert all(isinstance(i, ThreadInflater) for i in pool._inflaters)
    finally:
        sender.close()
        pool.close()


def test_a_bad_stream_fails_the_load_and_the_process_goes_on(blocks):
    _, dst = blocks
    inflater = ProcessInflater(0, [dst])
    pool_records = R.compressed_page("ram", PAGE_SIZE, b"garbage", R.ChannelState("ram"))
    good = np.full(PAGE_SIZE, 5, np.uint8)
    try:
        pool = DecompressPool([inflater])
        with pytest.raises(WireError, match="decompress data failed"):
            load_records(dst, pool_records, pool)
        load_records(dst, R.compressed_page("ram", 2 * PAGE_SIZE, zlib.compress(good.tobytes(), 1), R.ChannelState("ram")), pool)
        assert np.array_equal(dst.pages[2], good)
    finally:
        inflater.close()


def test_a_vanished_worker_fails_the_sender_cleanly(blocks):
    src, _ = blocks
    compressors = [ProcessCompressor(i, [src], 1) for i in range(2)]
    sender = CompressSender(compressors, True, CompressionStats(), lambda out: None)
    try:
        os.kill(compressors[1]._process.worker.pid, signal.SIGKILL)
        with pytest.raises(CompressError, match=r"compress: worker 1 exited"):
            for _ in range(20):
                sender.submit(src, np.arange(NPAGES))
            sender.flush()
    finally:
        sender.close()
    assert all(gone(c._process.worker.pid) for c in compressors)
