"""A background snapshot of a KVM guest writing RAM (docs/background-snapshot.md).

The x86 ``ab`` program's writes to pages not saved yet fault inside
KVM_RUN on the write protection and wait for the snapshot to save them,
as a software vCPU's do in access().  The file must hold the RAM of the
freeze point, and a destination that loads it must run the guest on from
there.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_kvm_migration import counter
from vmigrate.harness.waiting import wait_for
from vmigrate.machine import host

MIB = 1 << 20
FINAL = {"completed", "failed", "cancelled"}


@pytest.mark.skipif(not host.uffd_write_protect_supported(), reason="no userfaultfd write protection here")
def test_kvm_guest_snapshot_is_the_freeze_point(spawn, shm):
    common = ("-m", "64M", "--accel", "kvm", "--guest", "ab:end=24M")
    src = spawn("vmigrate", *common, "--mem-path", str(shm / "src.ram"))
    src.set_caps(**{"background-snapshot": True})
    wait_for(lambda: counter(shm / "src.ram") > 5, 10, "guest start")
    src.cmd("stop")
    frozen = np.fromfile(shm / "src.ram", np.uint8)
    image = shm / "snapshot.bin"
    src.cmd("migrate", uri=f"exec:cat > {image}")
    assert src.wait_migration(FINAL, timeout=30)["status"] == "completed"
    passes = counter(shm / "src.ram")
    wait_for(lambda: counter(shm / "src.ram") > passes + 5, 10, "the source guest running on")

    dst = spawn("vmigrate", *common, "--mem-path", str(shm / "dst.ram"), "-S", "--incoming", f"exec:cat {image}")
    assert dst.wait_migration(FINAL, timeout=20)["status"] == "completed"
    assert np.array_equal(frozen, np.fromfile(shm / "dst.ram", np.uint8))
    frozen_passes = counter(shm / "dst.ram")
    dst.cmd("cont")
    wait_for(lambda: counter(shm / "dst.ram") > frozen_passes + 5, 10, "the loaded guest running on")
    dst.cmd("stop")
    done = counter(shm / "dst.ram")
    column = np.fromfile(shm / "dst.ram", np.uint8)[MIB:24 * MIB:4096]
    assert np.isin(column, [done % 256, (done - 1) % 256]).all()
