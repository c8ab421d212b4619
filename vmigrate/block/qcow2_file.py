"""The host file under a qcow2 image: bounds-checked reads, tracked size, a poison flag.

Once any metadata is found inconsistent the file refuses all writes, so that vmigrate never
makes a damaged image worse (QEMU marks such images corrupt, block/qcow2.c
qcow2_signal_corruption; we only refuse).
"""

from __future__ import annotations

import os

from vmigrate.block.driver import ImageError


class HostFile:
    """pread/pwrite on the image file with errors phrased for the user."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.inconsistent = False
        self.written = False

    def error(self, text: str) -> ImageError:
        return ImageError(f"qcow2 image '{self.name}': {text}")

    def corrupt(self, text: str) -> ImageError:
        """An inconsistency in the metadata: say so, and write nothing more to this image."""
        self.inconsistent = True
        return self.error(text)

    def read_meta(self, offset: int, length: int, what: str) -> bytes:
        """Metadata must lie wholly inside the file."""
        if offset + length > self.size:
            raise self.corrupt(f"{what} offset 0x{offset:x} beyond the end of the file")
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise self.corrupt(f"short read of {what} at 0x{offset:x}")
        return data

    def read_data(self, offset: int, length: int) -> bytes:
        """Guest data in one pread (shorter past the end of the file)."""
        return os.pread(self.fd, length, offset)

    def read_into(self, view: memoryview, offset: int) -> None:
        """Guest data: bytes past the end of the file read as zeroes (the caller's buffer is)."""
        while view:
            got = os.preadv(self.fd, [view], offset)
            if got <= 0:
                return
            view = view[got:]
            offset += got

    def write(self, offset: int, *parts: bytes | bytearray | memoryview) -> None:
        if self.inconsistent:
            raise self.error("refusing to write to an image with inconsistent metadata")
        buffers = [memoryview(p).cast("B") for p in parts if len(p)]
        end = offset + sum(len(b) for b in buffers)
        while buffers:
            done = os.pwritev(self.fd, buffers, offset)
            offset += done
            while buffers and done >= len(buffers[0]):
                done -= len(buffers[0])
                buffers.pop(0)
            if buffers and done:
                buffers[0] = buffers[0][done:]
        self.size = max(self.size, end)
        self.written = True
