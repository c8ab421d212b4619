"""The KVM ioctl ABI (linux/kvm.h, x86-64) as ctypes structures and computed ioctl numbers.

Every ioctl number is derived from its direction, number and the
``ctypes.sizeof`` of its argument structure, exactly as the kernel's
``_IOR``/``_IOW``/``_IOWR`` macros do: several KVM ioctls share a number and
differ only in the encoded size (KVM_GET_PIT2 and KVM_GET_VCPU_EVENTS are
both 0x9f), so a hand-copied constant would silently call the wrong one.

Calls go through libc's ``ioctl`` via ctypes, which releases the GIL for
the duration of the call: a vCPU thread blocked in KVM_RUN does not hold up
the rest of the process.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache

c_u8, c_u16, c_u32, c_u64, c_i64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64

# -- ioctl number encoding (asm-generic/ioctl.h) --------------------------------

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2

KVMIO = 0xAE


def _IOC(direction: int, kind: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument of {size} bytes does not fit the size field")
    return (direction << _IOC_DIRSHIFT) | (kind << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _IO(kind: int, nr: int) -> int:
    return _IOC(_IOC_NONE, kind, nr, 0)


def _IOR(kind: int, nr: int, ctype: type) -> int:
    return _IOC(_IOC_READ, kind, nr, ctypes.sizeof(ctype))


def _IOW(kind: int, nr: int, ctype: type) -> int:
    return _IOC(_IOC_WRITE, kind, nr, ctypes.sizeof(ctype))


def _IOWR(kind: int, nr: int, ctype: type) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, kind, nr, ctypes.sizeof(ctype))


# -- structures -------------------------------------------------------------------

class Struct(ctypes.Structure):
    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n, *_ in self._fields_)})"


class kvm_userspace_memory_region(Struct):
    _fields_ = [("slot", c_u32), ("flags", c_u32), ("guest_phys_addr", c_u64),
                ("memory_size", c_u64), ("userspace_addr", c_u64)]


class kvm_regs(Struct):
    _fields_ = [(name, c_u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(Struct):
    _fields_ = [("base", c_u64), ("limit", c_u32), ("selector", c_u16), ("type", c_u8),
                ("present", c_u8), ("dpl", c_u8), ("db", c_u8), ("s", c_u8), ("l", c_u8),
                ("g", c_u8), ("avl", c_u8), ("unusable", c_u8), ("padding", c_u8)]


class kvm_dtable(Struct):
    _fields_ = [("base", c_u64), ("limit", c_u16), ("padding", c_u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(Struct):
    _fields_ = [*((seg, kvm_segment) for seg in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                *((cr, c_u64) for cr in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
                ("interrupt_bitmap", c_u64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_msr_entry(Struct):
    _fields_ = [("index", c_u32), ("reserved", c_u32), ("data", c_u64)]


class kvm_msrs(Struct):
    """Header only; the entries follow it (see :func:`flexible`)."""

    _fields_ = [("nmsrs", c_u32), ("pad", c_u32)]


class kvm_msr_list(Struct):
    """Header only; the indices follow it."""

    _fields_ = [("nmsrs", c_u32)]


class kvm_cpuid_entry2(Struct):
    _fields_ = [("function", c_u32), ("index", c_u32), ("flags", c_u32), ("eax", c_u32),
                ("ebx", c_u32), ("ecx", c_u32), ("edx", c_u32), ("padding", c_u32 * 3)]


class kvm_cpuid2(Struct):
    """Header only; the entries follow it."""

    _fields_ = [("nent", c_u32), ("padding", c_u32)]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(Struct):
    _fields_ = [("regs", c_u8 * KVM_APIC_REG_SIZE)]


class kvm_xsave(Struct):
    """The legacy 4 KiB area; KVM_GET_XSAVE2 may need more (KVM_CAP_XSAVE2 tells how much)."""

    _fields_ = [("region", c_u32 * 1024)]


KVM_MAX_XCRS = 16


class kvm_xcr(Struct):
    _fields_ = [("xcr", c_u32), ("reserved", c_u32), ("value", c_u64)]


class kvm_xcrs(Struct):
    _fields_ = [("nr_xcrs", c_u32), ("flags", c_u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS), ("padding", c_u64 * 16)]


class kvm_debugregs(Struct):
    _fields_ = [("db", c_u64 * 4), ("dr6", c_u64), ("dr7", c_u64), ("flags", c_u64), ("reserved", c_u64 * 9)]


class _events_exception(Struct):
    _fields_ = [("injected", c_u8), ("nr", c_u8), ("has_error_code", c_u8), ("pending", c_u8),
                ("error_code", c_u32)]


class _events_interrupt(Struct):
    _fields_ = [("injected", c_u8), ("nr", c_u8), ("soft", c_u8), ("shadow", c_u8)]


class _events_nmi(Struct):
    _fields_ = [("injected", c_u8), ("pending", c_u8), ("masked", c_u8), ("pad", c_u8)]


class _events_smi(Struct):
    _fields_ = [("smm", c_u8), ("pending", c_u8), ("smm_inside_nmi", c_u8), ("latched_init", c_u8)]


class kvm_vcpu_events(Struct):
    _fields_ = [("exception", _events_exception), ("interrupt", _events_interrupt), ("nmi", _events_nmi),
                ("sipi_vector", c_u32), ("flags", c_u32), ("smi", _events_smi),
                ("triple_fault_pending", c_u8), ("reserved", c_u8 * 26),
                ("exception_has_payload", c_u8), ("exception_payload", c_u64)]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02
KVM_VCPUEVENT_VALID_SHADOW = 0x04
KVM_VCPUEVENT_VALID_SMM = 0x08


class kvm_mp_state(Struct):
    _fields_ = [("mp_state", c_u32)]


class kvm_clock_data(Struct):
    _fields_ = [("clock", c_u64), ("flags", c_u32), ("pad0", c_u32), ("realtime", c_u64),
                ("host_tsc", c_u64), ("pad", c_u32 * 4)]


KVM_CLOCK_REALTIME = 1 << 2


class kvm_irqchip(Struct):
    """``chip`` is the 512-byte union of kvm_pic_state / kvm_ioapic_state, kept opaque."""

    _fields_ = [("chip_id", c_u32), ("pad", c_u32), ("chip", c_u8 * 512)]


KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC = 0, 1, 2


class kvm_pit_config(Struct):
    _fields_ = [("flags", c_u32), ("pad", c_u32 * 15)]


class kvm_pit_channel_state(Struct):
    _fields_ = [("count", c_u32), ("latched_count", c_u16), ("count_latched", c_u8),
                ("status_latched", c_u8), ("status", c_u8), ("read_state", c_u8), ("write_state", c_u8),
                ("write_latch", c_u8), ("rw_mode", c_u8), ("mode", c_u8), ("bcd", c_u8), ("gate", c_u8),
                ("count_load_time", c_i64)]


class kvm_pit_state2(Struct):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", c_u32), ("reserved", c_u32 * 9)]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_dirty_log(Struct):
    _fields_ = [("slot", c_u32), ("padding1", c_u32), ("dirty_bitmap", c_u64)]


class kvm_clear_dirty_log(Struct):
    _fields_ = [("slot", c_u32), ("num_pages", c_u32), ("first_page", c_u64), ("dirty_bitmap", c_u64)]


class kvm_dirty_gfn(Struct):
    _fields_ = [("flags", c_u32), ("slot", c_u32), ("offset", c_u64)]


KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1
#: The dirty ring is mapped from the vCPU fd at this page offset.
KVM_DIRTY_LOG_PAGE_OFFSET = 64


class kvm_enable_cap(Struct):
    _fields_ = [("cap", c_u32), ("flags", c_u32), ("args", c_u64 * 4), ("pad", c_u8 * 64)]


class kvm_run_io(Struct):
    _fields_ = [("direction", c_u8), ("size", c_u8), ("port", c_u16), ("count", c_u32), ("data_offset", c_u64)]


class kvm_run_mmio(Struct):
    _fields_ = [("phys_addr", c_u64), ("data", c_u8 * 8), ("len", c_u32), ("is_write", c_u8)]


class kvm_run_internal(Struct):
    _fields_ = [("suberror", c_u32), ("ndata", c_u32), ("data", c_u64 * 16)]


class kvm_run_fail_entry(Struct):
    _fields_ = [("hardware_entry_failure_reason", c_u64), ("cpu", c_u32)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [("io", kvm_run_io), ("mmio", kvm_run_mmio), ("internal", kvm_run_internal),
                ("fail_entry", kvm_run_fail_entry),
                ("hardware_exit_reason", c_u64), ("padding", c_u8 * 256)]


class kvm_run(Struct):
    """The head of the shared ``kvm_run`` page (only the members this VMM reads)."""

    _fields_ = [("request_interrupt_window", c_u8), ("immediate_exit", c_u8), ("padding1", c_u8 * 6),
                ("exit_reason", c_u32), ("ready_for_interrupt_injection", c_u8), ("if_flag", c_u8),
                ("flags", c_u16), ("cr8", c_u64), ("apic_base", c_u64), ("exit", kvm_run_exit)]


KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1

# -- exit reasons, capabilities, flags --------------------------------------------

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_DIRTY_RING_FULL = 31

EXIT_NAMES = {v: k[len("KVM_EXIT_"):].lower() for k, v in dict(globals()).items()
              if k.startswith("KVM_EXIT_") and isinstance(v, int) and not k.startswith("KVM_EXIT_IO_")}

KVM_API_VERSION = 12
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_PIT2 = 33
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_XSAVE2 = 208

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_HALTED = 3

# -- ioctl numbers ----------------------------------------------------------------

# /dev/kvm
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
# VM
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, kvm_irqchip)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, kvm_clock_data)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, kvm_pit_state2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, kvm_pit_state2)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xC0, kvm_clear_dirty_log)
KVM_RESET_DIRTY_RINGS = _IO(KVMIO, 0xC7)
# vCPU
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, kvm_debugregs)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, kvm_xcrs)
KVM_GET_XSAVE2 = _IOR(KVMIO, 0xCF, kvm_xsave)


# -- calling ----------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: "ctypes._CData | ctypes.Array | int | None" = None) -> int:
    """ioctl(2) with a ctypes object (passed by address) or an integer argument; raises OSError."""
    if arg is None:
        raw = 0
    elif isinstance(arg, int):
        raw = arg
    else:
        raw = ctypes.addressof(arg)
    ret = _ioctl(fd, request, raw)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


@lru_cache(maxsize=64)
def flexible(header: type, entry: type, count: int) -> type:
    """A structure type for a KVM header followed by *count* entries (``entries[0]`` in C)."""
    return type(f"{header.__name__}_{count}", (Struct,), {"_fields_": [("h", header), ("entries", entry * count)]})
