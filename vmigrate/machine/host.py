"""Probes of what the host kernel offers (userfaultfd for postcopy and snapshots)."""

from __future__ import annotations

import ctypes
import functools

from vmigrate.machine.userfaultfd import UFFD_FEATURE_PAGEFAULT_FLAG_WP, UserfaultError, available_features


@functools.cache
def userfaultfd_features() -> int | None:
    """The kernel's userfaultfd feature bits, or None if userfaultfd is unusable."""
    try:
        return available_features()
    except UserfaultError:
        return None


def postcopy_supported() -> bool:
    return userfaultfd_features() is not None


def uffd_write_protect_supported() -> bool:
    features = userfaultfd_features()
    return features is not None and bool(features & UFFD_FEATURE_PAGEFAULT_FLAG_WP)


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
