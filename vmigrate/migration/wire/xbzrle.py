"""XBZRLE page deltas (spec: docs/qemu/ram.md §5), encoded and decoded a batch of pages at a time.

An encoded page is a sequence of ``zrun nzrun`` pairs: the ULEB128 length of
a run of bytes equal to the old page, then the ULEB128 length of a run of
changed bytes followed by those new bytes.  The trailing equal run is not
written.  QEMU checks for overflow (encoding longer than ``dlen`` = 4096) at
three points per pair; because the output only grows, those checks reduce
to two conditions on the final length ``d`` of a page:

* ``d > 4096``, or
* the page ends with an equal run and ``d + 2 > 4096`` (QEMU tests
  ``d + 2 > dlen`` at the top of the loop before noticing that the rest
  is equal).

That makes a vectorised encoder exact: runs are found for a whole batch
with one comparison of 64-bit words, the changed words' bytes with one
XOR, and run boundaries by comparing each changed byte with its neighbour
in that compact array; lengths, overflow and the output layout are array
arithmetic, and the new bytes land in the output with one masked copy.
:func:`xbzrle_records` lays the records (header, flag, length, delta) out
around the deltas in the same buffer.

The decoder applies deltas onto the destination's *current* page contents
(there is no cache on the destination).  Pairs are chained (each length
says where the next pair starts), so it advances all pages of a batch one
pair per step: the number of Python steps is the largest pair count of any
page in the batch, never the number of pages or bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vmigrate.migration.wire.errors import WireError
from vmigrate.migration.wire.ram import (ENCODING_FLAG_XBZRLE, RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_XBZRLE,
                                         ChannelState)
from vmigrate.migration.wire.stream import str8

PAGE_SIZE = 4096
_PAGE_BITS = 12
#: Largest value ``uleb128_encode_small`` accepts (two 7-bit groups).
ULEB_SMALL_MAX = (1 << 14) - 1
DECODE_ERROR = "Failed to load XBZRLE page - decode error!"
#: Changed bytes per page from which the decoder stages whole pages rather than indexing bytes.
STAGE_BYTES_PER_PAGE = 256


# -- ULEB128, the scalar definition (util/cutils.c) -------------------------------------

def uleb128_encode_small(n: int) -> bytes:
    if not 0 <= n <= ULEB_SMALL_MAX:
        raise ValueError(f"uleb128_encode_small: {n} out of range")
    return bytes((n,)) if n < 0x80 else bytes(((n & 0x7F) | 0x80, n >> 7))


def uleb128_decode_small(buf: bytes, pos: int = 0) -> tuple[int, int]:
    """``(value, bytes used)``; WireError for a third continuation byte."""
    b0 = buf[pos]
    if not b0 & 0x80:
        return b0, 1
    b1 = buf[pos + 1]
    if b1 & 0x80:
        raise WireError(DECODE_ERROR)
    return (b0 & 0x7F) | (b1 << 7), 2


# -- encoder ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, eq=False)
class EncodedBatch:
    """Result of :func:`encode_batch` for K pages.

    ``lengths[k]`` is 0 for an unchanged page, -1 for an overflow and the
    encoded length otherwise; the encoding of page k is
    ``out[starts[k]:starts[k] + lengths[k]]`` (``starts`` is -1 where there
    is none).  ``out`` has ``lead`` bytes before the first encoding and
    ``gap`` bytes before each, left for the caller's record headers.
    """

    lengths: np.ndarray
    starts: np.ndarray
    out: np.ndarray

    def page(self, k: int) -> bytes:
        n = int(self.lengths[k])
        return bytes(self.out[self.starts[k]:self.starts[k] + n]) if n > 0 else b""


def _uleb_bytes(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first byte, second byte, is two bytes) of each value's ULEB128 form."""
    two = v >= 0x80
    first = np.where(two, (v & 0x7F) | 0x80, v).astype(np.uint8)
    return first, (v >> 7).astype(np.uint8), two


def encode_batch(old: np.ndarray, new: np.ndarray, gap: int = 0, lead: int = 0) -> EncodedBatch:
    """Encode ``new[k]`` against ``old[k]`` for every row k; both are ``(K, 4096)`` uint8.

    The comparison works on 64-bit words, so strided input is copied to a
    contiguous array first (the callers pass gathered copies already).
    """
    if old.shape != new.shape or old.ndim != 2 or old.shape[1] != PAGE_SIZE:
        raise ValueError("old and new must both be (K, 4096) arrays")
    k_pages = old.shape[0]
    lengths = np.zeros(k_pages, np.int64)
    starts = np.full(k_pages, -1, np.int64)
    old = np.ascontiguousarray(old, np.uint8)
    new = np.ascontiguousarray(new, np.uint8)
    o64 = old.reshape(-1).view(np.uint64)
    n64 = new.reshape(-1).view(np.uint64)
    words = np.flatnonzero(o64 != n64)
    if words.size == 0:
        return EncodedBatch(lengths, starts, np.zeros(lead, np.uint8))

    # Runs are found on the changed words only: ``changed`` holds their 8
    # bytes each, so a byte continues a run iff its predecessor in that
    # compact array is changed and lies in the adjacent word of the same page.
    changed = ((o64[words] ^ n64[words]).view(np.uint8) != 0)
    joined = np.empty(words.size, np.bool_)
    joined[0] = False
    np.equal(words[1:], words[:-1] + 1, out=joined[1:])
    joined &= (words & (PAGE_SIZE // 8 - 1)) != 0
    before = np.empty_like(changed)
    before[0] = False
    before[1:] = changed[:-1]
    before[::8] &= joined
    after = np.empty_like(changed)
    after[-1] = False
    after[:-1] = changed[1:]
    after[7:-1:8] &= joined[1:]
    first = np.flatnonzero(changed & ~before)
    last = np.flatnonzero(changed & ~after)
    run_start = words[first >> 3] * 8 + (first & 7)
    run_len = words[last >> 3] * 8 + (last & 7) + 1 - run_start
    run_row = run_start >> _PAGE_BITS
    run_col = run_start & (PAGE_SIZE - 1)
    run_end = run_col + run_len

    row_head = np.empty(run_row.size, np.bool_)
    row_head[0] = True
    np.not_equal(run_row[1:], run_row[:-1], out=row_head[1:])
    prev_end = np.empty_like(run_end)
    prev_end[0] = 0
    prev_end[1:] = run_end[:-1]
    prev_end[row_head] = 0
    zrun = run_col - prev_end
    zsize = 1 + (zrun >= 0x80)
    nsize = 1 + (run_len >= 0x80)
    size = zsize + nsize + run_len

    heads = np.flatnonzero(row_head)
    rows = run_row[heads]
    d = np.add.reduceat(size, heads)
    last_end = run_end[np.append(heads[1:], run_row.size) - 1]
    overflow = (d > PAGE_SIZE) | ((last_end < PAGE_SIZE) & (d + 2 > PAGE_SIZE))
    lengths[rows] = np.where(overflow, -1, d)

    ok_rows = rows[~overflow]
    ok_d = d[~overflow]
    page_start = lead + gap + np.cumsum(ok_d + gap) - (ok_d + gap)
    starts[ok_rows] = page_start
    total = lead + int((ok_d + gap).sum())
    out = np.zeros(total, np.uint8)
    if ok_rows.size == 0:
        return EncodedBatch(lengths, starts, out)

    runs_per_row = np.diff(np.append(heads, run_row.size))
    keep = np.repeat(~overflow, runs_per_row)
    size_k = size[keep]
    excl = np.cumsum(size_k) - size_k
    kheads = np.flatnonzero(row_head[keep])
    kruns = runs_per_row[~overflow]
    at = np.repeat(page_start - excl[kheads], kruns) + excl

    # Everything in ``out`` that is not a gap or a length byte is run data:
    # the new bytes of the kept runs, in order, land there with one masked copy.
    data = np.ones(total, np.bool_)
    data[:lead] = False
    if gap:
        data[(page_start[:, None] - np.arange(gap, 0, -1)).ravel()] = False
    for values in (zrun[keep], run_len[keep]):
        lo, hi, two = _uleb_bytes(values)
        out[at] = lo
        out[at[two] + 1] = hi[two]
        data[at] = False
        data[at[two] + 1] = False
        at = at + 1 + two
    take = changed
    if not keep.all():
        take = changed.copy()
        take[changed] = np.repeat(keep, run_len)
    out[data] = n64[words].view(np.uint8)[take]
    return EncodedBatch(lengths, starts, out)


def encode_page(old: bytes, new: bytes) -> bytes | None:
    """One page: the encoding, ``b""`` if unchanged, None on overflow."""
    enc = encode_batch(np.frombuffer(old, np.uint8).reshape(1, -1), np.frombuffer(new, np.uint8).reshape(1, -1))
    n = int(enc.lengths[0])
    return None if n < 0 else enc.page(0)


# -- records ----------------------------------------------------------------------------

_RECORD_GAP = 8 + 1 + 2          # be64 address word, encoding flag, be16 length


def xbzrle_records(block: str, pages: np.ndarray, old: np.ndarray, new: np.ndarray,
                   channel: ChannelState) -> tuple[memoryview, EncodedBatch]:
    """XBZRLE records for ``pages`` (indices in ``block``) whose delta fits.

    Returns the records (pages whose encoding is empty or overflows get
    none) and the encodings, whose ``lengths`` tell the caller which pages
    still need a PAGE record or nothing at all.  The first record names the
    block unless ``channel`` says it was the last one named.
    """
    prefix = b"" if channel.last_block == block else str8(block)
    enc = encode_batch(old, new, gap=_RECORD_GAP, lead=len(prefix))
    sent = np.flatnonzero(enc.lengths > 0)
    if not sent.size:
        return memoryview(b""), enc
    out, at, n = enc.out, enc.starts[sent], enc.lengths[sent]
    words = (np.asarray(pages, np.uint64)[sent] << np.uint64(_PAGE_BITS)) | np.uint64(
        RAM_SAVE_FLAG_XBZRLE | RAM_SAVE_FLAG_CONTINUE)
    head = at - _RECORD_GAP
    head[0] -= len(prefix)
    if prefix:
        words[0] &= ~np.uint64(RAM_SAVE_FLAG_CONTINUE)
        out[8:8 + len(prefix)] = np.frombuffer(prefix, np.uint8)
    out[head[:, None] + np.arange(8)] = words.astype(">u8").view(np.uint8).reshape(-1, 8)
    out[at - 3] = ENCODING_FLAG_XBZRLE
    out[at - 2] = n >> 8
    out[at - 1] = n & 0xFF
    channel.last_block = block
    return memoryview(out), enc


# -- decoder ----------------------------------------------------------------------------

def _uleb_at(src: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ULEB128 values at positions ``at`` (two readable bytes guaranteed by the caller)."""
    b0 = src[at].astype(np.int64)
    b1 = src[at + 1].astype(np.int64)
    two = b0 >= 0x80
    if (two & (b1 >= 0x80)).any():
        raise WireError(DECODE_ERROR)
    return np.where(two, (b0 & 0x7F) | (b1 << 7), b0), 1 + two


def _first_repeat(keys: np.ndarray) -> int | None:
    """Index of the first element equal to an earlier one, None if all differ."""
    order = np.argsort(keys, kind="stable")
    same = np.flatnonzero(keys[order][1:] == keys[order][:-1])
    return int(order[same + 1].min()) if same.size else None


def decode_into(mem: np.ndarray, page_offsets: np.ndarray, src, starts: np.ndarray,
                lengths: np.ndarray) -> None:
    """Apply encodings ``src[starts[k]:starts[k]+lengths[k]]`` onto the pages of ``mem``.

    ``mem`` is a writable flat uint8 array (a RAMBlock's bytes) and
    ``page_offsets`` the byte offsets of the K target pages in it.  Bytes
    outside the encoded non-zero runs keep their current values.  Raises
    WireError with QEMU's message if any encoding is malformed (QEMU's
    checks: two bytes left before each length, no empty run but a leading
    zero run, nothing beyond the page or the payload).  A page listed twice
    gets its deltas applied in order.
    """
    page_offsets = np.asarray(page_offsets, np.int64)
    starts = np.asarray(starts, np.int64)
    lengths = np.asarray(lengths, np.int64)
    if (lengths > PAGE_SIZE).any():
        raise WireError("Failed to load XBZRLE page - len overflow!")
    cut = _first_repeat(page_offsets)
    if cut is not None:
        decode_into(mem, page_offsets[:cut], src, starts[:cut], lengths[:cut])
        decode_into(mem, page_offsets[cut:], src, starts[cut:], lengths[cut:])
        return
    data = np.frombuffer(src, np.uint8) if not isinstance(src, np.ndarray) else src
    pos = starts.copy()
    end = starts + lengths
    done = np.zeros(len(starts), np.int64)
    seg_page, seg_dst, seg_src, seg_len = [], [], [], []
    act = np.flatnonzero(lengths > 0)
    while act.size:
        p, e = pos[act], end[act]
        if (e - p < 2).any():
            raise WireError(DECODE_ERROR)
        zrun, used = _uleb_at(data, p)
        if ((zrun == 0) & (p != starts[act])).any():
            raise WireError(DECODE_ERROR)
        p = p + used
        d = done[act] + zrun
        if (d > PAGE_SIZE).any() or (e - p < 2).any():
            raise WireError(DECODE_ERROR)
        nzrun, used = _uleb_at(data, p)
        p = p + used
        if (nzrun == 0).any() or (d + nzrun > PAGE_SIZE).any() or (p + nzrun > e).any():
            raise WireError(DECODE_ERROR)
        seg_page.append(page_offsets[act])
        seg_dst.append(d)
        seg_src.append(p)
        seg_len.append(nzrun)
        done[act] = d + nzrun
        pos[act] = p + nzrun
        act = act[pos[act] < e]
    if seg_len:
        _copy_runs(mem, data, np.concatenate(seg_page), np.concatenate(seg_dst), np.concatenate(seg_src),
                   np.concatenate(seg_len))


def _run_mask(starts: np.ndarray, lengths: np.ndarray, size: int) -> np.ndarray:
    """Boolean mask of ``size`` entries, True on the sorted, disjoint runs [start, start+length)."""
    sizes = np.empty(2 * len(starts) + 1, np.int64)
    sizes[0:-1:2] = starts - np.concatenate(([0], starts[:-1] + lengths[:-1]))
    sizes[1::2] = lengths
    sizes[-1] = size - starts[-1] - lengths[-1]
    pattern = np.zeros(len(sizes), np.bool_)
    pattern[1::2] = True
    return np.repeat(pattern, sizes)


def _copy_runs(mem: np.ndarray, data: np.ndarray, page: np.ndarray, dst: np.ndarray, src: np.ndarray,
               length: np.ndarray) -> None:
    """``mem[page + dst : + length] = data[src : + length]`` for every run.

    Few bytes per page (small deltas): one fancy index per byte.  Many
    bytes per page: the target pages are staged in a ``(M, 4096)`` copy; a
    mask over it and a mask over the payload (both one ``np.repeat`` of run
    lengths) select the same bytes in the same order, so the copy is one
    masked assignment — about 3 times faster than indexing each byte once
    pages carry a few hundred changed bytes.
    """
    total = int(length.sum())
    order = np.lexsort((dst, page))
    page, dst, src, length = page[order], dst[order], src[order], length[order]
    rows = np.unique(page)
    ends = src + length
    if total < STAGE_BYTES_PER_PAGE * len(rows) or (src[1:] < ends[:-1]).any():
        step = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(length) - length, length)
        mem[np.repeat(page + dst, length) + step] = data[np.repeat(src, length) + step]
        return
    flat_dst = np.searchsorted(rows, page) * PAGE_SIZE + dst
    lo = int(src[0])
    staged = mem.reshape(-1, PAGE_SIZE)[rows // PAGE_SIZE]
    values = data[lo:int(ends[-1])][_run_mask(src - lo, length, int(ends[-1]) - lo)]
    staged.reshape(-1)[_run_mask(flat_dst, length, staged.size)] = values
    mem.reshape(-1, PAGE_SIZE)[rows // PAGE_SIZE] = staged


def decode_page(encoded: bytes, page: bytearray | np.ndarray) -> None:
    """Apply one encoding onto ``page`` (4096 writable bytes) in place."""
    mem = page if isinstance(page, np.ndarray) else np.frombuffer(page, np.uint8)
    decode_into(mem.reshape(-1), np.zeros(1, np.int64), encoded, np.zeros(1, np.int64),
                np.array([len(encoded)], np.int64))
