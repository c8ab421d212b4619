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
