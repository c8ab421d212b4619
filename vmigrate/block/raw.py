"""Raw images: guest bytes at the same file offsets (QEMU's block/raw-format.c over file-posix)."""

from __future__ import annotations

import os

from vmigrate.block.driver import BlockDriver, ImageError


class RawImage(BlockDriver):
    format_name = "raw"

    def __init__(self, filename: str, read_only: bool = False) -> None:
        self.filename = filename
        self.read_only = read_only
        try:
            self._fd = os.open(filename, os.O_RDONLY if read_only else os.O_RDWR)
        except OSError as err:
            raise ImageError(f"Could not open '{filename}': {err.strerror}") from None
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        return data + bytes(length - len(data))

    def write(self, offset: int, data) -> None:
        os.pwrite(self._fd, data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        os.pwrite(self._fd, bytes(length), offset)

    def actual_size(self) -> int:
        return os.fstat(self._fd).st_blocks * 512

    def format_specific(self) -> dict | None:
        return None

    def close(self) -> None:
        os.close(self._fd)
