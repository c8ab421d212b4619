"""KVM machine state as device models: one section per vCPU, the irqchip, the PIT, the clock.

Only vmigrate reads these sections (a QEMU 7.2 destination is a ``-M none``
machine without CPUs).  Fields come from the ABI structures
(:mod:`vmigrate.machine.kvm.structs`), so a section is readable in
``vmigrate analyze`` member by member.

Stream order is restore order: irqchip, PIT, the vCPUs, the clock, then the
UART (see :meth:`KvmVcpus.devices`), so each section is applied as soon as
it is loaded, while the vCPUs are parked.  Within a vCPU the save and
restore orders are the ones that proved right on these hosts: MP state is
read first (reading it may update the LAPIC) and written late; SREGS
(EFER, control registers, APIC base) before the LAPIC; events last.
"""

from __future__ import annotations

import ctypes

from vmigrate.machine.kvm import abi, structs
from vmigrate.machine.kvm.vcpu import Vcpu
from vmigrate.machine.kvm.vm import KvmVM
from vmigrate.migration.wire import vmstate

#: Room for the MSRs of one vCPU; the probed list is far shorter (about 40 here).
MSR_SLOTS = 96
_IRQCHIPS = (("pic_master", abi.KVM_IRQCHIP_PIC_MASTER), ("pic_slave", abi.KVM_IRQCHIP_PIC_SLAVE),
             ("ioapic", abi.KVM_IRQCHIP_IOAPIC))
_CHIP_SIZE = ctypes.sizeof(abi.kvm_irqchip) - abi.kvm_irqchip.chip.offset


def _struct_fields(prefix: str, ctype: type) -> tuple[vmstate.Field, ...]:
    return tuple(structs.fields_of(ctype, f"{prefix}."))


def vcpu_description(xsave_size: int) -> vmstate.Description:
    return vmstate.Description("kvm-cpu", 1, (
        vmstate.Field("mp_state", "uint32", 4),
        *_struct_fields("regs", abi.kvm_regs),
        *_struct_fields("sregs", abi.kvm_sregs),
        vmstate.Field("xsave", "buffer", xsave_size),
        *_struct_fields("xcrs", abi.kvm_xcrs),
        *_struct_fields("debugregs", abi.kvm_debugregs),
        vmstate.Field("lapic", "buffer", abi.KVM_APIC_REG_SIZE),
        vmstate.Field("msr_count", "uint32", 4),
        vmstate.Field("msr_index", "uint32", 4, count=MSR_SLOTS),
        vmstate.Field("msr_value", "uint64", 8, count=MSR_SLOTS),
        *_struct_fields("events", abi.kvm_vcpu_events),
    ), minimum_version_id=1)


class VcpuState:
    """One vCPU's registers, FPU/XSAVE, LAPIC, MSRs, pending events and MP state."""

    idstr = "kvm-cpu"

    def __init__(self, vcpu: Vcpu, msrs: list[int], section_id: int) -> None:
        if len(msrs) > MSR_SLOTS:
            raise ValueError(f"{len(msrs)} MSRs do not fit the {MSR_SLOTS} slots of the vCPU section")
        self.vcpu = vcpu
        self.msrs = msrs
        self.instance_id = vcpu.index
        self.section_id = section_id
        self.description = vcpu_description(vcpu.xsave_size)
        #: MSRs the last load could not write back (reported, not fatal).
        self.refused_msrs: list[int] = []

    def save(self) -> dict:
        cpu = self.vcpu
        values: dict = {"mp_state": cpu.get_mp_state()}
        values.update(structs.values_of(cpu.get_regs(), "regs."))
        values.update(structs.values_of(cpu.get_sregs(), "sregs."))
        values["xsave"] = cpu.get_xsave()
        values.update(structs.values_of(cpu.get_xcrs(), "xcrs."))
        values.update(structs.values_of(cpu.get_debugregs(), "debugregs."))
        values["lapic"] = cpu.get_lapic()
        readable = [(i, v) for i, v in zip(self.msrs, cpu.get_msrs(self.msrs)) if v is not None]
        pad = [0] * (MSR_SLOTS - len(readable))
        values["msr_count"] = len(readable)
        values["msr_index"] = [i for i, _ in readable] + pad
        values["msr_value"] = [v for _, v in readable] + pad
        values.update(structs.values_of(cpu.get_events(), "events."))
        return values

    def load(self, values: dict) -> None:
        cpu = self.vcpu
        cpu.set_sregs(structs.load_into(abi.kvm_sregs(), values, "sregs."))
        cpu.set_regs(structs.load_into(abi.kvm_regs(), values, "regs."))
        cpu.set_xsave(values["xsave"])
        cpu.set_xcrs(structs.load_into(abi.kvm_xcrs(), values, "xcrs."))
        cpu.set_lapic(values["lapic"])
        count = min(int(values["msr_count"]), MSR_SLOTS)
        self.refused_msrs = cpu.set_msrs(list(zip(values["msr_index"][:count], values["msr_value"][:count])))
        cpu.set_debugregs(structs.load_into(abi.kvm_debugregs(), values, "debugregs."))
        cpu.set_mp_state(int(values["mp_state"]))
        cpu.set_events(structs.load_into(abi.kvm_vcpu_events(), values, "events."))


IRQCHIP = vmstate.Description("kvm-irqchip", 1, tuple(
    vmstate.Field(name, "buffer", _CHIP_SIZE) for name, _ in _IRQCHIPS), minimum_version_id=1)
PIT = vmstate.Description("kvm-pit", 1, _struct_fields("pit", abi.kvm_pit_state2), minimum_version_id=1)
CLOCK = vmstate.Description("kvmclock", 1, _struct_fields("clock", abi.kvm_clock_data), minimum_version_id=1)


class IrqchipState:
    """The in-kernel PICs and IOAPIC (each chip's state kept as KVM's raw layout)."""

    idstr = "kvm-irqchip"
    instance_id = 0
    description = IRQCHIP

    def __init__(self, vm: KvmVM, section_id: int) -> None:
        self.vm = vm
        self.section_id = section_id

    def save(self) -> dict:
        return {name: bytes(self.vm.get_irqchip(chip_id).chip) for name, chip_id in _IRQCHIPS}

    def load(self, values: dict) -> None:
        for name, chip_id in _IRQCHIPS:
            chip = abi.kvm_irqchip(chip_id)
            ctypes.memmove(chip.chip, bytes(values[name]), _CHIP_SIZE)
            self.vm.set_irqchip(chip)


class PitState:
    idstr = "kvm-pit"
    instance_id = 0
    description = PIT

    def __init__(self, vm: KvmVM, section_id: int) -> None:
        self.vm = vm
        self.section_id = section_id

    def save(self) -> dict:
        return structs.values_of(self.vm.get_pit(), "pit.")

    def load(self, values: dict) -> None:
        self.vm.set_pit(structs.load_into(abi.kvm_pit_state2(), values, "pit."))


class ClockState:
    """kvmclock: restored with flags 0, so guest time stands still during the downtime."""

    idstr = "kvmclock"
    instance_id = 0
    description = CLOCK

    def __init__(self, vm: KvmVM, section_id: int) -> None:
        self.vm = vm
        self.section_id = section_id

    def save(self) -> dict:
        return structs.values_of(self.vm.get_clock(), "clock.")

    def load(self, values: dict) -> None:
        clock = abi.kvm_clock_data(clock=int(values["clock.clock"]))
        self.vm.set_clock(clock)
