"""Postcopy pause and recovery between real QEMU 7.2 and vmigrate, in both directions.

docs/qemu/postcopy.md §7 has what each side must do: pause on a broken
stream (§7.1), then ``migrate-recover`` on the destination, ``migrate
resume=true`` on the source, and the headerless RECV_BITMAP / RESUME /
RESUME_ACK handshake (§7.2) after which the source resends exactly the
pages missing from the destination's bitmap.  Two pauses per migration, one
issued on each side; RAM must end byte-equal.  QEMU ``-M none`` and the
``idle`` guest touch no RAM, so nothing but the migration writes it.  RAM
files are on tmpfs (the ``ramdir`` fixture): userfaultfd needs shmem.
"""

from __future__ import annotations

import time

import pytest

from procs import migration_statuses
from machines import FINAL, Machine, Machines
from ramfile import fill_pattern, first_difference
from vmigrate.harness.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20
POSTCOPY = {"postcopy-ram": True}
CYCLE = ["postcopy-paused", "postcopy-recover", "postcopy-active"]
#: ``migrate-recover`` emits ``setup`` on the destination (QEMU does so unconditionally).
DST_CYCLE = ["postcopy-paused", "setup", "postcopy-recover", "postcopy-active"]


def port(dst: Machine) -> int:
    return dst.vm.migrate_status()["socket-address"][0]["port"]


def status(machine: Machine) -> str:
    machine.require_alive()
    return machine.vm.migrate_status()["status"]


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
@pytest.mark.parametrize("src_kind,dst_kind", [("qemu", "vmigrate"), ("vmigrate", "qemu")])
def test_pause_and_recover_twice(machines: Machines, src_kind: str, dst_kind: str, preempt: bool) -> None:
    """A random RAM pattern still in postcopy after two pauses at 4 MiB/s: the first pause is
    the source's ``migrate-pause``, the second the destination's; each side implements its half
    of §7 against the other's QEMU counterpart (with preempt, both channels are re-made, §6),
    and the files end equal."""
    src = machines.start(src_kind, "64M", *(("--guest", "idle") if src_kind == "vmigrate" else ()))
    # The idle guest writes no RAM, so filling its file after start is what the migration sees.
    fill_pattern(src.ram, src.size, seed=31, random_pages=12000)
    dst = machines.start(dst_kind, "64M", "-incoming", "tcp:127.0.0.1:0",
                         *(("--guest", "idle") if dst_kind == "vmigrate" else ()))
    for m in (src, dst):
        m.vm.set_caps(**POSTCOPY, **{"postcopy-preempt": preempt})

    src.vm.cmd("migrate-set-parameters", **{"max-bandwidth": 8 * MIB, "max-postcopy-bandwidth": 4 * MIB})
    src.vm.cmd("migrate", uri=f"tcp:127.0.0.1:{port(dst)}")
    time.sleep(1.0)
    assert status(src) == "active", "precopy must still be running at the switch"
    src.vm.cmd("migrate-start-postcopy")

    remaining = []
    for by in (src, dst):
        wait_for(lambda: status(src) == "postcopy-active" and status(dst) == "postcopy-active", 10,
                 "postcopy-active on both sides")
        time.sleep(0.7)
        by.vm.cmd("migrate-pause")
        wait_for(lambda: status(src) == "postcopy-paused", 10, f"{src.kind} source paused")
        wait_for(lambda: status(dst) == "postcopy-paused", 10, f"{dst.kind} destination paused")
        remaining.append(src.vm.migrate_status()["ram"]["remaining"])
        dst.vm.cmd("migrate-recover", uri="tcp:127.0.0.1:0")
        if by is dst:
            # The rest at full speed (0: unlimited); set while paused, as vmigrate, unlike QEMU,
            # applies max-postcopy-bandwidth only when postcopy (re)starts, not live.
            src.vm.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
        src.vm.cmd("migrate", uri=f"tcp:127.0.0.1:{port(dst)}", resume=True)
        wait_for(lambda: status(src) in {"postcopy-active", "completed"}, 10, "the source to resume")
    assert remaining[0] > remaining[1] > 0, f"progress between the pauses: {remaining}"

    info = src.vm.wait_migration(FINAL, timeout=40)
    assert info["status"] == "completed", info
    dst.require_alive()
    dinfo = dst.vm.wait_migration(FINAL, timeout=10)
    assert dinfo["status"] == "completed", dinfo
    src_seen = migration_statuses(src.vm, "completed")
    dst_seen = migration_statuses(dst.vm, "completed")
    assert src_seen == ["setup", "active", "postcopy-active", *CYCLE * 2, "completed"]
    assert dst_seen == ["active", "postcopy-active", *DST_CYCLE * 2, "completed"]
    assert src.vm.status() == "postmigrate"
    assert dst.vm.status() == "running"
    assert first_difference(src.ram, dst.ram, src.size) is None
