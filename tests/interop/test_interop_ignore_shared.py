"""``x-ignore-shared`` between real QEMU 7.2 and vmigrate, both mapping the same RAM file.

The file on /dev/shm is filled with a pattern before the migration; the
source lists its block with GPA 0 and sends no page; afterwards the
destination runs (or stays paused) on the file, which still holds the pattern.
"""

from __future__ import annotations

import numpy as np
import pytest

from machines import FINAL, Machine, Machines
from ramfile import fill_pattern, first_difference, pages
from transport import Transport, migrate

pytestmark = pytest.mark.timeout(60)

SIZE = "128M"
IGNORE_SHARED = {"x-ignore-shared": True}


def pattern_copy(machines: Machines, src: Machine) -> np.ndarray:
    """Fill the shared file and keep what it must still hold afterwards."""
    fill_pattern(src.ram, src.size, seed=7)
    expected = machines.ramdir / "expected.ram"
    np.asarray(pages(src.ram, src.size)).tofile(expected)
    return expected


def check_ignored(info: dict) -> None:
    assert info["status"] == "completed", info
    ram = info["ram"]
    assert (ram["total"], ram["remaining"], ram["normal"], ram["duplicate"]) == (0, 0, 0, 0), ram


@pytest.mark.parametrize("dst_paused", [False, True], ids=["running", "dst-S"])
def test_qemu_to_vmigrate(machines: Machines, dst_paused: bool) -> None:
    src = machines.qemu(SIZE)
    src.vm.set_caps(**IGNORE_SHARED)
    expected = pattern_copy(machines, src)

    def start_dst() -> Machine:
        dst = machines.vmigrate(SIZE, "--incoming", "defer", *(["-S"] if dst_paused else []), ram=src.ram)
        dst.vm.set_caps(**IGNORE_SHARED)
        return dst

    dst = migrate(Transport("tcp", machines.ramdir), src, start_dst)
    check_ignored(src.vm.migrate_status())
    assert dst.vm.wait_migration(FINAL)["status"] == "completed"
    assert src.vm.status() == "postmigrate"
    assert dst.vm.status() == ("paused" if dst_paused else "running")
    assert first_difference(expected, dst.ram, src.size) is None


def test_vmigrate_to_qemu(machines: Machines) -> None:
    src = machines.vmigrate(SIZE)
    src.vm.set_caps(**IGNORE_SHARED)
    expected = pattern_copy(machines, src)

    def start_dst() -> Machine:
        dst = machines.qemu(SIZE, "-incoming", "defer", ram=src.ram)
        dst.vm.set_caps(**IGNORE_SHARED)
        return dst

    dst = migrate(Transport("tcp", machines.ramdir), src, start_dst)
    dst.require_alive()
    check_ignored(src.vm.migrate_status())
    assert dst.vm.migrate_status() == {"status": "completed"}
    assert src.vm.status() == "postmigrate" and dst.vm.status() == "running"
    assert first_difference(expected, dst.ram, src.size) is None


def test_qemu_destination_refuses_a_capability_mismatch(machines: Machines) -> None:
    """Only the source has it on: QEMU's configuration check refuses the stream and exits."""
    src = machines.vmigrate(SIZE)
    src.vm.set_caps(**IGNORE_SHARED)
    pattern_copy(machines, src)
    dst = migrate(Transport("tcp", machines.ramdir), src,
                  lambda: machines.qemu(SIZE, "-incoming", "defer", ram=src.ram))
    assert dst.vm.proc.poll() is not None
    assert "Capability x-ignore-shared is off, but received capability is on" in dst.vm.log()
