"""Our guest programs on QEMU 7.2 with KVM: booted by bios.S on a PC, the same bytes as under vmigrate.

These make the side-by-side figures of benchmarks/kvm_convergence.py
meaningful: the PC runs the program to the same result, and QEMU migrates
it between two PCs with the guest still running afterwards.
"""

from __future__ import annotations

from pathlib import Path

from test_kvm_migration import counter
from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import GuestSpec
from vmigrate.machine.x86guest import pc

MIB = 1 << 20
CHECKSUM = "checksum:size=16M,rounds=100"


def serial_line(path: Path) -> str | None:
    text = path.read_text() if path.exists() else ""
    return text if text.endswith("\n") else None


def test_checksum_guest_on_a_qemu_pc_prints_what_it_prints_under_vmigrate(spawn, tmp_path):
    ram, qemu_out, ours_out = tmp_path / "pc.ram", tmp_path / "pc.serial", tmp_path / "vmigrate.serial"
    pc.prepare(ram, 64 * MIB, GuestSpec.parse(CHECKSUM))
    spawn("qemu", "-serial", f"file:{qemu_out}", memory="64M", mem_path=ram, pc=True)
    spawn("vmigrate", "--accel", "kvm", "-m", "64M", "--guest", CHECKSUM, "--serial", str(ours_out))
    on_qemu = wait_for(lambda: serial_line(qemu_out), 30, "the checksum from QEMU")
    on_vmigrate = wait_for(lambda: serial_line(ours_out), 30, "the checksum from vmigrate")
    assert on_qemu.startswith("checksum ") and on_qemu == on_vmigrate


def test_qemu_migrates_a_stress_guest_between_pcs_and_it_keeps_running(spawn, tmp_path):
    src_ram, dst_ram = tmp_path / "src.ram", tmp_path / "dst.ram"
    pc.prepare(src_ram, 64 * MIB, GuestSpec.parse("stress:rate=64,wss=32M,tick=0"))
    pc.prepare(dst_ram, 64 * MIB, GuestSpec.parse("stress:rate=64,wss=32M,tick=0"))
    src = spawn("qemu", memory="64M", mem_path=src_ram, pc=True)
    dst = spawn("qemu", "-incoming", "tcp:127.0.0.1:0", memory="64M", mem_path=dst_ram, pc=True)
    port = dst.migrate_status()["socket-address"][0]["port"]
    wait_for(lambda: counter(src_ram) > 100, 10, "the guest stamping pages")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration({"completed", "failed"}, timeout=60)
    assert info["status"] == "completed", info
    at_switchover = counter(src_ram)
    wait_for(lambda: counter(dst_ram) > at_switchover + 100, 10, "the guest stamping pages on the destination")
