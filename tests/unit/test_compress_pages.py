"""Compressed page records: the worker's output and the destination's decompression threads."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from vmigrate.machine.memory import RAMBlock
from vmigrate.migration.compress import DecompressPool, ThreadInflater, compress_chunk
from vmigrate.migration.wire import NEED_DATA, WireError
from vmigrate.migration.wire import ram as R

PAGE = 4096


def load_records(dst: RAMBlock, wire: bytes, pool: DecompressPool) -> None:
    """Apply ZERO/COMPRESS_PAGE records onto *dst*, the compressed runs through *pool*."""
    dec = R.RamBodyDecoder({"ram": dst.size}, accept_compressed=True, variable_runs=True)
    dec.last_block = "ram"
    stream = R.RecordStream(dec)
    stream.feed(wire + R.eos())
    while not isinstance(ev := stream.next_event(), R.RamEOS):
        assert ev is not NEED_DATA
        if isinstance(ev, R.RamCompressedRun):
            pool.load(dst, ev.offsets, ev.buf, ev.starts, ev.lengths)
        else:
            dst.pages[ev.pages] = ev.fill[:, None]


def loaded(wire: bytes, npages: int, threads: int = 3) -> RAMBlock:
    """Apply ZERO/COMPRESS_PAGE records onto a block full of stale bytes."""
    dst = RAMBlock("ram", npages * PAGE)
    dst.pages[:] = 0xEE
    pool = DecompressPool([ThreadInflater()] * threads)
    try:
        load_records(dst, wire, pool)
    finally:
        pool.close()
    return dst


def test_chunk_records_are_zero_or_independent_zlib_streams():
    src = RAMBlock("ram", 64 * PAGE)
    rng = np.random.default_rng(2)
    src.pages[::2] = rng.integers(0, 256, size=(32, PAGE), dtype=np.uint8)
    src.pages[1::4] = 7
    pages = np.array([9, 3, 4, 8, 5, 60, 61, 62, 1, 2])          # any order, as QEMU's threads emit them
    out = compress_chunk(src, pages, 1)
    nonzero = src.pages[pages].any(axis=1)
    assert out.zero_pages == int((~nonzero).sum()) and out.compressed_pages == int(nonzero.sum())
    first = np.flatnonzero(nonzero)[0]
    z = zlib.compress(src.pages[pages[first]], 1)
    assert z in out.data and out.compressed_size == len(out.data) - 8 * out.compressed_pages - 9 * out.zero_pages
    dst = loaded(out.data, 64)
    assert np.array_equal(dst.pages[pages], src.pages[pages])


def test_a_short_stream_fills_only_the_start_of_the_page_and_bad_streams_fail():
    """QEMU inflates into the page: shorter output keeps the page's tail, longer output fails."""
    ch = R.ChannelState("ram")
    short = R.compressed_page("ram", 0, zlib.compress(b"\x01" * 100), ch)
    dst = loaded(short, 2)
    assert dst.pages[0, :100].tolist() == [1] * 100 and (dst.pages[0, 100:] == 0xEE).all()
    for bad in (zlib.compress(b"\x01" * (PAGE + 1)), zlib.compress(b"\x01" * 10)[:-3], b"garbage"):
        with pytest.raises(WireError, match="decompress data failed"):
            loaded(R.compressed_page("ram", PAGE, bad, R.ChannelState("ram")), 2)
