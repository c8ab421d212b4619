"""Buffered, rate-limited, byte-counting stream over a migration channel.

QEMU's QEMUFile: small writes (headers, device fields) are gathered in a
buffer, large ones (page batches) go straight to the channel after a flush,
so a batch of pages costs one system call and no extra copy.  Every byte
put is accounted in the attempt's :class:`~.rate_limit.RateLimiter`
(docs/qemu/convergence.md §2).
"""

from __future__ import annotations

import threading

from vmigrate.migration.channel import Channel, ChannelError
from vmigrate.migration.rate_limit import RateLimiter

BUFFER_SIZE = 32 * 1024
READ_CHUNK = 4 * 1024 * 1024


class QEMUFileOut:
    def __init__(self, channel: Channel, limiter: RateLimiter) -> None:
        self.channel = channel
        self.limiter = limiter
        self._buf = bytearray()
        #: Bytes handed to the channel (QEMU's qemu_file_transferred).
        self.transferred = 0
        self.error: str | None = None
        self._shut = threading.Event()

    def put(self, data) -> None:
        size = len(data) if not hasattr(data, "nbytes") else data.nbytes
        self.limiter.account(size)
        if size >= BUFFER_SIZE:
            self.flush()
            self._write(data, size)
        else:
            self._buf += data
            if len(self._buf) >= BUFFER_SIZE:
                self.flush()

    def flush(self) -> None:
        if self._buf:
            data, self._buf = self._buf, bytearray()
            self._write(data, len(data))

    def _write(self, data, size: int) -> None:
        if self.error is not None:
            raise ChannelError(self.error)
        try:
            self.channel.write(data)
        except ChannelError as err:
            if self.error is None:
                self.error = str(err)
            raise ChannelError(self.error) from None
        self.transferred += size

    def rate_limited(self) -> bool:
        return self.error is not None or self._shut.is_set() or self.limiter.exceeded()

    def shutdown(self) -> None:
        """Fail blocked and future writes at once (cancel)."""
        self._shut.set()
        if self.error is None:
            self.error = "Channel shut down"
        self.channel.shutdown()


class QEMUFileIn:
    """Reads the channel in large chunks for the sans-IO stream decoder."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.received = 0

    def read_chunk(self) -> bytes:
        """Next chunk of bytes; empty at end of stream."""
        data = self.channel.read(READ_CHUNK)
        self.received += len(data)
        return data
