"""Records of the ``dirty-bitmap`` section (QEMU 7.2's migration/block-dirty-bitmap.c).

Every chunk starts with the flags (one byte from a 7.2 sender; a reader
takes a second byte, then two more, while bit 0x80 says more follow), then
the node alias and the bitmap alias as counted strings, each only when it
differs from the previous chunk's.  START carries the be32 granularity and
the bitmap flags; BITS a be64 start sector, a be32 sector count and, unless
ZEROES, a be64 buffer size and the serialised bitmap; COMPLETE nothing.
docs/qemu/block.md §2 has the table.

The serialised bitmap is HBitmap's (util/hbitmap.c hbitmap_serialize_part):
the bottom level's unsigned longs covering the range, each little-endian —
bit *i* of the range's first word is bit *i* of the first byte, which is
exactly :func:`numpy.packbits` with ``bitorder="little"`` over whole 64-bit
words.  The sender rounds the buffer up to 4 longs (32 bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from vmigrate.migration.wire.buffer import Reader, decode_name
from vmigrate.migration.wire.errors import WireError

FLAG_EOS = 0x01
FLAG_ZEROES = 0x02
FLAG_BITMAP_NAME = 0x04
FLAG_DEVICE_NAME = 0x08
FLAG_START = 0x10
FLAG_COMPLETE = 0x20
FLAG_BITS = 0x40
FLAG_EXTRA = 0x80
#: Every flag a 7.2 chunk may carry; anything else has a payload this reader cannot skip.
KNOWN_FLAGS = 0x7F

START_ENABLED = 0x01
START_PERSISTENT = 0x02
START_RESERVED = 0xF8

SECTOR_BITS = 9
#: Bytes of serialised bitmap per BITS chunk (CHUNK_SIZE): 8192 bits.
CHUNK_BYTES = 1 << 10
#: The reader's bound on one BITS buffer, as dirty_bitmap_load_bits.
MAX_BUFFER = 10 * CHUNK_BYTES
#: send_bitmap_bits aligns buffers to 4 * sizeof(long).
BUFFER_ALIGN = 32

DIRTY_BITMAP_SECTION_VERSION = 1

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


# -- the bitmap layout ---------------------------------------------------------------

def serialization_size(granularity: int, offset: int, length: int) -> int:
    """hbitmap_serialization_size: bytes of the 64-bit words covering [offset, offset+length)."""
    if length <= 0:
        return 0
    first = offset // granularity // 64
    last = (offset + length - 1) // granularity // 64
    return (last - first + 1) * 8


def serialize_part(bits: np.ndarray, granularity: int, offset: int, length: int) -> bytes:
    """The bytes hbitmap_serialize_part writes for [offset, offset+length), one bool per bit in *bits*."""
    size = serialization_size(granularity, offset, length)
    first = offset // granularity // 64 * 64
    window = np.zeros(size * 8, dtype=bool)
    part = bits[first:first + size * 8]
    window[:len(part)] = part
    return np.packbits(window, bitorder="little").tobytes()


def deserialize_part(bits: np.ndarray, granularity: int, offset: int, length: int, buf: bytes) -> None:
    """hbitmap_deserialize_part: overwrite the words covering the range from *buf*."""
    size = serialization_size(granularity, offset, length)
    first = offset // granularity // 64 * 64
    unpacked = np.unpackbits(np.frombuffer(buf, dtype=np.uint8, count=size), bitorder="little").astype(bool)
    end = min(len(bits), first + size * 8)
    bits[first:end] = unpacked[:end - first]


def deserialize_zeroes(bits: np.ndarray, granularity: int, offset: int, length: int) -> None:
    size = serialization_size(granularity, offset, length)
    first = offset // granularity // 64 * 64
    bits[first:first + size * 8] = False


def check_range(nbits: int, granularity: int, offset: int, length: int) -> str | None:
    """Why a chunk's range cannot be applied to a bitmap of *nbits* bits (serialization_chunk's
    assertions, which a hostile stream must not reach), or None."""
    if length <= 0:
        return None
    if offset % (64 * granularity):
        return f"bitmap chunk at {offset} is not aligned to {64 * granularity} bytes"
    if (offset + length - 1) // granularity >= nbits:
        return f"bitmap chunk [{offset}, +{length}) is beyond the bitmap"
    return None


# -- encoder -------------------------------------------------------------------------

@dataclass
class HeaderState:
    """What the previous chunk named: names are sent only when they change (send_bitmap_header)."""

    node: str | None = None
    bitmap: str | None = None


def _alias(name: str) -> bytes:
    raw = name.encode()
    if len(raw) > 255:
        raise ValueError(f"a migrated name is at most 255 bytes: {name!r}")
    return bytes((len(raw),)) + raw


def header(state: HeaderState, flags: int, node: str, bitmap: str) -> bytes:
    """A chunk header for *node*/*bitmap*, naming them where they changed since the last chunk.

    Identity is by (node, bitmap) pair, as QEMU compares the objects: a
    bitmap of the same name on another node is named again.
    """
    if node != state.node:
        state.node = node
        state.bitmap = None
        flags |= FLAG_DEVICE_NAME
    if bitmap != state.bitmap:
        state.bitmap = bitmap
        flags |= FLAG_BITMAP_NAME
    out = bytes((flags,))
    if flags & FLAG_DEVICE_NAME:
        out += _alias(node)
    if flags & FLAG_BITMAP_NAME:
        out += _alias(bitmap)
    return out


def start(state: HeaderState, node: str, bitmap: str, granularity: int, start_flags: int) -> bytes:
    return header(state, FLAG_START, node, bitmap) + _BE32.pack(granularity) + bytes((start_flags,))


def bits(state: HeaderState, node: str, bitmap: str, start_sector: int, nr_sectors: int,
         data: bytes | None) -> bytes:
    """A BITS chunk; *data* None (or all zero) becomes ZEROES without a buffer."""
    if data is not None and not any(data):
        data = None
    flags = FLAG_BITS | (FLAG_ZEROES if data is None else 0)
    out = header(state, flags, node, bitmap) + _BE64.pack(start_sector) + _BE32.pack(nr_sectors)
    if data is None:
        return out
    padded = -len(data) % BUFFER_ALIGN
    return out + _BE64.pack(len(data) + padded) + data + bytes(padded)


def complete(state: HeaderState, node: str, bitmap: str) -> bytes:
    return header(state, FLAG_COMPLETE, node, bitmap)


def eos() -> bytes:
    return bytes((FLAG_EOS,))


# -- decoder -------------------------------------------------------------------------

@dataclass(frozen=True)
class BitmapChunk:
    """One chunk; *node* and *bitmap* are the aliases it named (None: the previous chunk's)."""

    flags: int
    node: str | None
    bitmap: str | None


@dataclass(frozen=True)
class BitmapStart(BitmapChunk):
    granularity: int = 0
    start_flags: int = 0


@dataclass(frozen=True)
class BitmapBits(BitmapChunk):
    start_sector: int = 0
    nr_sectors: int = 0
    #: The serialised words (padding included), None for ZEROES.
    data: bytes | None = None

    @property
    def offset(self) -> int:
        return self.start_sector << SECTOR_BITS

    @property
    def length(self) -> int:
        return self.nr_sectors << SECTOR_BITS


@dataclass(frozen=True)
class BitmapComplete(BitmapChunk):
    pass


@dataclass(frozen=True)
class BitmapEOS:
    pass


class DirtyBitmapBodyDecoder:
    """Body decoder of ``dirty-bitmap`` sections: one chunk per event, EOS ends the body."""

    version_id = DIRTY_BITMAP_SECTION_VERSION

    def begin(self, kind: int, section) -> None:
        if section.version_id != DIRTY_BITMAP_SECTION_VERSION:
            raise WireError(f"savevm: unsupported version {section.version_id} for '{section.idstr}' "
                            f"v{DIRTY_BITMAP_SECTION_VERSION}")

    @staticmethod
    def _flags(r: Reader) -> tuple[int, int]:
        """qemu_get_bitmap_flags: 1, 2 or 4 bytes, the first byte the most significant; also
        where the 0x80 "more follow" markers ended up."""
        flags, markers = r.u8(), 0
        if flags & FLAG_EXTRA:
            flags, markers = flags << 8 | r.u8(), FLAG_EXTRA << 8
            if flags & FLAG_EXTRA:
                flags, markers = flags << 16 | r.be16(), (markers | FLAG_EXTRA) << 16
        return flags, markers

    def decode(self, r: Reader) -> tuple[object, bool]:
        flags, markers = self._flags(r)
        if flags & ~(KNOWN_FLAGS | markers):
            raise WireError(f"Unknown flags in migrated dirty bitmap chunk: {flags:#x}")
        done = bool(flags & FLAG_EOS)
        node = decode_name(r.str8(), "node alias") if flags & FLAG_DEVICE_NAME else None
        bitmap = decode_name(r.str8(), "bitmap alias") if flags & FLAG_BITMAP_NAME else None
        if flags & FLAG_START:
            granularity = r.be32()
            return BitmapStart(flags, node, bitmap, granularity, r.u8()), done
        if flags & FLAG_COMPLETE:
            return BitmapComplete(flags, node, bitmap), done
        if flags & FLAG_BITS:
            start_sector = r.be64()
            nr_sectors = r.be32()
            data = None
            if not flags & FLAG_ZEROES:
                size = r.be64()
                if size > MAX_BUFFER:
                    raise WireError("Bitmap migration stream buffer allocation request is too large")
                data = r.take(size)
            return BitmapBits(flags, node, bitmap, start_sector, nr_sectors, data), done
        if done and flags == FLAG_EOS:
            return BitmapEOS(), True
        return BitmapChunk(flags, node, bitmap), done
