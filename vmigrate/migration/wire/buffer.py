"""Input buffering shared by the incremental decoders.

Decoders here follow h11's shape: ``feed()`` bytes in any chunking, then call
``next_event()`` until it returns :data:`NEED_DATA`.  Internally a record is
parsed from an immutable ``bytes`` snapshot with a :class:`Reader`; when the
snapshot ends mid-record the reader raises :class:`Short`, the decoder
rewinds to the record start and remembers how many bytes it needs, so a
record is never half-consumed and a partial record costs no work until
enough bytes have arrived.

The snapshot is ``bytes`` on purpose: page batches are handed out as numpy
views into it, and an immutable buffer can be viewed without copying and
without ever being invalidated by a later ``feed()``.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Final

from vmigrate.migration.wire.errors import WireError


class _NeedData:
    """Sentinel type of :data:`NEED_DATA`."""

    _instance: "_NeedData | None" = None

    def __new__(cls) -> "_NeedData":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"

    def __reduce__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event()`` when more input is required.
NEED_DATA: Final = _NeedData()

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


class Short(Exception):
    """Raised by :class:`Reader` when the record continues past the snapshot.

    ``end`` is the absolute snapshot position the parser needed to reach.
    """

    def __init__(self, end: int) -> None:
        super().__init__(end)
        self.end = end


class Reader:
    """Big-endian cursor over ``buf[pos:end]``; reading past ``end`` raises :class:`Short`."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes, pos: int, end: int) -> None:
        self.buf = buf
        self.pos = pos
        self.end = end

    def need(self, n: int) -> None:
        if self.pos + n > self.end:
            raise Short(self.pos + n)

    def remaining(self) -> int:
        return self.end - self.pos

    def peek_u8(self, at: int = 0) -> int:
        self.need(at + 1)
        return self.buf[self.pos + at]

    def u8(self) -> int:
        self.need(1)
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def be16(self) -> int:
        self.need(2)
        (v,) = _BE16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return v

    def be32(self) -> int:
        self.need(4)
        (v,) = _BE32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def be64(self) -> int:
        self.need(8)
        (v,) = _BE64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def take(self, n: int) -> bytes:
        self.need(n)
        v = self.buf[self.pos:self.pos + n]
        self.pos += n
        return v

    def skip(self, n: int) -> None:
        self.need(n)
        self.pos += n

    def str8(self) -> bytes:
        """A counted string: u8 length, then that many bytes (no NUL)."""
        n = self.u8()
        return self.take(n)


def decode_name(raw: bytes, what: str) -> str:
    """Names on the wire are ASCII in practice; anything else is kept readable."""
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise WireError(f"{what} is not ASCII: {raw!r}") from None


class InputBuffer:
    """Fed chunks, handed to the parser as contiguous ``bytes`` snapshots.

    A fed chunk becomes the snapshot itself once the parser reaches it, so
    ``bytes`` input is parsed in place (zero copy) and other input is copied
    exactly once, by ``feed``.  Only a record straddling two chunks is
    stitched together: the unconsumed tail plus about what the parser asked
    for (``need``), so feeding in tiny pieces stays linear too.
    """

    __slots__ = ("data", "pos", "_chunks", "_head", "_chunk_bytes", "_stitched", "_rewindable", "need",
                 "consumed", "closed")

    def __init__(self) -> None:
        self.data: bytes = b""
        self.pos = 0
        self._chunks: deque[bytes] = deque()
        self._head = 0                      # bytes of _chunks[0] already taken
        self._chunk_bytes = 0               # bytes in _chunks not yet taken
        self._stitched = False              # data was joined from several chunks
        self._rewindable = 0                # its last bytes, still at _chunks[0][_head - n:_head]
        #: Bytes (from ``pos``) the parser needs before it can make progress.
        self.need = 1
        #: Total bytes consumed since the start (stream offset of ``pos``).
        self.consumed = 0
        self.closed = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise WireError("data fed after end of input")
        if not data:
            return
        chunk = data if type(data) is bytes else bytes(data)
        self._chunks.append(chunk)
        self._chunk_bytes += len(chunk)

    def close(self) -> None:
        """The peer finished sending; later ``feed()`` calls are errors."""
        self.closed = True

    def available(self) -> int:
        return len(self.data) - self.pos + self._chunk_bytes

    def take_rest(self) -> bytes:
        """Every fed byte not consumed yet, removed from the buffer."""
        head = self._chunks[0][self._head:] if self._chunks else b""
        rest = b"".join([self.data[self.pos:], head, *list(self._chunks)[1:]])
        self.consumed += len(rest)
        self.data, self.pos, self._chunks, self._head, self._chunk_bytes = b"", 0, deque(), 0, 0
        self._stitched, self._rewindable, self.need = False, 0, 1
        return rest

    def snapshot(self) -> bool:
        """Make ``data[pos:]`` hold at least ``need`` bytes, if they have been fed.

        Returns False (changing nothing) when the parser cannot progress yet.
        """
        have = len(self.data) - self.pos
        if have >= self.need:
            return True
        if have + self._chunk_bytes < self.need:
            return False
        if self._stitched and 0 < have <= self._rewindable:
            # The unread tail of a stitched snapshot was copied from the head of
            # the pending chunk: go back to reading that chunk in place, or
            # every following element would be stitched (and copied) one by one.
            self._head -= have
            self._chunk_bytes += have
            self._rewindable = 0
            have = 0
        if have == 0:
            chunk = self._chunks.popleft()
            self.data, self.pos, self._stitched = chunk, self._head, False
            self._chunk_bytes -= len(chunk) - self._head
            self._head = 0
            have = len(chunk) - self.pos
            if have >= self.need:
                return True
        target = self.need
        if self._stitched and self.pos == 0:
            # The same element asks again for more: grow geometrically, so an
            # element parsed in many small steps is re-stitched O(log n) times.
            target = min(max(target, 2 * have), have + self._chunk_bytes)
        parts = [memoryview(self.data)[self.pos:]]
        missing = target - have
        while missing > 0:
            chunk = self._chunks[0]
            take = min(len(chunk) - self._head, missing)
            parts.append(memoryview(chunk)[self._head:self._head + take])
            missing -= take
            self._head += take
            self._chunk_bytes -= take
            self._rewindable = take
            if self._head == len(chunk):
                self._chunks.popleft()
                self._head = 0
                self._rewindable = 0
        self.data = b"".join(parts)
        self.pos = 0
        self._stitched = True
        return True

    def advance(self, to: int) -> None:
        """Consume up to absolute snapshot position ``to``."""
        self.consumed += to - self.pos
        self.pos = to
        self.need = 1
