"""The guest programs on a PC: QEMU 7.2 with KVM runs the same bytes as vmigrate's KVM backend.

To compare the two implementations on the same guest behaviour, QEMU boots
our programs: ``qemu-system-x86_64 -M pc -accel kvm -bios <bios.S>`` with
its RAM in a file that :func:`prepare` fills with the loader of our KVM
backend (:func:`boot.install`).  The firmware enters the program at CPL 3
with the registers our backend sets directly, so from the first user
instruction both machines hold the same RAM and registers.

A PC differs where the programs can tell: RAM between 640 KiB and 1 MiB is
VGA and ROM (the stack ends at 0x80000, work starts at 1 MiB), and port
0x700, our sleep hypercall, is unassigned there, so a program meant to
sleep spins instead (``stress:tick=0`` spins on the TSC on both machines).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vmigrate.machine.guest import GuestSpec
from vmigrate.machine.kvm.system import KvmSystem
from vmigrate.machine.kvm.vcpu import Vcpu
from vmigrate.machine.kvm.vm import KvmVM
from vmigrate.machine.x86guest import boot, build
from vmigrate.machine.x86guest.programs import program_for

#: QEMU's ``pc`` machine keeps all RAM below 4 GiB up to this size; above, it splits RAM around the PCI hole.
MAX_RAM = 3 << 30


def host_tsc_hz() -> int:
    """The TSC rate KVM gives a new vCPU: what a QEMU guest on KVM sees as well."""
    system = KvmSystem()
    vm = KvmVM(system)
    try:
        cpu = Vcpu(system, vm, 0)
        try:
            return cpu.tsc_khz() * 1000
        finally:
            cpu.close()
    finally:
        vm.close()
        system.close()


def prepare(ram_path: Path, size: int, guest: GuestSpec) -> None:
    """Create *ram_path* as the *size*-byte RAM of a PC about to run *guest* (a sparse file)."""
    if not 0 < size <= MAX_RAM:
        raise ValueError(f"a PC guest here has 1 byte to {MAX_RAM >> 30} GiB of RAM")
    program = program_for(guest, size, host_tsc_hz())
    if program is None:
        raise ValueError("the 'idle' guest has no program to boot on a PC")
    with open(ram_path, "wb") as f:
        os.ftruncate(f.fileno(), size)
    ram = np.memmap(ram_path, dtype=np.uint8, mode="r+", shape=(size,))
    try:
        boot.install(ram, size, build.image(program.name), program.arguments)
        ram.flush()
    finally:
        del ram


def qemu_argv(ram_path: Path, size: int) -> list[str]:
    """QEMU's options for a KVM PC booting the RAM of :func:`prepare` (add -qmp, -serial, -incoming)."""
    return [
        "-M", "pc,memory-backend=ram", "-accel", "kvm", "-m", f"{size >> 20}M",
        "-object", f"memory-backend-file,id=ram,size={size >> 20}M,mem-path={ram_path},share=on",
        "-bios", str(build.binary(build.BIOS)), "-nodefaults", "-display", "none",
    ]
