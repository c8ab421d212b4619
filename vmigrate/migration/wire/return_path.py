"""Return-path messages, destination -> source (spec: docs/qemu/stream.md §10, docs/qemu/postcopy.md §7).

The destination writes them with the encoders below (``shut(0)`` at the end
of every migration that opened a return path).  The source's reader thread
feeds what it receives to :class:`ReturnPathDecoder`::

    rp = ReturnPathDecoder(blocks={"ram0": size})
    rp.feed(sock.recv(4096))
    while (ev := rp.next_event()) is not NEED_DATA:
        ...                     # RpPong, RpReqPages(block, start, length), ...

A RECV_BITMAP message is followed, outside its length, by the received
bitmap blob; the decoder reads both and returns one :class:`RpRecvBitmap`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from vmigrate.migration.wire.buffer import NEED_DATA, InputBuffer, Reader, Short, decode_name
from vmigrate.migration.wire.errors import WireError
from vmigrate.migration.wire.stream import str8

MIG_RP_MSG_INVALID = 0
MIG_RP_MSG_SHUT = 1
MIG_RP_MSG_PONG = 2
MIG_RP_MSG_REQ_PAGES_ID = 3
MIG_RP_MSG_REQ_PAGES = 4
MIG_RP_MSG_RECV_BITMAP = 5
MIG_RP_MSG_RESUME_ACK = 6
MIG_RP_MSG_MAX = 7

#: name and fixed payload length (None = variable) per message type.
RP_MESSAGES: dict[int, tuple[str, int | None]] = {
    MIG_RP_MSG_SHUT: ("SHUT", 4),
    MIG_RP_MSG_PONG: ("PONG", 4),
    MIG_RP_MSG_REQ_PAGES_ID: ("REQ_PAGES_ID", None),
    MIG_RP_MSG_REQ_PAGES: ("REQ_PAGES", 12),
    MIG_RP_MSG_RECV_BITMAP: ("RECV_BITMAP", None),
    MIG_RP_MSG_RESUME_ACK: ("RESUME_ACK", 4),
}
MAX_RP_PAYLOAD = 512
RECV_BITMAP_ENDING = 0x0123456789ABCDEF
#: Largest bitmap accepted when the block sizes are unknown (covers 2 TiB).
MAX_BITMAP_BYTES = 64 << 20
HOST_PAGE_SIZE = 4096
TARGET_PAGE_BITS = 12

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


# -- encoders ------------------------------------------------------------------

def message(msg_type: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_RP_PAYLOAD:
        raise ValueError("return-path payload longer than 512 bytes")
    return _BE16.pack(msg_type) + _BE16.pack(len(payload)) + payload


def shut(value: int = 0) -> bytes:
    """0 = the destination finished OK; non-zero = it failed."""
    return message(MIG_RP_MSG_SHUT, _BE32.pack(value))


def pong(value: int) -> bytes:
    return message(MIG_RP_MSG_PONG, _BE32.pack(value))


def req_pages_id(idstr: str, start: int, length: int) -> bytes:
    return message(MIG_RP_MSG_REQ_PAGES_ID,
                   _BE64.pack(start) + _BE32.pack(length) + str8(idstr))


def req_pages(start: int, length: int) -> bytes:
    return message(MIG_RP_MSG_REQ_PAGES, _BE64.pack(start) + _BE32.pack(length))


def resume_ack(value: int = 1) -> bytes:
    return message(MIG_RP_MSG_RESUME_ACK, _BE32.pack(value))


def bitmap_size(used_length: int) -> int:
    """Bytes of a block's received bitmap: one bit per page, rounded up to 8 bytes."""
    nbits = used_length >> TARGET_PAGE_BITS
    return ((nbits + 7) // 8 + 7) // 8 * 8


def recv_bitmap(idstr: str, received: np.ndarray) -> bytes:
    """RECV_BITMAP message plus blob; ``received`` is one bool per target page."""
    bits = np.asarray(received, dtype=bool)
    packed = np.packbits(bits, bitorder="little").tobytes()
    size = ((len(bits) + 7) // 8 + 7) // 8 * 8
    return (message(MIG_RP_MSG_RECV_BITMAP, str8(idstr)) + _BE64.pack(size)
            + packed.ljust(size, b"\0") + _BE64.pack(RECV_BITMAP_ENDING))


# -- events ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RpShut:
    value: int


@dataclass(frozen=True, slots=True)
class RpColoReady:
    """A COLO secondary's CHECKPOINT_READY (be32 0) read where an RP header was expected."""


@dataclass(frozen=True, slots=True)
class RpPong:
    value: int


@dataclass(frozen=True, slots=True)
class RpReqPages:
    """Pages requested by a postcopy destination; ``block`` is resolved for REQ_PAGES too."""

    block: str
    start: int
    length: int
    with_id: bool


@dataclass(frozen=True, slots=True, eq=False)
class RpRecvBitmap:
    block: str
    bitmap: bytes

    def received(self, npages: int) -> np.ndarray:
        """One bool per target page (little-endian bit order on the wire)."""
        bits = np.unpackbits(np.frombuffer(self.bitmap, np.uint8), bitorder="little")
        return bits[:npages].astype(bool)


@dataclass(frozen=True, slots=True)
class RpResumeAck:
    value: int


# -- decoder --------------------------------------------------------------------

@dataclass
class ReturnPathDecoder:
    """Incremental decoder of the return path as QEMU's source reads it.

    ``blocks`` (RAMBlock name -> used_length), when given, validates block
    names and the received-bitmap size.  ``page_size`` is the source host
    page size that page requests must be aligned to.
    """

    blocks: Mapping[str, int] | None = None
    page_size: int = HOST_PAGE_SIZE
    #: x-colo: a QEMU 7.2 secondary sends COLO's first message (CHECKPOINT_READY, be32 0) on
    #: the return path without a SHUT; its four zero bytes read as type 0 (INVALID), length 0.
    colo: bool = False
    _in: InputBuffer = field(default_factory=InputBuffer, init=False, repr=False)
    _last_block: str | None = field(default=None, init=False, repr=False)
    _error: WireError | None = field(default=None, init=False, repr=False)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._in.feed(data)

    def next_event(self) -> object:
        if self._error is not None:
            raise self._error
        buf = self._in
        try:
            while buf.snapshot():
                r = Reader(buf.data, buf.pos, len(buf.data))
                try:
                    ev = self._message(r)
                except Short as short:
                    buf.need = short.end - buf.pos
                    continue
                buf.advance(r.pos)
                return ev
            return NEED_DATA
        except WireError as err:
            self._error = err
            raise

    def _message(self, r: Reader) -> object:
        msg_type = r.be16()
        length = r.be16()
        if self.colo and msg_type == MIG_RP_MSG_INVALID and length == 0:
            return RpColoReady()
        if msg_type not in RP_MESSAGES:
            raise WireError(f"RP: Received invalid message {msg_type:#06x} length {length:#06x}")
        name, fixed = RP_MESSAGES[msg_type]
        if (fixed is not None and length != fixed) or length > MAX_RP_PAYLOAD:
            raise WireError(f"RP: Received '{name}' message ({msg_type:#06x}) with incorrect "
                            f"length {length} expecting {fixed if fixed is not None else -1}")
        payload = Reader(r.take(length), 0, length)
        if msg_type == MIG_RP_MSG_SHUT:
            return RpShut(payload.be32())
        if msg_type == MIG_RP_MSG_PONG:
            return RpPong(payload.be32())
        if msg_type == MIG_RP_MSG_RESUME_ACK:
            value = payload.be32()
            if value != 1:
                raise WireError(f"migrate_handle_rp_resume_ack: illegal resume_ack value {value}")
            return RpResumeAck(value)
        if msg_type in (MIG_RP_MSG_REQ_PAGES, MIG_RP_MSG_REQ_PAGES_ID):
            return self._req_pages(msg_type, length, payload)
        return self._recv_bitmap(r, length, payload)

    def _req_pages(self, msg_type: int, length: int, p: Reader) -> RpReqPages:
        if msg_type == MIG_RP_MSG_REQ_PAGES_ID:
            expected = 13 + (p.buf[12] if length >= 13 else 0)
            if length != expected:
                raise WireError(f"RP: Req_Page_id with length {length} expecting {expected}")
        start = p.be64()
        size = p.be32()
        if msg_type == MIG_RP_MSG_REQ_PAGES_ID:
            block = self._block(decode_name(p.str8(), "RAMBlock name"),
                                "ram_save_queue_pages no block")
        elif self._last_block is None:
            raise WireError("ram_save_queue_pages no previous block")
        else:
            block = self._last_block
        if start % self.page_size or size % self.page_size:
            raise WireError(f"migrate_handle_rp_req_pages: Misaligned page request, "
                            f"start: {start:x} len: {size}")
        if self.blocks is not None and start + size > self.blocks[block]:
            raise WireError(f"ram_save_queue_pages request overrun start={start:x} "
                            f"len={size:x} blocklen={self.blocks[block]:x}")
        self._last_block = block
        return RpReqPages(block, start, size, msg_type == MIG_RP_MSG_REQ_PAGES_ID)

    def _block(self, name: str, what: str) -> str:
        if self.blocks is not None and name not in self.blocks:
            raise WireError(f"{what} '{name}'")
        return name

    def _recv_bitmap(self, r: Reader, length: int, p: Reader) -> RpRecvBitmap:
        if length < 1 or p.buf[0] + 1 > length:
            raise WireError("source_return_path_thread: missing block name")
        block = self._block(decode_name(p.str8(), "RAMBlock name"),
                            "migrate_handle_rp_recv_bitmap: invalid block name")
        size = r.be64()
        expected = bitmap_size(self.blocks[block]) if self.blocks is not None else None
        if expected is not None and size != expected:
            raise WireError(f"ram_dirty_bitmap_reload: ramblock '{block}' bitmap size "
                            f"mismatch ({size:#x} != {expected:#x})")
        if size > MAX_BITMAP_BYTES:
            raise WireError(f"ram_dirty_bitmap_reload: ramblock '{block}' bitmap of "
                            f"{size} bytes is too large")
        bitmap = r.take(size)
        end = r.be64()
        if end != RECV_BITMAP_ENDING:
            raise WireError(f"ram_dirty_bitmap_reload: ramblock '{block}' end mark "
                            f"incorrect: {end:#x}")
        return RpRecvBitmap(block, bitmap)
