"""Multifd channel packets (spec: docs/qemu/multifd.md §2-§5), pure code over bytes.

A multifd channel starts with a 64-byte initial packet naming its id, then
carries packets: a 1344-byte header (the full 128-entry offset array is
always sent) and, if the packet has pages, their payload::

    sock.sendall(initial_packet(uuid, 0))
    head = packet_header(FLAG_SYNC, 0, 0, packet_num, None, ())
    ...
    info = decode_packet_header(received_1344_bytes, {"ram": used_length})

The payload is the raw pages (``none``) or a slice of one compression
stream that lives as long as the channel (``zlib``: sync-flushed per packet;
``zstd``: one frame, block-flushed per packet).  :class:`PayloadEncoder` and
:class:`PayloadDecoder` keep that per-channel state; both call into zlib or
zstd on whole packets, which release the GIL.  Decompression never yields
more than the header's ``normal_pages`` pages (plus one byte to detect an
excess): a few KiB of hostile zstd can otherwise expand to gigabytes.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
import zlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import zstandard

from vmigrate.migration.wire.errors import WireError

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
INITIAL_PACKET_SIZE = 64
PAGE_SIZE = 4096
#: 512 KiB per packet: the offset array always has this many entries.
PAGES_PER_PACKET = 128
HEADER_SIZE = 64 + 256 + 8 * PAGES_PER_PACKET
RAMBLOCK_FIELD = 256
#: The most page bytes one packet carries.
PACKET_BYTES = PAGES_PER_PACKET * PAGE_SIZE
#: The destination's receive buffer for compressed payloads (2 x 512 KiB in QEMU).
MAX_COMPRESSED_PAYLOAD = 2 * PACKET_BYTES

FLAG_SYNC = 0x1
FLAG_ZLIB = 0x2
FLAG_ZSTD = 0x4
COMPRESSION_MASK = 0xE
METHOD_FLAGS = {"none": 0x0, "zlib": FLAG_ZLIB, "zstd": FLAG_ZSTD}

_INIT = struct.Struct(">II16sB7x32x")
_HEAD = struct.Struct(">IIIIIIQ32x256s")


# -- initial packet -----------------------------------------------------------------------

def initial_packet(uuid: bytes, channel_id: int) -> bytes:
    """The first 64 bytes on channel ``channel_id``; ``uuid`` is the source's (16 bytes, zeros if unset)."""
    if len(uuid) != 16 or not 0 <= channel_id <= 255:
        raise ValueError("uuid must be 16 bytes and the channel id a u8")
    return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, uuid, channel_id)


def decode_initial_packet(data: bytes, local_uuid: bytes, channels: int) -> int:
    """The channel id, after QEMU's checks (magic, version, uuid, id range).

    QEMU 7.2 accepts ids up to ``channels`` inclusive (an off-by-one that
    would index past its array); ids must be 0..channels-1 here.
    """
    magic, version, uuid, channel_id = _INIT.unpack(data)
    if magic != MULTIFD_MAGIC:
        raise WireError(f"multifd: received packet magic {magic:x} expected {MULTIFD_MAGIC:x}")
    if version != MULTIFD_VERSION:
        raise WireError(f"multifd: received packet version {version} expected {MULTIFD_VERSION}")
    if uuid != local_uuid:
        raise WireError(f"multifd: received uuid '{uuidlib.UUID(bytes=uuid)}' and expected uuid "
                        f"'{uuidlib.UUID(bytes=local_uuid)}' for channel {channel_id}")
    if channel_id >= channels:
        raise WireError(f"multifd: received channel id {channel_id} expected below {channels}")
    return channel_id


# -- packet header ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, eq=False)
class PacketHeader:
    flags: int
    pages_alloc: int
    normal_pages: int
    next_packet_size: int
    packet_num: int
    #: Block of the pages; None in a packet without pages (the field may be stale there).
    ramblock: str | None
    #: Byte offsets of the pages inside the block (int64).
    offsets: np.ndarray

    @property
    def sync(self) -> bool:
        return bool(self.flags & FLAG_SYNC)


def packet_header(flags: int, normal_pages: int, next_packet_size: int, packet_num: int,
                  ramblock: str | None, offsets) -> bytes:
    """A 1344-byte header; offsets beyond ``normal_pages`` are zero."""
    offsets = np.asarray(offsets, dtype=np.uint64)
    if len(offsets) != normal_pages or normal_pages > PAGES_PER_PACKET:
        raise ValueError("offsets must list exactly normal_pages (<= 128) entries")
    name = ramblock.encode("ascii") if ramblock else b""
    if len(name) >= RAMBLOCK_FIELD:
        raise ValueError("RAMBlock name too long for a multifd packet")
    out = bytearray(HEADER_SIZE)
    _HEAD.pack_into(out, 0, MULTIFD_MAGIC, MULTIFD_VERSION, flags, PAGES_PER_PACKET, normal_pages,
                    next_packet_size, packet_num, name)
    if normal_pages:
        np.frombuffer(out, dtype=">u8", count=normal_pages, offset=_HEAD.size)[:] = offsets
    return bytes(out)


def decode_packet_header(data: bytes, blocks: Mapping[str, int]) -> PacketHeader:
    """Parse and check a header as QEMU's multifd_recv_unfill_packet does.

    ``blocks`` maps RAMBlock names to used lengths.  Stale ``ramblock`` and
    ``next_packet_size`` values of packets without pages are ignored.
    """
    if len(data) != HEADER_SIZE:
        raise ValueError(f"a multifd header is {HEADER_SIZE} bytes")
    magic, version, flags, pages_alloc, normal, size, packet_num, raw = _HEAD.unpack_from(data)
    if magic != MULTIFD_MAGIC:
        raise WireError(f"multifd: received packet magic {magic:x} and expected magic {MULTIFD_MAGIC:x}")
    if version != MULTIFD_VERSION:
        raise WireError(f"multifd: received packet version {version} and expected version {MULTIFD_VERSION}")
    if pages_alloc > PAGES_PER_PACKET:
        raise WireError(f"multifd: received packet with size {pages_alloc} and expected a size of "
                        f"{PAGES_PER_PACKET}")
    if normal > pages_alloc:
        raise WireError(f"multifd: received packet with {normal} pages and expected maximum pages "
                        f"are {pages_alloc}")
    if normal == 0:
        return PacketHeader(flags, pages_alloc, 0, size, packet_num, None, np.zeros(0, np.int64))
    name = raw[:RAMBLOCK_FIELD - 1].split(b"\0", 1)[0].decode("ascii", "replace")
    used = blocks.get(name)
    if used is None:
        raise WireError(f"multifd: unknown ram block {name}")
    raw_offsets = np.frombuffer(data, dtype=">u8", count=normal, offset=_HEAD.size).astype(np.uint64)
    beyond = raw_offsets > np.uint64(used - PAGE_SIZE)
    if beyond.any():
        raise WireError(f"multifd: offset too long {int(raw_offsets[beyond][0])} (max {used:x})")
    offsets = raw_offsets.astype(np.int64)
    unaligned = (offsets & (PAGE_SIZE - 1)) != 0
    if unaligned.any():
        raise WireError(f"multifd: offset {int(offsets[unaligned][0]):#x} is not page aligned")
    return PacketHeader(flags, pages_alloc, normal, size, packet_num, name, offsets)


# -- payloads -----------------------------------------------------------------------------

class PayloadEncoder:
    """One channel's payload encoder: pages in, wire payload out.

    ``none`` returns the pages as they are; ``zlib`` and ``zstd`` keep one
    stream for the channel's lifetime (never reset, never finished), so only
    the first packet carries the zlib header / zstd frame header.
    """

    def __init__(self, method: str, level: int) -> None:
        if method not in METHOD_FLAGS:
            raise ValueError(f"unknown multifd compression '{method}'")
        self.method = method
        self.flag = METHOD_FLAGS[method]
        if method == "zlib":
            self._z = zlib.compressobj(level, zlib.DEFLATED, 15)
        elif method == "zstd":
            self._z = zstandard.ZstdCompressor(level=level).compressobj()

    def encode(self, buffers: list) -> list:
        """One packet's payload, as chunks to write in order, from its pages given as buffers (runs
        of guest RAM) in wire order.

        Each buffer goes into the stream as it is and the chunks go out as
        they are, never joined: at zstd's speed on incompressible pages a
        join is a copy as long as the compression itself, made holding the
        interpreter lock.  The one flush per packet makes the output the
        packet a single buffer would give, as far as the decoder can tell.
        """
        if self.method == "none":
            return [memoryview(b).cast("B") for b in buffers]
        out = [self._z.compress(b) for b in buffers]
        out.append(self._z.flush(zlib.Z_SYNC_FLUSH if self.method == "zlib" else zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        return out


class _PacketSink:
    """Where the zstd stream writer puts one packet's output, refusing bytes past the packet's pages.

    QEMU's zstd_recv_pages (migration/multifd-zstd.c) decompresses into the
    packet's page buffers and so never writes past them; raising here stops
    zstandard's write loop the same way, before it produces the rest.
    """

    def __init__(self, channel_id: int) -> None:
        self.id = channel_id
        self.expected = 0
        self.size = 0
        self.chunks: list[bytes] = []

    def start(self, expected: int) -> None:
        self.expected = expected
        self.size = 0
        self.chunks = []

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.expected:
            raise WireError(f"multifd {self.id}: packet size received more than {self.expected} "
                            f"size expected {self.expected}")
        self.chunks.append(data)
        return len(data)

    def take(self) -> bytes:
        out = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks = []
        return out


class PayloadDecoder:
    """One channel's payload decoder: exactly ``normal_pages`` pages from each packet."""

    def __init__(self, method: str, channel_id: int) -> None:
        if method not in METHOD_FLAGS:
            raise ValueError(f"unknown multifd compression '{method}'")
        self.method = method
        self.flag = METHOD_FLAGS[method]
        self.id = channel_id
        if method == "zlib":
            self._z = zlib.decompressobj()
        elif method == "zstd":
            self._sink = _PacketSink(channel_id)
            # One byte more than a packet's pages: a legitimate packet's output is one
            # chunk that never fills the buffer, so none stays behind inside zstd.
            self._z = zstandard.ZstdDecompressor().stream_writer(self._sink, write_size=PACKET_BYTES + 1)

    def check_flags(self, header: PacketHeader) -> None:
        got = header.flags & COMPRESSION_MASK
        if got != self.flag:
            raise WireError(f"multifd {self.id}: flags received {got:x} flags expected {self.flag:x}")

    def payload_size(self, header: PacketHeader) -> int:
        """Bytes of payload that follow the header."""
        if self.method == "none":
            return header.normal_pages * PAGE_SIZE
        if header.next_packet_size > MAX_COMPRESSED_PAYLOAD:
            raise WireError(f"multifd {self.id}: packet payload of {header.next_packet_size} bytes "
                            f"exceeds {MAX_COMPRESSED_PAYLOAD}")
        return header.next_packet_size

    def decode(self, header: PacketHeader, payload) -> bytes | memoryview:
        """The pages' bytes (``normal_pages * 4096``)."""
        expected = header.normal_pages * PAGE_SIZE
        if self.method == "none":
            return payload
        try:
            if self.method == "zlib":
                out = self._z.decompress(payload, expected + 1)
            else:
                self._sink.start(expected)
                self._z.write(payload)
                out = self._sink.take()
        except (zlib.error, zstandard.ZstdError) as err:
            raise WireError(f"multifd {self.id}: {self.method} stream error: {err}") from None
        if len(out) != expected:
            raise WireError(f"multifd {self.id}: packet size received {len(out)} size expected {expected}")
        return out
