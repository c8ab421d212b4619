"""Records of the ``ram`` section (spec: docs/qemu/ram.md §1-§2, counted bytes §7).

Source side: :func:`mem_size` and :func:`eos` write the setup records, and
:func:`encode_pages` turns a batch of dirty page indices of one RAMBlock into
wire records in a handful of numpy operations::

    ch = ChannelState()                   # one per QEMUFile (main, preempt)
    wire, counts = encode_pages("ram0", ram, dirty_page_indices, ch)
    qemu_file.put(wire)                   # bytes-like (memoryview)
    stats.duplicate += counts.zero_pages

Destination side: :class:`RamBodyDecoder` is the ``ram`` body decoder given
to :class:`~vmigrate.migration.wire.stream.StreamDecoder` (one instance per
channel, since CONTINUE refers to the last block *of the channel*).  A run
of CONTINUE records of the same kind is located with numpy over the header
column and returned as one event whose ``data`` is a read-only view into the
received bytes, so loading is a single fancy-index assignment::

    if isinstance(ev, RamPages):
        ram_of[ev.block][ev.pages] = ev.data
    elif isinstance(ev, RamZeroPages):
        ram_of[ev.block][ev.pages] = ev.fill[:, None]

:class:`RecordStream` feeds a body decoder without section framing (the
postcopy preempt channel carries bare RAM records).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Container, Iterable, Mapping

import numpy as np

from vmigrate.migration.wire.buffer import NEED_DATA, InputBuffer, Reader, Short, decode_name
from vmigrate.migration.wire.errors import WireError
from vmigrate.migration.wire.stream import Section, str8

TARGET_PAGE_BITS = 12
TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS
FLAGS_MASK = TARGET_PAGE_SIZE - 1

RAM_SAVE_FLAG_FULL = 0x001
RAM_SAVE_FLAG_ZERO = 0x002
RAM_SAVE_FLAG_MEM_SIZE = 0x004
RAM_SAVE_FLAG_PAGE = 0x008
RAM_SAVE_FLAG_EOS = 0x010
RAM_SAVE_FLAG_CONTINUE = 0x020
RAM_SAVE_FLAG_XBZRLE = 0x040
RAM_SAVE_FLAG_HOOK = 0x080
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100

ENCODING_FLAG_XBZRLE = 0x01
#: zlib's compressBound(4096): the largest valid compressed page.
COMPRESS_BOUND = 4110

RAM_SECTION_VERSION = 4
PAGE_RECORD = 8 + TARGET_PAGE_SIZE          # CONTINUE page record
ZERO_RECORD = 8 + 1                         # CONTINUE zero record
MAX_RAM_BLOCKS = 1024

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_XBZRLE_HEAD = struct.Struct(">QBH")          # address word, encoding flag, be16 length
_COMPRESSED_HEAD = struct.Struct(">QI")       # address word, be32 length
_HEAD_WORDS = 8                             # 64 bytes: the zero test's first look
_GATHER_CHUNK = 1024                        # pages per gather (4 MiB): stays in cache
_SCALAR_SCAN = 8                            # headers read with struct before numpy


# -- setup records ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RamBlockInfo:
    """One MEM_SIZE entry.

    ``page_size`` is on the wire only with postcopy-ram for a block whose
    page size differs from the host's; ``gpa`` only with x-ignore-shared.
    """

    idstr: str
    used_length: int
    page_size: int | None = None
    gpa: int | None = None


def mem_size(blocks: Iterable[RamBlockInfo | tuple[str, int]]) -> bytes:
    """The MEM_SIZE record listing the migratable RAMBlocks (setup phase)."""
    infos = [b if isinstance(b, RamBlockInfo) else RamBlockInfo(*b) for b in blocks]
    total = sum(b.used_length for b in infos)
    if total & FLAGS_MASK:
        raise ValueError("RAMBlock sizes must be multiples of the target page size")
    out = [_BE64.pack(total | RAM_SAVE_FLAG_MEM_SIZE)]
    for b in infos:
        out.append(str8(b.idstr) + _BE64.pack(b.used_length))
        if b.page_size is not None:
            out.append(_BE64.pack(b.page_size))
        if b.gpa is not None:
            out.append(_BE64.pack(b.gpa))
    return b"".join(out)


def eos() -> bytes:
    return _BE64.pack(RAM_SAVE_FLAG_EOS)


# -- page records -------------------------------------------------------------------

@dataclass(slots=True)
class ChannelState:
    """The sender's "last block named on this channel" (docs/qemu/ram.md §1.2).

    Call :meth:`reset` whenever QEMU would (migration start, postcopy start
    after discards, resume, channel switch) so the next record names its block.
    """

    last_block: str | None = None

    def reset(self) -> None:
        self.last_block = None


@dataclass(slots=True)
class RamSendCounts:
    """Statistics of one encoded batch; bytes as QEMU counts them (docs/qemu/ram.md §7)."""

    zero_pages: int = 0
    normal_pages: int = 0
    zero_bytes: int = 0
    normal_bytes: int = 0

    @property
    def bytes(self) -> int:
        return self.zero_bytes + self.normal_bytes

    def __iadd__(self, other: "RamSendCounts") -> "RamSendCounts":
        self.zero_pages += other.zero_pages
        self.normal_pages += other.normal_pages
        self.zero_bytes += other.zero_bytes
        self.normal_bytes += other.normal_bytes
        return self


def _block_prefix(block: str, channel: ChannelState) -> bytes:
    """The idstr bytes the next record must carry (empty if CONTINUE applies)."""
    return b"" if channel.last_block == block else str8(block)


def _record_header(offset: int, flag: int, prefix: bytes) -> bytes:
    return _BE64.pack(offset | flag | (0 if prefix else RAM_SAVE_FLAG_CONTINUE)) + prefix


def zero_page(block: str, offset: int, channel: ChannelState, fill: int = 0) -> bytes:
    prefix = _block_prefix(block, channel)
    channel.last_block = block
    return _record_header(offset, RAM_SAVE_FLAG_ZERO, prefix) + bytes((fill,))


def normal_page(block: str, offset: int, data: bytes, channel: ChannelState) -> bytes:
    if len(data) != TARGET_PAGE_SIZE:
        raise ValueError("a page record carries exactly one target page")
    prefix = _block_prefix(block, channel)
    channel.last_block = block
    return _record_header(offset, RAM_SAVE_FLAG_PAGE, prefix) + bytes(data)


def xbzrle_page(block: str, offset: int, encoded: bytes, channel: ChannelState) -> bytes:
    if not 0 < len(encoded) <= TARGET_PAGE_SIZE:
        raise ValueError("XBZRLE payload must be 1..4096 bytes")
    prefix = _block_prefix(block, channel)
    channel.last_block = block
    return (_record_header(offset, RAM_SAVE_FLAG_XBZRLE, prefix)
            + bytes((ENCODING_FLAG_XBZRLE,)) + _BE16.pack(len(encoded)) + bytes(encoded))


def compressed_page(block: str, offset: int, zdata: bytes, channel: ChannelState) -> bytes:
    if len(zdata) > COMPRESS_BOUND:
        raise ValueError(f"compressed page longer than {COMPRESS_BOUND} bytes")
    prefix = _block_prefix(block, channel)
    channel.last_block = block
    return (_record_header(offset, RAM_SAVE_FLAG_COMPRESS_PAGE, prefix)
            + _BE32.pack(len(zdata)) + bytes(zdata))


def nonzero_pages(ram: np.ndarray, pages: np.ndarray) -> np.ndarray:
    """Boolean mask: which of ``pages`` hold at least one non-zero byte.

    The first 64 bytes decide most pages (data rarely starts with a zero
    cache line), so only pages with a zero head are scanned in full — like
    QEMU's buffer_is_zero, which stops at the first non-zero word.
    """
    words = ram.view(np.uint64) if ram.flags.c_contiguous else ram
    out = words[pages, :_HEAD_WORDS].any(axis=1)
    undecided = np.flatnonzero(~out)
    for s in range(0, len(undecided), _GATHER_CHUNK):
        part = undecided[s:s + _GATHER_CHUNK]
        out[part] = words[pages[part]].any(axis=1)
    return out


def _put_run(flat: np.ndarray, pos: int, idx: np.ndarray, flag: int, prefix: bytes,
             ram: np.ndarray | None) -> int:
    """Lay out the records of ``idx`` (all zero or all normal) at ``flat[pos:]``.

    Only the first record may carry ``prefix`` (the idstr); the others are
    uniform CONTINUE records written as one 2-D block.
    """
    stride = ZERO_RECORD if ram is None else PAGE_RECORD
    if prefix:
        head = _record_header(int(idx[0]) << TARGET_PAGE_BITS, flag, prefix)
        flat[pos:pos + len(head)] = np.frombuffer(head, dtype=np.uint8)
        pos += len(head)
        if ram is None:
            flat[pos] = 0
            pos += 1
        else:
            flat[pos:pos + TARGET_PAGE_SIZE] = ram[idx[0]]
            pos += TARGET_PAGE_SIZE
        idx = idx[1:]
    m = len(idx)
    if not m:
        return pos
    rec = flat[pos:pos + m * stride].reshape(m, stride)
    headers = (idx.astype(np.uint64) << np.uint64(TARGET_PAGE_BITS)) | np.uint64(
        flag | RAM_SAVE_FLAG_CONTINUE)
    rec[:, :8] = headers.astype(">u8").view(np.uint8).reshape(m, 8)
    if ram is None:
        rec[:, 8] = 0
    else:
        first = int(idx[0])
        if int(idx[-1]) - first + 1 == m:
            rec[:, 8:] = ram[first:first + m]
        else:
            for s in range(0, m, _GATHER_CHUNK):
                rec[s:s + _GATHER_CHUNK, 8:] = ram[idx[s:s + _GATHER_CHUNK]]
    return pos + m * stride


def encode_pages(block: str, ram: np.ndarray, pages: np.ndarray | Iterable[int],
                 channel: ChannelState) -> tuple[memoryview, RamSendCounts]:
    """ZERO and PAGE records for ``pages`` (indices) of the RAMBlock ``block``.

    ``ram`` is the block as a ``(npages, 4096)`` uint8 array.  Zero records
    come first, then page records; every record but the first carries
    CONTINUE, and the first does too when ``block`` was the channel's last
    block.  Returns the wire bytes (a memoryview over a fresh buffer) and
    the statistics QEMU would count for them.

    The output buffer is allocated per call, so batches of about a thousand
    pages keep it cache- and allocator-friendly (~4 GB/s here).  A page the
    guest changes during the call may go out as zero or with mixed
    contents; it is dirty again, so the next round re-sends it, as in QEMU.
    """
    if ram.ndim != 2 or ram.shape[1] != TARGET_PAGE_SIZE or ram.dtype != np.uint8:
        raise ValueError("ram must be a (npages, 4096) uint8 array")
    idx = np.asarray(pages, dtype=np.intp)
    counts = RamSendCounts()
    if idx.size == 0:
        return memoryview(b""), counts
    if idx.ndim != 1 or idx.min() < 0 or idx.max() >= ram.shape[0]:
        raise ValueError("page indices must be a 1-D array within the block")
    nonzero = nonzero_pages(ram, idx)
    zero_idx = idx[~nonzero]
    normal_idx = idx[nonzero]
    prefix = _block_prefix(block, channel)
    zero_prefix = prefix if len(zero_idx) else b""
    normal_prefix = b"" if zero_prefix else prefix
    counts.zero_pages = len(zero_idx)
    counts.normal_pages = len(normal_idx)
    counts.zero_bytes = counts.zero_pages * ZERO_RECORD + len(zero_prefix)
    counts.normal_bytes = counts.normal_pages * PAGE_RECORD + len(normal_prefix)
    flat = np.empty(counts.bytes, dtype=np.uint8)
    pos = 0
    if len(zero_idx):
        pos = _put_run(flat, pos, zero_idx, RAM_SAVE_FLAG_ZERO, zero_prefix, None)
    if len(normal_idx):
        pos = _put_run(flat, pos, normal_idx, RAM_SAVE_FLAG_PAGE, normal_prefix, ram)
    channel.last_block = block
    return memoryview(flat), counts


def page_records(block: str, pages: np.ndarray, data: np.ndarray | None,
                 channel: ChannelState) -> memoryview:
    """PAGE records for ``pages`` carrying ``data[i]``, or ZERO records if ``data`` is None.

    For pages whose bytes are not the block's current contents, e.g. the
    XBZRLE cache copies that the destination must end up with.
    """
    idx = np.asarray(pages, dtype=np.intp)
    if not idx.size:
        return memoryview(b"")
    prefix = _block_prefix(block, channel)
    stride = ZERO_RECORD if data is None else PAGE_RECORD
    flat = np.empty(len(idx) * stride + len(prefix), dtype=np.uint8)
    if data is None:
        _put_run(flat, 0, idx, RAM_SAVE_FLAG_ZERO, prefix, None)
    else:
        pos = 0
        if prefix:
            head = _record_header(int(idx[0]) << TARGET_PAGE_BITS, RAM_SAVE_FLAG_PAGE, prefix)
            flat[:len(head)] = np.frombuffer(head, dtype=np.uint8)
            flat[len(head):len(head) + TARGET_PAGE_SIZE] = data[0]
            pos = len(head) + TARGET_PAGE_SIZE
            idx, data = idx[1:], data[1:]
        if len(idx):
            rec = flat[pos:].reshape(len(idx), PAGE_RECORD)
            headers = (idx.astype(np.uint64) << np.uint64(TARGET_PAGE_BITS)) | np.uint64(
                RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE)
            rec[:, :8] = headers.astype(">u8").view(np.uint8).reshape(-1, 8)
            rec[:, 8:] = data
    channel.last_block = block
    return memoryview(flat)


# -- events ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RamMemSize:
    blocks: tuple[RamBlockInfo, ...]

    @property
    def total(self) -> int:
        return sum(b.used_length for b in self.blocks)


@dataclass(frozen=True, slots=True, eq=False)
class RamPages:
    """Normal pages: ``data[i]`` is the page at byte ``offsets[i]`` of ``block``.

    ``data`` is a read-only ``(K, 4096)`` view into the received bytes; it
    stays valid for as long as it is referenced.
    """

    block: str
    offsets: np.ndarray
    data: np.ndarray

    @property
    def pages(self) -> np.ndarray:
        return self.offsets >> TARGET_PAGE_BITS

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True, slots=True, eq=False)
class RamZeroPages:
    """Pages to fill with ``fill[i]`` (always 0 from a 7.2 source)."""

    block: str
    offsets: np.ndarray
    fill: np.ndarray

    @property
    def pages(self) -> np.ndarray:
        return self.offsets >> TARGET_PAGE_BITS

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True, slots=True)
class RamXbzrlePage:
    """A delta to apply onto the destination's current page (docs/qemu/ram.md §5.3)."""

    block: str
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class RamCompressedPage:
    """One independent zlib stream inflating to the page (docs/qemu/ram.md §6)."""

    block: str
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True, eq=False)
class RamVariableRun:
    """Consecutive XBZRLE or COMPRESS_PAGE records of one block, decoded as one event.

    Payload ``i`` (an XBZRLE delta or a zlib stream, by the event's type)
    is ``buf[starts[i]:starts[i] + lengths[i]]`` for the page at byte
    ``offsets[i]``; ``buf`` is the immutable received snapshot, so nothing
    is copied.
    """

    block: str
    offsets: np.ndarray
    buf: bytes
    starts: np.ndarray
    lengths: np.ndarray

    @property
    def pages(self) -> np.ndarray:
        return self.offsets >> TARGET_PAGE_BITS

    def payload(self, i: int) -> bytes:
        return self.buf[self.starts[i]:self.starts[i] + self.lengths[i]]

    def __len__(self) -> int:
        return len(self.offsets)


class RamXbzrleRun(RamVariableRun):
    __slots__ = ()


class RamCompressedRun(RamVariableRun):
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class RamEOS:
    pass


_PAGE_KINDS = (RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_XBZRLE,
               RAM_SAVE_FLAG_COMPRESS_PAGE)


@dataclass
class RamBodyDecoder:
    """Body decoder of ``ram`` sections for one channel.

    ``blocks`` maps the destination's RAMBlock names to their used_length;
    pages naming another block, or beyond it, are rejected as QEMU does.
    ``None`` (for inspection tools) adopts the list announced by MEM_SIZE.
    ``page_size_blocks`` names the blocks whose MEM_SIZE entry carries a page
    size (postcopy advised, postcopy-ram on, huge pages); ``ignore_shared``
    says that entries carry a GPA, and no page may name one of the
    ``ignored_blocks`` (QEMU's ramblock_is_ignored: the destination's shared
    blocks then); ``accept_compressed`` mirrors the
    destination's ``compress`` capability.  With ``variable_runs`` XBZRLE
    and COMPRESS_PAGE records come as :class:`RamXbzrleRun` /
    :class:`RamCompressedRun` events covering every following CONTINUE
    record of the same kind that is complete in the buffer (a loader then
    works on whole runs); without it, as one event per record.  Attributes
    may be changed between events (e.g. after POSTCOPY_ADVISE).
    """

    blocks: Mapping[str, int] | None = None
    accept_compressed: bool = False
    variable_runs: bool = False
    ignore_shared: bool = False
    ignored_blocks: Container[str] = ()
    page_size_blocks: Container[str] = ()
    version_id: int = RAM_SECTION_VERSION
    instance_ids: frozenset[int] = frozenset({0})
    last_block: str | None = field(default=None, init=False)

    def begin(self, kind: int, section: Section) -> None:
        if section.version_id != RAM_SECTION_VERSION:
            raise WireError(f"error while loading state for instance {section.instance_id:#x} "
                            f"of device '{section.idstr}': ram version {section.version_id} "
                            f"is not {RAM_SECTION_VERSION}")

    def decode(self, r: Reader) -> tuple[object, bool]:
        start = r.pos
        word = r.be64()
        flags = word & FLAGS_MASK
        offset = word & ~FLAGS_MASK
        kind = flags & ~RAM_SAVE_FLAG_CONTINUE
        if kind in _PAGE_KINDS:
            if kind == RAM_SAVE_FLAG_COMPRESS_PAGE and not self.accept_compressed:
                raise WireError("Received an unexpected compressed page")
            if flags & RAM_SAVE_FLAG_CONTINUE and kind in (RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE):
                r.pos = start
                return self._run(r, kind), False
            if self.variable_runs and kind in (RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_COMPRESS_PAGE):
                block = self._block(r, flags)
                self._check_offset(block, offset)
                ev = self._variable_run(r, kind, block, offset)
                self.last_block = block
                return ev, False
            block = self._block(r, flags)
            self._check_offset(block, offset)
            if kind == RAM_SAVE_FLAG_ZERO:
                fill = r.u8()
                ev = RamZeroPages(block, np.array([offset], np.int64), np.array([fill], np.uint8))
            elif kind == RAM_SAVE_FLAG_PAGE:
                r.need(TARGET_PAGE_SIZE)
                data = np.frombuffer(r.buf, np.uint8, TARGET_PAGE_SIZE, r.pos).reshape(1, -1)
                r.pos += TARGET_PAGE_SIZE
                ev = RamPages(block, np.array([offset], np.int64), data)
            elif kind == RAM_SAVE_FLAG_XBZRLE:
                ev = RamXbzrlePage(block, offset, self._xbzrle_payload(r))
            else:
                n = r.be32()
                if n > COMPRESS_BOUND:
                    raise WireError(f"Invalid compressed data length: {n}")
                ev = RamCompressedPage(block, offset, r.take(n))
            self.last_block = block
            return ev, False
        if kind == RAM_SAVE_FLAG_EOS:
            return RamEOS(), True
        if kind == RAM_SAVE_FLAG_MEM_SIZE:
            return self._mem_size(r, offset), False
        if flags & RAM_SAVE_FLAG_HOOK:
            raise WireError("RAM_SAVE_FLAG_HOOK (RDMA) received on a non-RDMA channel")
        raise WireError(f"Unknown combination of migration flags: {flags:#x}")

    def _block(self, r: Reader, flags: int) -> str:
        if flags & RAM_SAVE_FLAG_CONTINUE:
            if self.last_block is None:
                raise WireError("Ack, bad migration stream!")
            return self.last_block
        name = decode_name(r.str8(), "RAMBlock name")
        if self.blocks is None or name not in self.blocks:
            raise WireError(f"Can't find block {name}")
        if name in self.ignored_blocks:
            raise WireError(f"block {name} should not be migrated !")
        return name

    def _used_length(self, block: str) -> int:
        used = self.blocks.get(block) if self.blocks is not None else None
        if used is None:
            raise WireError(f"Can't find block {block}")
        return used

    def _check_offset(self, block: str, offset: int) -> None:
        if offset >= self._used_length(block):
            raise WireError(f"Illegal RAM offset {offset:x}")

    @staticmethod
    def _xbzrle_payload(r: Reader) -> bytes:
        if r.u8() != ENCODING_FLAG_XBZRLE:
            raise WireError("Failed to load XBZRLE page - wrong compression!")
        n = r.be16()
        if n > TARGET_PAGE_SIZE:
            raise WireError("Failed to load XBZRLE page - len overflow!")
        return r.take(n)

    def _variable_payload(self, r: Reader, kind: int) -> int:
        """Reads the payload's length header; returns the payload length (bounds checked)."""
        if kind == RAM_SAVE_FLAG_XBZRLE:
            if r.u8() != ENCODING_FLAG_XBZRLE:
                raise WireError("Failed to load XBZRLE page - wrong compression!")
            n = r.be16()
            if n > TARGET_PAGE_SIZE:
                raise WireError("Failed to load XBZRLE page - len overflow!")
        else:
            n = r.be32()
            if n > COMPRESS_BOUND:
                raise WireError(f"Invalid compressed data length: {n}")
        return n

    def _variable_run(self, r: Reader, kind: int, block: str, offset: int) -> RamVariableRun:
        """The record at ``r`` (header word read) and every complete CONTINUE record after it.

        Records of variable length are chained, so this walks them one by
        one with ``struct`` — a short loop per record, no per-byte work.
        """
        n = self._variable_payload(r, kind)
        r.need(n)
        offsets, starts, lengths = [offset], [r.pos], [n]
        r.pos += n
        used = self._used_length(block)
        want = kind | RAM_SAVE_FLAG_CONTINUE
        xbzrle = kind == RAM_SAVE_FLAG_XBZRLE
        head = _XBZRLE_HEAD if xbzrle else _COMPRESSED_HEAD
        limit = TARGET_PAGE_SIZE if xbzrle else COMPRESS_BOUND
        buf, end, pos = r.buf, r.end, r.pos
        while end - pos >= head.size:
            word, *rest = head.unpack_from(buf, pos)
            if word & FLAGS_MASK != want:
                break
            n = rest[-1]
            if (xbzrle and rest[0] != ENCODING_FLAG_XBZRLE) or n > limit:
                r.pos = pos + 8
                self._variable_payload(r, kind)
            if pos + head.size + n > end:
                break
            address = word & ~FLAGS_MASK
            if address >= used:
                raise WireError(f"Illegal RAM offset {address:x}")
            offsets.append(address)
            pos += head.size
            starts.append(pos)
            lengths.append(n)
            pos += n
        r.pos = pos
        cls = RamXbzrleRun if kind == RAM_SAVE_FLAG_XBZRLE else RamCompressedRun
        return cls(block, np.array(offsets, np.int64), buf, np.array(starts, np.int64),
                   np.array(lengths, np.int64))

    def _run(self, r: Reader, kind: int) -> object:
        """All complete CONTINUE records of ``kind`` from ``r.pos``, as one event.

        The first few headers are read with struct: where zero and non-zero
        pages interleave, runs are short and numpy's per-call cost would
        dominate.  A run still going after those is scanned with numpy over
        the header column, in windows doubling in size, so finding a run
        costs time proportional to its length whatever the buffer holds.
        """
        block = self.last_block
        if block is None:
            raise WireError("Ack, bad migration stream!")
        stride = PAGE_RECORD if kind == RAM_SAVE_FLAG_PAGE else ZERO_RECORD
        avail = (r.end - r.pos) // stride
        if avail == 0:
            raise Short(r.pos + stride)
        used = self._used_length(block)
        want = kind | RAM_SAVE_FLAG_CONTINUE
        buf, pos = r.buf, r.pos
        words = []
        for i in range(min(avail, _SCALAR_SCAN)):
            (word,) = _BE64.unpack_from(buf, pos + i * stride)
            if word & FLAGS_MASK != want:
                break
            words.append(word & ~FLAGS_MASK)
        count = len(words)
        if count == _SCALAR_SCAN and avail > count:
            headers = np.ndarray((avail,), dtype=">u8", buffer=buf, offset=pos,
                                 strides=(stride,))
            mask = np.uint64(FLAGS_MASK)
            window = _SCALAR_SCAN
            while count < avail:
                seg = headers[count:count + window]
                bad = np.flatnonzero((seg & mask) != np.uint64(want))
                if bad.size:
                    count += int(bad[0])
                    break
                count += len(seg)
                window *= 2
            raw = headers[:count] & ~mask
            if int(raw.max()) >= used:
                raise WireError(f"Illegal RAM offset {int(raw[raw >= used][0]):x}")
            offsets = raw.astype(np.int64)
        else:
            for w in words:
                if w >= used:
                    raise WireError(f"Illegal RAM offset {w:x}")
            offsets = np.array(words, dtype=np.int64)
        base = pos + 8
        r.pos = pos + count * stride
        if kind == RAM_SAVE_FLAG_PAGE:
            data = np.ndarray((count, TARGET_PAGE_SIZE), dtype=np.uint8, buffer=buf,
                              offset=base, strides=(stride, 1))
            return RamPages(block, offsets, data)
        fill = np.ndarray((count,), dtype=np.uint8, buffer=buf, offset=base, strides=(stride,))
        return RamZeroPages(block, offsets, fill)

    def _mem_size(self, r: Reader, total: int) -> RamMemSize:
        infos: list[RamBlockInfo] = []
        left = total
        while left:
            if len(infos) >= MAX_RAM_BLOCKS:
                raise WireError(f"MEM_SIZE lists more than {MAX_RAM_BLOCKS} RAM blocks")
            name = decode_name(r.str8(), "RAMBlock name")
            length = r.be64()
            page_size = r.be64() if name in self.page_size_blocks else None
            gpa = r.be64() if self.ignore_shared else None
            if self.blocks is not None:
                if name not in self.blocks:
                    raise WireError(f'Unknown ramblock "{name}", cannot accept migration')
                if length != self.blocks[name]:
                    raise WireError(f"Size mismatch: {name}: {length:#x} != "
                                    f"{self.blocks[name]:#x}: Invalid argument")
            if length > left:
                raise WireError(f"MEM_SIZE: RAM block lengths exceed the announced total "
                                f"{total:#x}")
            left -= length
            infos.append(RamBlockInfo(name, length, page_size, gpa))
        if self.blocks is None:
            self.blocks = {b.idstr: b.used_length for b in infos}
        return RamMemSize(tuple(infos))


class RecordStream:
    """Feeds a body decoder directly, for channels without section framing.

    The postcopy preempt channel carries bare RAM records ending with an
    EOS; ``next_event()`` returns the body decoder's events, NEED_DATA, and
    after the EOS only NEED_DATA.
    """

    def __init__(self, body: RamBodyDecoder) -> None:
        self.body = body
        self._in = InputBuffer()
        self.finished = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._in.feed(data)

    def next_event(self) -> object:
        buf = self._in
        while not self.finished:
            if not buf.snapshot():
                return NEED_DATA
            r = Reader(buf.data, buf.pos, len(buf.data))
            try:
                ev, done = self.body.decode(r)
            except Short as short:
                buf.need = short.end - buf.pos
                continue
            buf.advance(r.pos)
            self.finished = done
            return ev
        if buf.available():
            raise WireError("data after the end of the RAM record stream")
        return NEED_DATA
