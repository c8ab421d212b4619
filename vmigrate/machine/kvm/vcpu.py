"""One KVM vCPU: its fd, the shared ``kvm_run`` page, its dirty ring, and its state ioctls.

The state getters and setters are used only while the vCPU thread is
parked outside KVM_RUN (a vCPU ioctl from another thread would wait for
the running one to return).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct

import numpy as np

from vmigrate.machine.kvm import abi
from vmigrate.machine.kvm.system import KvmSystem
from vmigrate.machine.kvm.vm import KvmVM
from vmigrate.machine.memory import PAGE_SIZE

MSR_IA32_TSC = 0x10

_DIRTY_GFN = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
# The exit path reads kvm_run with struct at offsets taken from the ctypes layout (a port-I/O
# exit is the guest's console and clock: ctypes attribute chains cost more than the exit itself).
_EXIT_REASON = struct.Struct("<I")
_EXIT_REASON_AT = abi.kvm_run.exit_reason.offset
_IO_EXIT = struct.Struct("<BBHIQ")
_IO_EXIT_AT = abi.kvm_run.exit.offset + abi.kvm_run_exit.io.offset
assert _IO_EXIT.size == ctypes.sizeof(abi.kvm_run_io)
#: Ring entries examined per step of a harvest.
_COLLECT_WINDOW = 16384


class DirtyRing:
    """The vCPU's dirty ring: KVM appends (slot, page) entries, we collect them and mark them reset."""

    def __init__(self, vcpu_fd: int, entries: int) -> None:
        self._mmap = mmap.mmap(vcpu_fd, entries * _DIRTY_GFN.itemsize, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=abi.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
        self.gfns = np.frombuffer(self._mmap, dtype=_DIRTY_GFN)
        self.entries = entries
        #: Next entry to look at (KVM's and our index run forever; the ring position is this mod entries).
        self.fetch = 0
        #: Pages collected over the ring's life (dirty-rate measurement reads differences).
        self.collected = 0

    def collect(self) -> tuple[np.ndarray, np.ndarray]:
        """Take every published entry from :attr:`fetch` on: (slots, page offsets).

        Flags are read before offsets (x86 keeps loads in order), and an
        entry is handed back (RESET) only after its offset was copied.  The
        ring is walked in contiguous windows up to its end, then from 0.
        """
        slots, offsets = [], []
        while True:
            pos = self.fetch % self.entries
            window = self.gfns[pos:min(pos + _COLLECT_WINDOW, self.entries)]
            dirty = (window["flags"] & abi.KVM_DIRTY_GFN_F_DIRTY) != 0
            n = len(window) if dirty.all() else int(np.argmin(dirty))
            if n == 0:
                break
            slots.append(window["slot"][:n].copy())
            offsets.append(window["offset"][:n].copy())
            window["flags"][:n] = abi.KVM_DIRTY_GFN_F_RESET
            self.fetch += n
            self.collected += n
            if n < len(window):
                break
        if not slots:
            return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.uint64)
        return np.concatenate(slots), np.concatenate(offsets)

    def close(self) -> None:
        self.gfns = None  # type: ignore[assignment]
        self._mmap.close()


class Vcpu:
    def __init__(self, system: KvmSystem, vm: KvmVM, index: int) -> None:
        self.index = index
        self.fd = abi.ioctl(vm.fd, abi.KVM_CREATE_VCPU, index)
        self._run_mmap = mmap.mmap(self.fd, system.vcpu_mmap_size(), mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = abi.kvm_run.from_buffer(self._run_mmap)
        self.ring = DirtyRing(self.fd, vm.dirty_ring_entries) if vm.dirty_ring_entries else None
        abi.ioctl(self.fd, abi.KVM_SET_CPUID2, system.supported_cpuid())
        # KVM_CAP_XSAVE2 answers the size of the guest's XSAVE area (more than 4 KiB with AMX).
        xsave_size = vm.check(abi.KVM_CAP_XSAVE2)
        self.xsave_size = max(xsave_size, ctypes.sizeof(abi.kvm_xsave))
        self._xsave_get = abi.KVM_GET_XSAVE2 if xsave_size else abi.KVM_GET_XSAVE

    def exit_reason(self) -> int:
        return _EXIT_REASON.unpack_from(self._run_mmap, _EXIT_REASON_AT)[0]

    def io_exit(self) -> tuple[int, int, int, int, int]:
        """(direction, size, port, count, data offset) of the current port-I/O exit."""
        return _IO_EXIT.unpack_from(self._run_mmap, _IO_EXIT_AT)

    def io_read(self, offset: int, length: int) -> bytes:
        return self._run_mmap[offset:offset + length]

    def io_write(self, offset: int, data: bytes) -> None:
        self._run_mmap[offset:offset + len(data)] = data

    def kvm_run(self) -> int:
        """One KVM_RUN; returns 0, or the errno (EINTR when kicked)."""
        try:
            abi.ioctl(self.fd, abi.KVM_RUN)
        except OSError as err:
            if err.errno in (errno.EINTR, errno.EAGAIN):
                return err.errno
            raise
        return 0

    # -- state -------------------------------------------------------------------

    def _get(self, request: int, ctype: type) -> ctypes.Structure:
        value = ctype()
        abi.ioctl(self.fd, request, value)
        return value

    def get_regs(self) -> abi.kvm_regs:
        return self._get(abi.KVM_GET_REGS, abi.kvm_regs)

    def set_regs(self, regs: abi.kvm_regs) -> None:
        abi.ioctl(self.fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.kvm_sregs:
        return self._get(abi.KVM_GET_SREGS, abi.kvm_sregs)

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        abi.ioctl(self.fd, abi.KVM_SET_SREGS, sregs)

    def get_xsave(self) -> bytes:
        buf = (ctypes.c_uint8 * self.xsave_size)()
        abi.ioctl(self.fd, self._xsave_get, buf)
        return bytes(buf)

    def set_xsave(self, data: bytes) -> None:
        buf = (ctypes.c_uint8 * self.xsave_size).from_buffer_copy(data)
        abi.ioctl(self.fd, abi.KVM_SET_XSAVE, buf)

    def get_xcrs(self) -> abi.kvm_xcrs:
        return self._get(abi.KVM_GET_XCRS, abi.kvm_xcrs)

    def set_xcrs(self, xcrs: abi.kvm_xcrs) -> None:
        abi.ioctl(self.fd, abi.KVM_SET_XCRS, xcrs)

    def get_debugregs(self) -> abi.kvm_debugregs:
        return self._get(abi.KVM_GET_DEBUGREGS, abi.kvm_debugregs)

    def set_debugregs(self, regs: abi.kvm_debugregs) -> None:
        abi.ioctl(self.fd, abi.KVM_SET_DEBUGREGS, regs)

    def get_lapic(self) -> bytes:
        return bytes(self._get(abi.KVM_GET_LAPIC, abi.kvm_lapic_state).regs)

    def set_lapic(self, regs: bytes) -> None:
        abi.ioctl(self.fd, abi.KVM_SET_LAPIC, abi.kvm_lapic_state.from_buffer_copy(regs))

    def get_events(self) -> abi.kvm_vcpu_events:
        return self._get(abi.KVM_GET_VCPU_EVENTS, abi.kvm_vcpu_events)

    def set_events(self, events: abi.kvm_vcpu_events) -> None:
        # Without the valid flags KVM ignores the NMI-pending and SIPI fields: pending NMIs would be lost.
        events.flags |= abi.KVM_VCPUEVENT_VALID_NMI_PENDING | abi.KVM_VCPUEVENT_VALID_SIPI_VECTOR
        abi.ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> int:
        return self._get(abi.KVM_GET_MP_STATE, abi.kvm_mp_state).mp_state

    def set_mp_state(self, state: int) -> None:
        abi.ioctl(self.fd, abi.KVM_SET_MP_STATE, abi.kvm_mp_state(state))

    def tsc_khz(self) -> int:
        return abi.ioctl(self.fd, abi.KVM_GET_TSC_KHZ)

    def readable_msrs(self, candidates: list[int]) -> list[int]:
        """The MSRs this vCPU can read, the TSC first (its restore keeps guest time going)."""
        ok = [i for i in candidates if self.get_msrs([i])[0] is not None]
        return sorted(ok, key=lambda i: (i != MSR_IA32_TSC, i))

    def get_msrs(self, indices: list[int]) -> list[int | None]:
        """Values of *indices*; None for an MSR KVM refused (KVM_GET_MSRS stops at the first failure)."""
        values: list[int | None] = []
        rest = list(indices)
        while rest:
            buf = _msr_buffer(rest)
            done = abi.ioctl(self.fd, abi.KVM_GET_MSRS, buf)
            values += [buf.entries[i].data for i in range(done)]
            if done < len(rest):
                values.append(None)
                done += 1
            rest = rest[done:]
        return values

    def set_msrs(self, pairs: list[tuple[int, int]]) -> list[int]:
        """Write (index, value) pairs; returns the indices KVM refused."""
        refused = []
        rest = list(pairs)
        while rest:
            buf = _msr_buffer([i for i, _ in rest], [v for _, v in rest])
            done = abi.ioctl(self.fd, abi.KVM_SET_MSRS, buf)
            if done < len(rest):
                refused.append(rest[done][0])
                done += 1
            rest = rest[done:]
        return refused

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        self.run = None  # type: ignore[assignment]
        self._run_mmap.close()
        os.close(self.fd)


def _msr_buffer(indices: list[int], values: list[int] | None = None) -> ctypes.Structure:
    buf = abi.flexible(abi.kvm_msrs, abi.kvm_msr_entry, len(indices))()
    buf.h.nmsrs = len(indices)
    for i, index in enumerate(indices):
        buf.entries[i].index = index
        if values is not None:
            buf.entries[i].data = values[i]
    return buf
