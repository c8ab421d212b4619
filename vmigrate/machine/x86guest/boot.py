"""The boot state of an x86 guest program: descriptor tables and page tables in RAM, initial CPU state.

The guest programs run in 64-bit user mode (CPL 3) from their first
instruction: on these hosts kernel-mode guest code is emulated at about a
million instructions per second while user-mode code runs natively.  The
VMM writes a GDT, a TSS and identity-mapped page tables (2 MiB pages, user
bit set) into guest RAM and hands KVM segment and control registers that
already describe long mode at CPL 3.  The TSS's I/O permission bitmap opens
the low ports, so the programs reach the UART and the sleep hypercall with
plain ``in``/``out`` (RFLAGS.IOPL would not do: PVM ignores it in user
mode and raises #GP).

The tables live in guest RAM, so they migrate with it like any guest data.
The layout and selectors are the ``#define``s of ``guest.h``.
"""

from __future__ import annotations

import struct

import numpy as np

from vmigrate.machine.x86guest.build import CODE_BASE, GUEST_H

GDT_BASE = GUEST_H["GDT_BASE"]
TSS_BASE = GUEST_H["TSS_BASE"]
PML4_BASE = GUEST_H["PML4_BASE"]
PDPT_BASE = GUEST_H["PDPT_BASE"]
PD_BASE = GUEST_H["PD_BASE"]
#: Page directories fit below the code: each maps 1 GiB.
MAX_MAPPED_GIB = (CODE_BASE - PD_BASE) // 0x1000
#: The first 4 GiB are always mapped: a PC's firmware (bios.S) runs just below 4 GiB when it turns paging on.
MIN_MAPPED_GIB = 4
BOOT_ARGS = GUEST_H["BOOT_ARGS"]
#: The registers bios.S loads before entering the program, in this order.
BOOT_REGISTERS = ("rip", "rsp", "rdi", "rsi", "rdx", "rcx", "rbx")
STACK_TOP = GUEST_H["STACK_TOP"]
#: Programs work on memory from here up; everything below is the loader's.
WORK_BASE = GUEST_H["WORK_BASE"]

SEL_KERNEL_CODE = GUEST_H["SEL_KERNEL_CODE"]
SEL_KERNEL_DATA = GUEST_H["SEL_KERNEL_DATA"]
SEL_USER_DATA = GUEST_H["SEL_USER_DATA"]
SEL_USER_CODE = GUEST_H["SEL_USER_CODE"]
SEL_TSS = GUEST_H["SEL_TSS"]
#: Ports [0, IO_PORTS) are open at CPL 3; the bitmap has one bit per port and an all-ones end byte.
IO_PORTS = GUEST_H["IO_PORTS"]
_TSS_HEAD = 0x68
TSS_SIZE = _TSS_HEAD + IO_PORTS // 8 + 1

_PTE_PRESENT, _PTE_WRITE, _PTE_USER, _PTE_LARGE = 0x1, 0x2, 0x4, 0x80
_TABLE_FLAGS = _PTE_PRESENT | _PTE_WRITE | _PTE_USER

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 18, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
RFLAGS_RESERVED = 0x2


def _descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte segment descriptor: access byte (P, DPL, S, type) and flags nibble (G, D/B, L)."""
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40)
            | (((limit >> 16) & 0xF) << 48) | (flags << 52) | (((base >> 24) & 0xFF) << 56))


def gdt_bytes() -> bytes:
    tss_low = _descriptor(TSS_BASE, TSS_SIZE - 1, 0x8B, 0x0)  # present, busy 64-bit TSS
    entries = [
        0,
        _descriptor(0, 0xFFFFF, 0x9B, 0xA),  # kernel code: L, G
        _descriptor(0, 0xFFFFF, 0x93, 0xC),  # kernel data: D/B, G
        _descriptor(0, 0xFFFFF, 0xF3, 0xC),  # user data, DPL 3
        _descriptor(0, 0xFFFFF, 0xFB, 0xA),  # user code, DPL 3, L
        tss_low, TSS_BASE >> 32,
    ]
    return struct.pack(f"<{len(entries)}Q", *entries)


def tss_bytes() -> bytes:
    """A 64-bit TSS: RSP0 at the top of the stack area, then an I/O bitmap opening ports below IO_PORTS."""
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<Q", tss, 4, STACK_TOP)
    struct.pack_into("<H", tss, 0x66, _TSS_HEAD)
    tss[-1] = 0xFF
    return bytes(tss)


def mapped_gib(top: int) -> int:
    """How many GiB of guest-physical space the page tables map for RAM ending at *top*."""
    return max(MIN_MAPPED_GIB, min(-(-top // (1 << 30)), MAX_MAPPED_GIB))


def install(ram: np.ndarray, top: int, code: bytes, arguments: dict[str, int]) -> None:
    """Write GDT, TSS, page tables, the program and its boot arguments into guest RAM (*ram*: bytes from gpa 0).

    The boot arguments repeat the entry registers of :func:`initial_regs`
    for firmware that cannot be handed registers (bios.S).
    """
    if len(code) > STACK_TOP // 2 - CODE_BASE:
        raise ValueError("guest program too large")
    ram[:WORK_BASE] = 0
    ram[GDT_BASE:GDT_BASE + len(gdt_bytes())] = np.frombuffer(gdt_bytes(), dtype=np.uint8)
    ram[TSS_BASE:TSS_BASE + TSS_SIZE] = np.frombuffer(tss_bytes(), dtype=np.uint8)
    gib = mapped_gib(top)
    words = ram[:WORK_BASE].view(np.uint64)
    words[PML4_BASE // 8] = PDPT_BASE | _TABLE_FLAGS
    words[PDPT_BASE // 8:PDPT_BASE // 8 + gib] = PD_BASE + 0x1000 * np.arange(gib, dtype=np.uint64) | _TABLE_FLAGS
    large = np.arange(gib * 512, dtype=np.uint64) << np.uint64(21)
    words[PD_BASE // 8:PD_BASE // 8 + gib * 512] = large | np.uint64(_TABLE_FLAGS | _PTE_LARGE)
    ram[CODE_BASE:CODE_BASE + len(code)] = np.frombuffer(code, dtype=np.uint8)
    regs = initial_regs(arguments)
    words[BOOT_ARGS // 8:BOOT_ARGS // 8 + len(BOOT_REGISTERS)] = [regs.get(name, 0) for name in BOOT_REGISTERS]


def _segment(selector: int, code: bool) -> dict:
    return {"base": 0, "limit": 0xFFFFFFFF, "selector": selector, "type": 0xB if code else 0x3,
            "present": 1, "dpl": selector & 3, "db": 0 if code else 1, "s": 1, "l": 1 if code else 0,
            "g": 1, "avl": 0, "unusable": 0}


def initial_sregs() -> dict:
    """Segment and control registers of a CPU already in 64-bit mode at CPL 3 (KVM_SET_SREGS values)."""
    data = _segment(SEL_USER_DATA, code=False)
    return {
        "cs": _segment(SEL_USER_CODE, code=True),
        **{name: dict(data) for name in ("ds", "es", "fs", "gs", "ss")},
        "tr": {"base": TSS_BASE, "limit": TSS_SIZE - 1, "selector": SEL_TSS, "type": 0xB, "present": 1, "s": 0},
        "ldt": {"selector": 0, "type": 0x2, "present": 1, "unusable": 1},
        "gdt": {"base": GDT_BASE, "limit": len(gdt_bytes()) - 1},
        "idt": {"base": 0, "limit": 0},
        "cr0": CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG,
        "cr3": PML4_BASE,
        "cr4": CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
        "efer": EFER_LME | EFER_LMA,
    }


def initial_regs(arguments: dict[str, int]) -> dict:
    """General registers at the program's entry: its arguments, the stack, interrupts off."""
    return {**arguments, "rip": CODE_BASE, "rsp": STACK_TOP, "rflags": RFLAGS_RESERVED}
