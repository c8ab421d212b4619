"""COLO (``x-colo``) between real QEMU 7.2 and vmigrate, both ways (docs/colo.md).

Debian's QEMU 7.2 is built with replication, accepts ``x-colo`` and runs
COLO on a ``-M none`` machine with no replication disks and no colo-compare
or filter objects: checkpoints are then periodic only.  QEMU ``-M none`` has
no CPU, so:

* vmigrate → QEMU: vmigrate's ``ab`` guest runs on the primary; after the
  primary is killed and QEMU fails over, QEMU's RAM holds an intact pattern
  whose counter is at or past one read before the last checkpoint.
* QEMU → vmigrate: nothing can write QEMU's RAM between checkpoints (qtest
  and the generic loader need a CPU, which an x86 ``-M none`` cannot have),
  so its checkpoints carry an empty RAM record and the device state; vmigrate
  applies them, and after the kill and failover its RAM equals QEMU's.
"""

from __future__ import annotations

import os
import signal

import pytest

from machines import Machine, Machines
from ramfile import ab_state, fill_pattern, first_difference
from vmigrate.harness.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

SIZE = "64M"
MIB = 1 << 20
AB = "ab:end=24M"
DELAY_MS = 100
COLO = {"x-colo": True}


def colo_exits(machine: Machine) -> list:
    return [e["data"] for e in machine.vm.events(0.1) if e["event"] == "COLO_EXIT"]


def vmigrate_checkpoints(machine: Machine) -> int:
    return machine.vm.migrate_status().get("x-vmigrate-colo", {}).get("checkpoints", 0)


def in_colo(machine: Machine, mode: str) -> None:
    assert machine.vm.wait_migration({"colo", "failed", "completed"}, timeout=30)["status"] == "colo"
    assert machine.vm.cmd("query-colo-status") == {"mode": mode, "last-mode": "none", "reason": "none"}


def fail_over(machine: Machine, mode: str) -> None:
    """The peer was killed: COLO_EXIT error, then x-colo-lost-heartbeat takes over."""
    assert wait_for(lambda: colo_exits(machine), 10, f"COLO_EXIT on {machine.kind}") == \
        [{"mode": mode, "reason": "error"}]
    assert machine.vm.migrate_status()["status"] == "colo"
    machine.vm.cmd("x-colo-lost-heartbeat")
    assert machine.vm.wait_migration({"completed", "failed"}, timeout=10)["status"] == "completed"
    assert machine.vm.status() == "running"
    assert machine.vm.cmd("query-colo-status") == {"mode": "none", "last-mode": mode, "reason": "request"}


@pytest.mark.parametrize("caps", [{}, {"return-path": True}, {"multifd": True}],
                         ids=["plain", "return-path", "multifd"])
def test_vmigrate_primary_qemu_secondary(machines: Machines, caps: dict) -> None:
    """Also with a return path (beyond QEMU 7.2, whose own source fails then: its return-path
    thread reads the secondary's CHECKPOINT_READY as an invalid message) and with multifd."""
    src = machines.vmigrate(SIZE, "--guest", AB)
    src.vm.set_caps(**COLO, **caps)
    src.vm.cmd("migrate-set-parameters", **{"x-checkpoint-delay": DELAY_MS})
    dst = machines.qemu(SIZE, "-incoming", "defer")
    dst.vm.set_caps(multifd=bool(caps.get("multifd")))
    dst.vm.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = dst.vm.migrate_status()["socket-address"][0]["port"]
    src.vm.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    in_colo(src, "primary")
    in_colo(dst, "secondary")
    wait_for(lambda: vmigrate_checkpoints(src) >= 3, 20, "three checkpoints")
    wait_for(lambda: src.vm.migrate_status()["x-vmigrate-colo"]["last-bytes"] > 1 << 20, 10,
             "a checkpoint of pages")
    assert src.vm.status() == "running" and dst.vm.status() == "running"

    before, broken = ab_state(src.ram, src.size, 1 * MIB // 4096, 24 * MIB // 4096)
    done = vmigrate_checkpoints(src)
    wait_for(lambda: vmigrate_checkpoints(src) > done, 10, "a checkpoint after the counter was read")
    os.kill(src.vm.pid, signal.SIGKILL)
    src.vm.proc.wait(10)
    fail_over(dst, "secondary")
    dst.require_alive()
    counter, broken = ab_state(dst.ram, dst.size, 1 * MIB // 4096, 24 * MIB // 4096)
    assert broken.size == 0, f"ab pattern broken on QEMU at page {int(broken[0])}"
    assert counter >= before


@pytest.mark.parametrize("multifd", [False, True], ids=["plain", "multifd"])
def test_qemu_primary_vmigrate_secondary(machines: Machines, multifd: bool) -> None:
    """With multifd, every checkpoint's RAM EOS also waits for a SYNC on each channel."""
    src = machines.qemu(SIZE)
    fill_pattern(src.ram, src.size, seed=3)
    src.vm.set_caps(**COLO, multifd=multifd)
    src.vm.cmd("migrate-set-parameters", **{"x-checkpoint-delay": DELAY_MS})
    dst = machines.vmigrate(SIZE, "--incoming", "defer")
    dst.vm.set_caps(multifd=multifd)
    dst.vm.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = dst.vm.migrate_status()["socket-address"][0]["port"]
    src.vm.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    in_colo(src, "primary")
    in_colo(dst, "secondary")
    wait_for(lambda: src.vm.status() == "running", 10, "QEMU's guest to restart after CHECKPOINT_READY")
    wait_for(lambda: dst.vm.status() == "running", 10, "vmigrate's guest between checkpoints, as QEMU's")
    # Each checkpoint: QEMU's messages, its (empty) RAM END record and its device state, loaded.
    wait_for(lambda: vmigrate_checkpoints(dst) >= 3, 20, "three checkpoints applied")
    assert first_difference(src.ram, dst.ram, src.size) is None

    os.kill(src.vm.pid, signal.SIGKILL)
    src.vm.proc.wait(10)
    fail_over(dst, "secondary")
    assert first_difference(src.ram, dst.ram, src.size) is None


@pytest.mark.parametrize("primary", ["qemu", "vmigrate"])
def test_cancel_in_colo(machines: Machines, primary: str) -> None:
    """migrate_cancel in ``colo`` cancels nothing (QEMU 7.2: colo is not a running status); it
    shuts the channel, the next checkpoint fails, and the primary waits, still in ``colo``,
    for its failover.  Both primaries against a QEMU secondary."""
    src = machines.start(primary, SIZE)
    src.vm.set_caps(**COLO)
    src.vm.cmd("migrate-set-parameters", **{"x-checkpoint-delay": DELAY_MS})
    dst = machines.qemu(SIZE, "-incoming", "tcp:127.0.0.1:0")
    port = dst.vm.migrate_status()["socket-address"][0]["port"]
    src.vm.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    in_colo(src, "primary")
    in_colo(dst, "secondary")
    wait_for(lambda: src.vm.status() == "running", 10, "the primary's guest to restart")
    src.vm.cmd("migrate_cancel")
    assert wait_for(lambda: colo_exits(dst), 10, "COLO_EXIT on the secondary") == \
        [{"mode": "secondary", "reason": "error"}]
    assert wait_for(lambda: colo_exits(src), 10, "COLO_EXIT on the primary") == \
        [{"mode": "primary", "reason": "error"}]
    assert src.vm.migrate_status()["status"] == "colo"
    assert src.vm.cmd("query-colo-status") == {"mode": "primary", "last-mode": "none", "reason": "none"}
    src.vm.cmd("x-colo-lost-heartbeat")
    assert src.vm.wait_migration({"completed"}, timeout=10)["status"] == "completed"
    assert wait_for(lambda: src.vm.status() == "running", 10, "the primary to go on alone")


def test_qemu_primary_with_return_path_fails_as_qemu(machines: Machines) -> None:
    """QEMU 7.2's own limit, shown against vmigrate as it shows against QEMU: the primary's
    return-path thread takes CHECKPOINT_READY for an invalid message and fails the migration;
    the secondary, in ``colo``, reports the broken channel and waits for a failover."""
    src = machines.qemu(SIZE)
    src.vm.set_caps(**COLO, **{"return-path": True})
    dst = machines.vmigrate(SIZE, "--incoming", "tcp:127.0.0.1:0")
    port = dst.vm.migrate_status()["socket-address"][0]["port"]
    src.vm.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.vm.wait_migration({"colo", "failed", "completed"}, timeout=30)["status"] == "failed"
    assert "RP: Received invalid message 0x0000 length 0x0000" in src.vm.log()
    assert wait_for(lambda: src.vm.status() == "running", 10, "QEMU's guest to restart")
    fail_over(dst, "secondary")
