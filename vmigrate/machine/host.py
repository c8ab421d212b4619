"""Probes of what the host kernel offers (userfaultfd for postcopy and snapshots)."""

from __future__ import annotations

import ctypes
import functools
import os
import platform

_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
_UFFDIO_API = 0xC018AA3F
_UFFD_API = 0xAA
_UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


@functools.cache
def userfaultfd_features() -> int | None:
    """The kernel's userfaultfd feature bits, or None if userfaultfd is unusable."""
    number = _SYS_USERFAULTFD.get(platform.machine())
    if number is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(number, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        return None
    try:
        api = _UffdioApi(_UFFD_API, 0, 0)
        if libc.ioctl(fd, _UFFDIO_API, ctypes.byref(api)) != 0:
            return None
        return int(api.features)
    finally:
        os.close(fd)


def postcopy_supported() -> bool:
    return userfaultfd_features() is not None


def uffd_write_protect_supported() -> bool:
    features = userfaultfd_features()
    return features is not None and bool(features & _UFFD_FEATURE_PAGEFAULT_FLAG_WP)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_large_buffers_in_heap() -> None:
    """Stop glibc from mapping and unmapping every multi-MiB buffer.

    Each received chunk is a fresh multi-MiB ``bytes``; by default glibc
    serves those with mmap and returns them with munmap, so the kernel
    zeroes and faults in new pages for every chunk.  Keeping them in the
    heap (and not trimming it) reuses warm memory: about 25 % faster
    incoming migration here.  A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 64 << 20)
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the kernel (glibc's malloc_trim).

    The counterpart of :func:`keep_large_buffers_in_heap`: that heap is never
    trimmed on its own, so after a monitor parsed a message of tens of MiB its
    pages would stay resident for good.  A no-op where the C library has no
    malloc_trim.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
