"""Background snapshots (``background-snapshot``) between vmigrate and QEMU 7.2, through a file.

docs/qemu/snapshot-jobs.md §8: the file holds RAM as of the freeze point,
then the device state, and loads with ``-incoming``.  vmigrate's snapshot
of a writing guest must load into QEMU with exactly the frozen RAM, and
QEMU's snapshot into vmigrate; both sides send the same events.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from machines import FINAL, Machine, Machines
from vmigrate.harness.waiting import wait_for
from vmigrate.machine import host
from vmigrate.machine.guest import read_header

if not host.uffd_write_protect_supported():
    pytest.skip("the host kernel has no userfaultfd write protection", allow_module_level=True)

SNAPSHOT = {"background-snapshot": True}
#: docs/qemu/snapshot-jobs.md §8, verified against QEMU 7.2.
EVENTS = ["MIGRATION setup", "MIGRATION active", "STOP", "RESUME", "MIGRATION completed"]


def snapshot_events(machine: Machine, timeout: float = 30.0) -> list[str]:
    """The events up to the final MIGRATION one, MIGRATION events with their status."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while not seen or seen[-1] not in {f"MIGRATION {s}" for s in FINAL}:
        event = machine.vm.qmp.next_event(max(0.0, deadline - time.monotonic()))
        assert event is not None, f"no final MIGRATION event within {timeout}s; got {seen}"
        seen.append(event["event"] + (f" {event['data']['status']}" if event["event"] == "MIGRATION" else ""))
    return seen


def load(machines: Machines, kind: str, image) -> Machine:
    """A paused destination of *kind* that loaded *image* (``-incoming defer`` + ``migrate-incoming``)."""
    dst = machines.start(kind, "64M", "-S", "-incoming", "defer")
    dst.vm.cmd("migrate-incoming", uri=f"exec:cat {image}")
    info = dst.vm.wait_migration(FINAL, timeout=30)
    assert info["status"] == "completed", info
    dst.require_alive()
    return dst


def test_vmigrate_snapshot_loads_into_qemu(machines: Machines) -> None:
    """(a) the guest writes all along; QEMU loads exactly the RAM of the freeze point."""
    src = machines.vmigrate("64M", "--guest", "stress:rate=300,wss=60M,tick=2")
    src.vm.set_caps(**SNAPSHOT)
    wait_for(lambda: (read_header(src.ram) or 0) > 20, 10, "guest progress")
    src.vm.cmd("stop")
    frozen = np.fromfile(src.ram, np.uint8)
    image = machines.ramdir / "vmigrate.snapshot"
    src.vm.events()
    src.vm.cmd("migrate", uri=f"exec:cat > {image}")
    assert snapshot_events(src) == ["MIGRATION setup", "MIGRATION active", "RESUME", "MIGRATION completed"]
    counter = read_header(src.ram)
    wait_for(lambda: read_header(src.ram) > counter + 50, 10, "guest progress after the snapshot")
    src.vm.cmd("stop")
    assert not np.array_equal(frozen, np.fromfile(src.ram, np.uint8)), "the guest wrote nothing meanwhile"

    dst = load(machines, "qemu", image)
    assert np.array_equal(frozen, np.fromfile(dst.ram, np.uint8))


def test_qemu_snapshot_same_events_and_loads_into_vmigrate(machines: Machines) -> None:
    """(c) QEMU's own snapshot of a running ``-M none``: the events vmigrate sends too; vmigrate
    loads QEMU's file, which carries RAM first and the devices last."""
    src = machines.qemu("64M")
    src.vm.set_caps(**SNAPSHOT)
    ram = np.memmap(src.ram, np.uint8, "r+")
    ram[4 << 20:12 << 20] = np.random.default_rng(7).integers(0, 256, 8 << 20, dtype=np.uint8)
    ram.flush()
    image = machines.ramdir / "qemu.snapshot"
    src.vm.events()
    src.vm.cmd("migrate", uri=f"exec:cat > {image}")
    assert snapshot_events(src) == EVENTS
    assert src.vm.status() == "running"
    info = src.vm.migrate_status()
    assert info["ram"]["dirty-sync-count"] == 0

    dst = load(machines, "vmigrate", image)
    assert np.array_equal(np.fromfile(src.ram, np.uint8), np.fromfile(dst.ram, np.uint8))

    mine = machines.vmigrate("64M")
    mine.vm.set_caps(**SNAPSHOT)
    mine.vm.events()
    mine.vm.cmd("migrate", uri=f"exec:cat > {machines.ramdir / 'mine.snapshot'}")
    assert snapshot_events(mine) == EVENTS
