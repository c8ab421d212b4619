"""Linux userfaultfd for the postcopy destination and background snapshots (ctypes, no C extension).

In postcopy the destination runs the guest before its RAM has arrived: all RAM is
registered in MISSING mode when LISTEN arrives, a guest access to a page not yet received
blocks in the kernel and is queued here as a :class:`Fault`, the fault thread asks the
source for that host page (REQ_PAGES), and the receiving thread places it atomically with
UFFDIO_COPY or UFFDIO_ZEROPAGE, which also wakes the blocked thread
(``docs/qemu/postcopy.md`` §4.2, §4.3).

A background snapshot (``docs/background-snapshot.md``) registers all RAM in write-protect
(WP) mode instead: after UFFDIO_WRITEPROTECT a guest write to a page blocks and is queued
as a :class:`Fault` with ``wp`` set, until the page's old content is saved and its
protection removed (QEMU's ram_write_tracking_*, migration/ram.c).

Every blocking call here (the ioctls, ``poll``, ``madvise``) is a ctypes or ``os`` call
and so runs without the GIL: a vCPU blocked on a missing page must not stop the fault
thread and the receiving thread, which are Python threads too.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import math
import mmap
import os
import platform
import select
import struct
from collections.abc import Callable
from dataclasses import dataclass

_logger = logging.getLogger(__name__)

_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}

_IOC_WRITE = 1
_IOC_READ = 2
_UFFDIO = 0xAA


def _ioc(direction: int, nr: int, size: int) -> int:
    """The kernel's ``_IOC(dir, UFFDIO, nr, size)`` (asm-generic layout, x86_64 and arm64)."""
    return (direction << 30) | (size << 16) | (_UFFDIO << 8) | nr


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),
    ]

    def result(self) -> int:
        return int(self.copy)


class _WriteProtect(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64)]


class _Zeropage(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]

    def result(self) -> int:
        return int(self.zeropage)


# ioctl numbers and bits of linux/userfaultfd.h
_NR_REGISTER, _NR_UNREGISTER, _NR_WAKE, _NR_COPY, _NR_ZEROPAGE, _NR_API = 0x00, 0x01, 0x02, 0x03, 0x04, 0x3F
_NR_WRITEPROTECT = 0x06
UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, _NR_API, ctypes.sizeof(_Api))
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, _NR_REGISTER, ctypes.sizeof(_Register))
UFFDIO_UNREGISTER = _ioc(_IOC_READ, _NR_UNREGISTER, ctypes.sizeof(_Range))
UFFDIO_WAKE = _ioc(_IOC_READ, _NR_WAKE, ctypes.sizeof(_Range))
UFFDIO_COPY = _ioc(_IOC_READ | _IOC_WRITE, _NR_COPY, ctypes.sizeof(_Copy))
UFFDIO_ZEROPAGE = _ioc(_IOC_READ | _IOC_WRITE, _NR_ZEROPAGE, ctypes.sizeof(_Zeropage))
UFFDIO_WRITEPROTECT = _ioc(_IOC_READ | _IOC_WRITE, _NR_WRITEPROTECT, ctypes.sizeof(_WriteProtect))

UFFD_API = 0xAA
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
# 1 << 7 is UFFD_FEATURE_SIGBUS (SIGBUS instead of a fault event): never requested.
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1

MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23

# struct uffd_msg: u8 event, 7 reserved bytes, then for a pagefault u64 flags,
# u64 address, u32 ptid (with UFFD_FEATURE_THREAD_ID), 4 bytes of union padding.
_MSG = struct.Struct("=B7xQQI4x")
# Faults queued by many vCPUs are drained with few reads.
_READ_MSGS = 64
# The features postcopy wants: shmem (memory-backend-file/memfd RAM) and the faulting
# thread's tid (blocktime accounting per vCPU, docs/qemu/postcopy.md §10).
_WANTED_FEATURES = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_THREAD_ID
# A registered range must allow these, per mode: MISSING places pages, WP changes protection.
_NEEDED_IOCTLS = {
    UFFDIO_REGISTER_MODE_MISSING: (1 << _NR_COPY) | (1 << _NR_ZEROPAGE) | (1 << _NR_WAKE),
    UFFDIO_REGISTER_MODE_WP: 1 << _NR_WRITEPROTECT,
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


class UserfaultError(OSError):
    """A userfaultfd operation failed; ``errno`` is the kernel's."""

    def __init__(self, what: str, err: int) -> None:
        super().__init__(err, f"userfaultfd: {what} failed: {os.strerror(err)}")


@dataclass(frozen=True)
class Fault:
    """One missing-page fault, as the kernel queued it."""

    address: int  # faulting address (not rounded to a page)
    tid: int  # faulting thread's kernel tid (0 without UFFD_FEATURE_THREAD_ID)
    write: bool
    wp: bool = False  # a write to a write-protected page (not a missing one)


def _ioctl(fd: int, request: int, arg: ctypes.Structure) -> int:
    """0 on success, else the errno."""
    if _libc.ioctl(fd, request, ctypes.byref(arg)) == 0:
        return 0
    return ctypes.get_errno()


def _open() -> int:
    number = _SYS_USERFAULTFD.get(platform.machine())
    if number is None:
        raise UserfaultError(f"no userfaultfd syscall number for {platform.machine()}", errno.ENOSYS)
    fd = _libc.syscall(number, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        err = ctypes.get_errno()
        hint = " (vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE?)" if err == errno.EPERM else ""
        raise UserfaultError(f"userfaultfd(){hint}", err)
    return int(fd)


def _handshake(fd: int, features: int) -> int:
    """UFFDIO_API on ``fd`` enabling ``features``; returns every feature the kernel has
    (it writes back that set, not the enabled one)."""
    api = _Api(UFFD_API, features, 0)
    err = _ioctl(fd, UFFDIO_API, api)
    if err:
        raise UserfaultError(f"UFFDIO_API (features {features:#x})", err)
    return int(api.features)


def available_features() -> int:
    """The kernel's feature bits, from a throwaway fd.

    UFFDIO_API may be done once per fd and fails on a feature the kernel lacks, so, as
    QEMU does, a first fd asks with no features and the real one asks for what exists.
    """
    fd = _open()
    try:
        return _handshake(fd, 0)
    finally:
        os.close(fd)


class UserfaultFd:
    """One userfaultfd: registered ranges, the fault queue, and page placement.

    Thread-safe as the kernel is: the fault thread may read faults while other threads
    place pages. ``close`` must not race the other methods.
    """

    def __init__(self, required: int = 0) -> None:
        """*required* features (``UFFD_FEATURE_PAGEFAULT_FLAG_WP`` for write protection) must
        exist, else UserfaultError (EOPNOTSUPP); the wanted ones are enabled where they exist."""
        available = available_features()
        if available & required != required:
            raise UserfaultError(f"features {required & ~available:#x}", errno.EOPNOTSUPP)
        #: The features enabled on this fd (*required*, and MISSING_SHMEM | THREAD_ID where offered).
        self.features = (available & _WANTED_FEATURES) | required
        self._fd: int | None = _open()
        try:
            _handshake(self._fd, self.features)
        except UserfaultError:
            self.close()
            raise
        _logger.debug("userfaultfd %d open, features %#x", self._fd, self.features)

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("userfaultfd is closed")
        return self._fd

    def register(self, addr: int, length: int, mode: int = UFFDIO_REGISTER_MODE_MISSING) -> None:
        """Register [addr, addr+length) in *mode*: MISSING (accesses to absent pages fault
        here) or WP (writes to pages protected by :meth:`write_protect` fault here)."""
        reg = _Register(_Range(addr, length), mode, 0)
        err = _ioctl(self.fileno(), UFFDIO_REGISTER, reg)
        if err:
            raise UserfaultError(f"UFFDIO_REGISTER {addr:#x}+{length:#x}", err)
        needed = _NEEDED_IOCTLS[mode]
        if reg.ioctls & needed != needed:
            self.unregister(addr, length)
            what = f"UFFDIO_REGISTER {addr:#x}+{length:#x} (allowed ioctls {reg.ioctls:#x})"
            raise UserfaultError(what, errno.EOPNOTSUPP)

    def unregister(self, addr: int, length: int) -> None:
        """Stop faulting on [addr, addr+length); threads blocked there are woken."""
        err = _ioctl(self.fileno(), UFFDIO_UNREGISTER, _Range(addr, length))
        if err:
            raise UserfaultError(f"UFFDIO_UNREGISTER {addr:#x}+{length:#x}", err)

    def copy(self, dst: int, src: int, length: int) -> bool:
        """Place ``length`` bytes from ``src`` atomically at ``dst`` and wake its faulters.

        Pages already present (EEXIST) are skipped, as a page can arrive twice (once
        requested, once from the background scan); False if every page was present.
        """

        def make(done: int, n: int) -> _Copy:
            return _Copy(dst + done, src + done, n, 0, 0)

        return self._place("UFFDIO_COPY", UFFDIO_COPY, dst, length, make)

    def zeropage(self, dst: int, length: int) -> bool:
        """Place zero pages at ``dst`` and wake its faulters; False as for :meth:`copy`."""

        def make(done: int, n: int) -> _Zeropage:
            return _Zeropage(_Range(dst + done, n), 0, 0)

        return self._place("UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE, dst, length, make)

    def _place(
        self, what: str, request: int, dst: int, length: int, make: Callable[[int, int], _Copy | _Zeropage]
    ) -> bool:
        """Run UFFDIO_COPY/ZEROPAGE over [dst, dst+length) until all of it is present.

        The kernel may stop early: a partial copy reports the bytes done and EAGAIN (the
        rest is retried), EAGAIN alone means the mm is changing (retried), and EEXIST means
        the page at the current position is present (skipped: another thread placed it).
        """
        fd = self.fileno()
        page = mmap.PAGESIZE
        done = 0
        placed = False
        while done < length:
            arg = make(done, length - done)
            err = _ioctl(fd, request, arg)
            result = arg.result()
            if not err:
                return True
            if result > 0:
                done += result
                placed = True
            elif err == errno.EEXIST:
                done += page
            elif err != errno.EAGAIN:
                raise UserfaultError(f"{what} {dst + done:#x}+{length - done:#x}", err)
        return placed

    def write_protect(self, addr: int, length: int, protect: bool) -> None:
        """Set or remove write protection on [addr, addr+length) of a WP-registered range.

        Removing it wakes the writers blocked there.  Protection skips pages
        with no page table entry at all: a caller populates them first.
        """
        arg = _WriteProtect(_Range(addr, length), UFFDIO_WRITEPROTECT_MODE_WP if protect else 0)
        while err := _ioctl(self.fileno(), UFFDIO_WRITEPROTECT, arg):
            if err != errno.EAGAIN:
                raise UserfaultError(f"UFFDIO_WRITEPROTECT {addr:#x}+{length:#x}", err)

    def wake(self, addr: int, length: int) -> None:
        """Wake threads blocked on [addr, addr+length) (they retry the access)."""
        err = _ioctl(self.fileno(), UFFDIO_WAKE, _Range(addr, length))
        if err:
            raise UserfaultError(f"UFFDIO_WAKE {addr:#x}+{length:#x}", err)

    def read_faults(self, timeout: float) -> list[Fault]:
        """Wait up to ``timeout`` seconds for faults, then drain the queue ([] on timeout).

        Events other than page faults (none are enabled) are skipped.
        """
        fd = self.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(math.ceil(max(timeout, 0.0) * 1000)):
            return []
        faults: list[Fault] = []
        while True:
            try:
                data = os.read(fd, _READ_MSGS * _MSG.size)
            except BlockingIOError:
                return faults
            for event, flags, address, tid in _MSG.iter_unpack(data):
                if event == UFFD_EVENT_PAGEFAULT:
                    faults.append(Fault(address, tid, bool(flags & UFFD_PAGEFAULT_FLAG_WRITE),
                                        bool(flags & UFFD_PAGEFAULT_FLAG_WP)))
            if len(data) < _READ_MSGS * _MSG.size:
                return faults

    def close(self) -> None:
        """Close the fd (idempotent); the kernel wakes blocked threads, which then see
        ordinary zero-filled pages where nothing was placed."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def fault_in(addr: int, length: int, write: bool = False) -> None:
    """Populate [addr, addr+length) as a read (or write) access would, blocking on missing pages.

    A software vCPU calls this before touching guest RAM with numpy: numpy would fault
    while holding the GIL, so the fault thread could never run. madvise through ctypes
    blocks in the kernel with the GIL released.
    """
    advice = MADV_POPULATE_WRITE if write else MADV_POPULATE_READ
    while _libc.madvise(addr, length, advice) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINTR, errno.EAGAIN):
            raise OSError(err, f"madvise({addr:#x}, {length:#x}, {advice}): {os.strerror(err)}")
