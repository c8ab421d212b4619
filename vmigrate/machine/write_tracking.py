"""Write tracking of guest RAM with userfaultfd write protection (QEMU's ram_write_tracking_*, migration/ram.c).

A background snapshot saves every page as it was at the freeze point while
the guest runs on (docs/background-snapshot.md).  All RAM is registered in
WP mode and write-protected while the guest is stopped; a guest write to a
page not saved yet then blocks in the kernel until the snapshot has saved
the page and removed its protection.  The faults are polled without
blocking by the thread that saves the pages, as QEMU's poll_fault_page does.

Software vCPUs write guest RAM with numpy, which would take the fault while
holding the interpreter lock, and so block the very thread that must save
the page: :attr:`RAMBlock.write_tracked` makes their
:meth:`RAMBlock.access` take it first, in a GIL-free
``madvise(MADV_POPULATE_WRITE)``.
"""

from __future__ import annotations

import logging

from vmigrate.machine.memory import PAGE_SIZE, RAMBlock
from vmigrate.machine.userfaultfd import (UFFD_FEATURE_PAGEFAULT_FLAG_WP, UFFDIO_REGISTER_MODE_WP, UserfaultError,
                                          UserfaultFd, fault_in)

log = logging.getLogger(__name__)


def write_tracking_compatible(blocks: list[RAMBlock]) -> bool:
    """QEMU's ram_write_tracking_compatible: every block registers in WP mode and allows UFFDIO_WRITEPROTECT.

    Anonymous RAM and shmem (a ``--mem-path`` on tmpfs) do on kernels with
    uffd-wp PTE markers (5.19+); a file on a disk file system does not.
    """
    try:
        uffd = UserfaultFd(required=UFFD_FEATURE_PAGEFAULT_FLAG_WP)
    except UserfaultError:
        return False
    try:
        for block in blocks:
            uffd.register(block.address, block.size, UFFDIO_REGISTER_MODE_WP)
            uffd.unregister(block.address, block.size)
        return True
    except UserfaultError as err:
        log.debug("write tracking incompatible: %s", err)
        return False
    finally:
        uffd.close()


class WriteTracking:
    """The write protection of one background snapshot's RAM blocks, from start to stop."""

    def __init__(self, blocks: list[RAMBlock]) -> None:
        self.blocks = blocks
        self._uffd: UserfaultFd | None = None
        self._registered: list[RAMBlock] = []

    def prepare(self) -> None:
        """Populate every page (QEMU's ram_write_tracking_prepare): protection skips absent pages.

        A read fault is enough: anonymous RAM maps the zero page, shmem
        allocates the page; either then carries the protection.
        """
        for block in self.blocks:
            fault_in(block.address, block.size)

    def start(self) -> None:
        """Register and protect all blocks; on failure undo what was done and raise UserfaultError.

        The guest is stopped: from the moment a block is marked tracked, its
        software vCPU writes go through the fault first.
        """
        self._uffd = uffd = UserfaultFd(required=UFFD_FEATURE_PAGEFAULT_FLAG_WP)
        try:
            for block in self.blocks:
                uffd.register(block.address, block.size, UFFDIO_REGISTER_MODE_WP)
                self._registered.append(block)
                block.write_tracked = True
                uffd.write_protect(block.address, block.size, True)
        except UserfaultError:
            log.error("ram_write_tracking_start() failed: restoring initial memory state")
            self.stop()
            raise

    def faults(self) -> list[tuple[RAMBlock, int]]:
        """The (block, page) of each write queued since the last call, without waiting."""
        uffd = self._uffd
        if uffd is None:
            return []
        found = []
        for fault in uffd.read_faults(0):
            for block in self._registered:
                offset = fault.address - block.address
                if 0 <= offset < block.size:
                    found.append((block, offset // PAGE_SIZE))
                    break
        return found

    def unprotect(self, block: RAMBlock, first: int, count: int) -> None:
        """Pages [first, first + count) of *block* are saved: writes go through, blocked writers wake."""
        self._uffd.write_protect(block.address + first * PAGE_SIZE, count * PAGE_SIZE, False)

    def stop(self) -> None:
        """Unprotect and unregister everything, wake every blocked writer, close (idempotent).

        Runs on every outcome of the snapshot, so the guest never keeps a
        protected page; a block stops being tracked only once unprotected.
        """
        uffd, self._uffd = self._uffd, None
        if uffd is None:
            return
        try:
            for block in self._registered:
                uffd.write_protect(block.address, block.size, False)
                uffd.unregister(block.address, block.size)
        finally:
            # Closing the fd also unregisters whatever an error above left behind.
            uffd.close()
            for block in self._registered:
                block.write_tracked = False
            self._registered = []
