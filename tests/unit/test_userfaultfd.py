"""userfaultfd against the real kernel: faults from a blocked thread, placement, wake-up.

Postcopy's destination depends on exactly this (docs/qemu/postcopy.md §4.2, §4.3): a thread
touching a missing page blocks without the GIL, the fault is read with its address and
thread, and UFFDIO_COPY/ZEROPAGE places the page and releases the thread.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import tempfile
import threading
from collections.abc import Iterator

import pytest

from vmigrate.machine import userfaultfd as uf

PAGE = mmap.PAGESIZE
PAGES = 4
TIMEOUT = 5.0

try:
    uf.UserfaultFd().close()
except OSError as exc:
    pytest.skip(f"userfaultfd unavailable: {exc}", allow_module_level=True)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map(flags: int, fd: int) -> int:
    addr = _libc.mmap(None, PAGES * PAGE, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
    if addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(addr)


@pytest.fixture(params=["anonymous", "shmem"])
def region(request: pytest.FixtureRequest) -> Iterator[int]:
    """PAGES pages, none present: private anonymous memory, or a shared /dev/shm file (tmpfs)."""
    if request.param == "anonymous":
        addr = _map(mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1)
    else:
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm")
        with tempfile.TemporaryFile(dir="/dev/shm") as backing:
            os.ftruncate(backing.fileno(), PAGES * PAGE)
            addr = _map(mmap.MAP_SHARED, backing.fileno())
    yield addr
    assert _libc.munmap(addr, PAGES * PAGE) == 0


@pytest.fixture
def ufd() -> Iterator[uf.UserfaultFd]:
    fd = uf.UserfaultFd()
    yield fd
    fd.close()


def _fault_on(ufd: uf.UserfaultFd, page: int) -> uf.Fault:
    """The next fault on ``page``; the kernel may also re-report a page after a wake."""
    while faults := ufd.read_faults(TIMEOUT):
        for fault in faults:
            if fault.address & ~(PAGE - 1) == page:
                return fault
    raise AssertionError(f"no fault on {page:#x} within {TIMEOUT}s")


def test_ioctl_numbers_match_the_kernel_headers() -> None:
    assert uf.UFFDIO_API == 0xC018AA3F
    assert uf.UFFDIO_REGISTER == 0xC020AA00
    assert uf.UFFDIO_COPY == 0xC028AA03
    assert uf.UFFDIO_ZEROPAGE == 0xC020AA04
    assert uf.UFFDIO_UNREGISTER == 0x8010AA01
    assert uf.UFFDIO_WAKE == 0x8010AA02
    assert uf.UFFDIO_WRITEPROTECT == 0xC018AA06


def test_handshake_enables_shmem_and_thread_id_never_sigbus(ufd: uf.UserfaultFd) -> None:
    assert ufd.features & uf.UFFD_FEATURE_MISSING_SHMEM
    assert ufd.features & uf.UFFD_FEATURE_THREAD_ID
    assert not ufd.features & (1 << 7)


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
def test_blocked_thread_is_released_by_copy_then_zeropage(region: int, ufd: uf.UserfaultFd, write: bool) -> None:
    ufd.register(region, PAGES * PAGE)
    errors: list[BaseException] = []

    def vcpu() -> None:
        try:
            uf.fault_in(region, 2 * PAGE, write=write)
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    thread = threading.Thread(target=vcpu, name="vcpu")
    thread.start()
    try:
        first = _fault_on(ufd, region)
        assert first.tid == thread.native_id
        assert first.write is write
        assert thread.is_alive()
        source = ctypes.create_string_buffer(b"\xa5" * PAGE, PAGE)
        assert ufd.copy(region, ctypes.addressof(source), PAGE) is True

        second = _fault_on(ufd, region + PAGE)
        assert second.tid == thread.native_id
        assert ufd.zeropage(region + PAGE, PAGE) is True
        thread.join(timeout=TIMEOUT)
        assert not thread.is_alive()
        assert not errors
    finally:
        if thread.is_alive():
            ufd.close()  # releases the thread: its pages become ordinary zero-fill
            thread.join(timeout=TIMEOUT)
    assert ctypes.string_at(region, PAGE) == b"\xa5" * PAGE
    assert ctypes.string_at(region + PAGE, PAGE) == bytes(PAGE)

    assert ufd.copy(region, ctypes.addressof(source), PAGE) is False
    assert ufd.zeropage(region + PAGE, PAGE) is False
    assert ufd.read_faults(0.05) == []


def test_copy_over_a_partly_present_range_fills_the_rest(region: int, ufd: uf.UserfaultFd) -> None:
    ufd.register(region, PAGES * PAGE)
    source = ctypes.create_string_buffer(bytes(range(256)) * (PAGES * PAGE // 256), PAGES * PAGE)
    assert ufd.zeropage(region + PAGE, PAGE) is True
    assert ufd.copy(region, ctypes.addressof(source), PAGES * PAGE) is True
    assert ctypes.string_at(region, PAGE) == source.raw[:PAGE]
    assert ctypes.string_at(region + PAGE, PAGE) == bytes(PAGE)
    assert ctypes.string_at(region + 2 * PAGE, 2 * PAGE) == source.raw[2 * PAGE :]


def test_unregistered_range_does_not_fault(region: int, ufd: uf.UserfaultFd) -> None:
    ufd.register(region, PAGES * PAGE)
    ufd.unregister(region, PAGES * PAGE)
    thread = threading.Thread(target=uf.fault_in, args=(region, PAGES * PAGE), name="vcpu")
    thread.start()
    thread.join(timeout=TIMEOUT)
    if thread.is_alive():
        ufd.close()
        thread.join(timeout=TIMEOUT)
    assert not thread.is_alive()
    assert ufd.read_faults(0.05) == []
    assert ctypes.string_at(region, PAGES * PAGE) == bytes(PAGES * PAGE)


def test_wake_without_placement_makes_the_thread_fault_again(region: int, ufd: uf.UserfaultFd) -> None:
    ufd.register(region, PAGES * PAGE)
    thread = threading.Thread(target=uf.fault_in, args=(region, PAGE), name="vcpu")
    thread.start()
    try:
        _fault_on(ufd, region)
        ufd.wake(region, PAGE)
        _fault_on(ufd, region)
        assert ufd.zeropage(region, PAGE) is True
        thread.join(timeout=TIMEOUT)
        assert not thread.is_alive()
    finally:
        if thread.is_alive():
            ufd.close()
            thread.join(timeout=TIMEOUT)


def test_read_faults_times_out_empty(ufd: uf.UserfaultFd) -> None:
    assert ufd.read_faults(0.05) == []
    assert ufd.read_faults(0) == []


def test_close_is_idempotent() -> None:
    ufd = uf.UserfaultFd()
    assert ufd.fileno() >= 0
    ufd.close()
    ufd.close()
    with pytest.raises(ValueError):
        ufd.fileno()


def test_errors_carry_errno_and_name_the_operation(ufd: uf.UserfaultFd) -> None:
    with pytest.raises(uf.UserfaultError) as info:
        ufd.register(1, PAGE)  # not page-aligned
    assert info.value.errno == errno.EINVAL
    assert "userfaultfd: UFFDIO_REGISTER" in str(info.value)
