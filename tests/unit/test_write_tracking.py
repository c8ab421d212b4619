"""Write tracking (machine/write_tracking.py) against the real kernel: a software vCPU's write to a
protected page waits in ``RAMBlock.access`` without the GIL until the page is unprotected."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from vmigrate.harness.waiting import wait_for
from vmigrate.machine import host
from vmigrate.machine.memory import RAMBlock
from vmigrate.machine.userfaultfd import fault_in
from vmigrate.machine.write_tracking import WriteTracking, write_tracking_compatible

if not host.uffd_write_protect_supported():
    pytest.skip("the host kernel has no userfaultfd write protection", allow_module_level=True)


@pytest.mark.parametrize("shared", [False, True], ids=["anonymous", "shmem"])
def test_write_tracking_blocks_writes_until_saved(shm: Path, shared: bool) -> None:
    """A software vCPU's write to a protected page waits in access() (without the GIL) for the
    page to be saved; the rest of the process runs on; stop() releases everything."""
    block = RAMBlock("ram", 1 << 20, str(shm / "wt.ram") if shared else None)
    block.pages[5, 0] = 1
    tracking = WriteTracking([block])
    tracking.prepare()
    tracking.start()
    wrote = threading.Event()

    def vcpu() -> None:
        block.access(5, 2)
        block.pages[5:7, 0] = 9
        wrote.set()

    threading.Thread(target=vcpu, daemon=True).start()
    faults = []
    wait_for(lambda: faults.extend(tracking.faults()) or faults, 5, "write fault")
    assert [(b.idstr, page) for b, page in faults] == [("ram", 5)]
    assert not wrote.is_set() and block.pages[5, 0] == 1, "the write went through a protected page"
    tracking.unprotect(block, 5, 1)
    wait_for(lambda: faults.extend(tracking.faults()) or len(faults) > 1, 5, "fault on the next page")
    assert faults[-1][1] == 6
    tracking.stop()
    assert wrote.wait(5) and not block.write_tracked
    fault_in(block.address, block.size, write=True)  # would wait for ever on a page left protected
    assert block.pages[5, 0] == 9
    block.close()


def test_anonymous_and_tmpfs_ram_are_compatible(shm: Path) -> None:
    blocks = [RAMBlock("anon", 1 << 20), RAMBlock("shm", 1 << 20, str(shm / "c.ram"))]
    assert write_tracking_compatible(blocks)
    for block in blocks:
        block.close()
