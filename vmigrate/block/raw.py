"""Raw images: guest bytes at the same file offsets (QEMU's block/raw-format.c over file-posix)."""

from __future__ import annotations

import ctypes
import errno
import logging
import os

from vmigrate.block.driver import BlockDriver, ImageError

log = logging.getLogger(__name__)

#: linux/falloc.h: deallocate the range but keep the file size (block/file-posix.c's discard).
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a byte range so it reads back as zeroes; False where the file system cannot."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


class RawImage(BlockDriver):
    """A plain file whose size is the disk size."""

    format_name = "raw"

    def __init__(self, filename: str, read_only: bool = False) -> None:
        self.filename = filename
        self.read_only = read_only
        try:
            self._fd = os.open(filename, os.O_RDONLY if read_only else os.O_RDWR)
        except OSError as err:
            raise ImageError(f"Could not open '{filename}': {err.strerror}") from None
        self._size = os.fstat(self._fd).st_size
        self._dirty = False

    @property
    def size(self) -> int:
        return self._size

    def _check(self, offset: int, length: int, writing: bool) -> None:
        if writing and self.read_only:
            raise ImageError(f"Image '{self.filename}' is read-only")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ImageError(f"Request at {offset}+{length} beyond the end of image "
                             f"'{self.filename}' ({self._size} bytes)")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length, False)
        data = os.pread(self._fd, length, offset)
        return data + bytes(length - len(data))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check(offset, len(data), True)
        view = memoryview(data).cast("B")
        while view:
            done = os.pwrite(self._fd, view, offset)
            view = view[done:]
            offset += done
        self._dirty = True

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length, True)
        self._dirty = True
        if length and punch_hole(self._fd, offset, length):
            return
        log.debug("%s: no hole punching, writing zeroes", self.filename)
        end = offset + length
        while offset < end:
            step = min(_ZERO_CHUNK, end - offset)
            os.pwrite(self._fd, bytes(step), offset)
            offset += step

    def actual_size(self) -> int:
        return os.fstat(self._fd).st_blocks * 512

    def flush(self) -> None:
        """fdatasync only when something was written since the last flush."""
        if self._dirty:
            os.fdatasync(self._fd)
            self._dirty = False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
