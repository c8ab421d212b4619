"""One KVM VM: memory slots over the RAM blocks, the in-kernel irqchip and PIT, the clock, dirty logging.

RAM is mapped like a PC's: the first 3 GiB of the block at guest-physical 0,
the rest (if any) from 4 GiB, so the LAPIC/IOAPIC window below 4 GiB stays
free.  Each slot knows the page range of its block, which is how dirty
pages reported per slot land in the block's dirty log.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from dataclasses import dataclass

import numpy as np

from vmigrate.machine.kvm import abi
from vmigrate.machine.kvm.system import KvmSystem, KvmUnavailable
from vmigrate.machine.memory import PAGE_SIZE, RAMBlock

LOW_RAM_LIMIT = 3 << 30
HIGH_RAM_BASE = 4 << 30
#: Where VMX keeps its real-mode TSS: three pages just below the BIOS area, never RAM here.
TSS_ADDR = 0xFFFBD000


@dataclass
class MemorySlot:
    slot: int
    gpa: int
    block: RAMBlock
    first_page: int
    npages: int
    flags: int = 0

    @property
    def size(self) -> int:
        return self.npages * PAGE_SIZE


class KvmVM:
    def __init__(self, system: KvmSystem, dirty_ring_entries: int = 0) -> None:
        self.system = system
        self.fd = abi.ioctl(system.fd, abi.KVM_CREATE_VM, 0)
        self.slots: list[MemorySlot] = []
        self.dirty_ring_entries = 0
        self.manual_protect = False
        #: Serialises dirty-log harvests (migration thread, vCPU threads on a full ring).
        self.dirty_lock = threading.Lock()
        try:
            abi.ioctl(self.fd, abi.KVM_SET_TSS_ADDR, TSS_ADDR)
        except OSError:
            pass  # Only VMX needs it; other KVM flavours (SVM, PVM) may refuse it.
        if dirty_ring_entries:
            self._enable_dirty_ring(dirty_ring_entries)
        elif self.check(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
            # Reported pages are write-protected again by KVM_CLEAR_DIRTY_LOG, for exactly the pages
            # handed back.  Not KVM_DIRTY_LOG_INITIALLY_SET: its all-ones first report would count
            # every page as dirtied by the guest (calc-dirty-rate measures from one sync to the next).
            self.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
            self.manual_protect = True
        abi.ioctl(self.fd, abi.KVM_CREATE_IRQCHIP)
        abi.ioctl(self.fd, abi.KVM_CREATE_PIT2, abi.kvm_pit_config(abi.KVM_PIT_SPEAKER_DUMMY))

    def check(self, cap: int) -> int:
        return self.system.check_extension(cap, self.fd)

    def enable_cap(self, cap: int, *args: int) -> None:
        req = abi.kvm_enable_cap(cap)
        for i, a in enumerate(args):
            req.args[i] = a
        abi.ioctl(self.fd, abi.KVM_ENABLE_CAP, req)

    def _enable_dirty_ring(self, entries: int) -> None:
        if entries & (entries - 1) or entries < 1024:
            raise ValueError(f"dirty-ring-size must be a power of two of at least 1024, not {entries}")
        limit = self.check(abi.KVM_CAP_DIRTY_LOG_RING)
        if not limit:
            raise KvmUnavailable("this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")
        size = entries * ctypes.sizeof(abi.kvm_dirty_gfn)
        if size > limit:
            raise ValueError(f"dirty-ring-size {entries} is above this KVM's maximum of "
                             f"{limit // ctypes.sizeof(abi.kvm_dirty_gfn)} entries")
        self.enable_cap(abi.KVM_CAP_DIRTY_LOG_RING, size)
        self.dirty_ring_entries = entries

    # -- memory ----------------------------------------------------------------

    def map_block(self, block: RAMBlock) -> None:
        """Map *block* from guest-physical 0, split around the 3–4 GiB hole."""
        low = min(block.size, LOW_RAM_LIMIT) // PAGE_SIZE
        self._add_slot(0, block, 0, low)
        if block.npages > low:
            self._add_slot(HIGH_RAM_BASE, block, low, block.npages - low)

    def _add_slot(self, gpa: int, block: RAMBlock, first_page: int, npages: int) -> None:
        slot = MemorySlot(len(self.slots), gpa, block, first_page, npages)
        self.slots.append(slot)
        self._set_slot(slot)

    def _set_slot(self, slot: MemorySlot) -> None:
        host = slot.block.bytes.ctypes.data + slot.first_page * PAGE_SIZE
        abi.ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION,
                  abi.kvm_userspace_memory_region(slot.slot, slot.flags, slot.gpa, slot.size, host))

    @property
    def low_ram_top(self) -> int:
        """End of the RAM mapped at guest-physical 0 (where guest programs may work)."""
        return self.slots[0].size if self.slots else 0

    @property
    def ram_top(self) -> int:
        return max((s.gpa + s.size for s in self.slots), default=0)

    # -- dirty logging -----------------------------------------------------------

    def set_dirty_logging(self, on: bool) -> None:
        for slot in self.slots:
            slot.flags = abi.KVM_MEM_LOG_DIRTY_PAGES if on else 0
            self._set_slot(slot)

    def sync_dirty_bitmap(self) -> int:
        """Pull each slot's dirty bitmap into its block's dirty log; returns the pages reported.

        With manual protection the same bitmap is handed back to
        KVM_CLEAR_DIRTY_LOG before anything reads the pages, so a write
        after this call is reported by the next one.
        """
        total = 0
        with self.dirty_lock:
            for slot in self.slots:
                if not slot.flags & abi.KVM_MEM_LOG_DIRTY_PAGES:
                    continue
                words = np.zeros(-(-slot.npages // 64), dtype=np.uint64)
                address = words.ctypes.data
                abi.ioctl(self.fd, abi.KVM_GET_DIRTY_LOG, abi.kvm_dirty_log(slot.slot, 0, address))
                if not words.any():
                    continue
                if self.manual_protect:
                    abi.ioctl(self.fd, abi.KVM_CLEAR_DIRTY_LOG,
                              abi.kvm_clear_dirty_log(slot.slot, slot.npages, 0, address))
                total += slot.block.dirty.mark_bitmap(words, slot.first_page, slot.npages)
        return total

    def mark_slot_pages(self, slot_ids: np.ndarray, offsets: np.ndarray) -> None:
        """Mark pages given as (slot, page offset in slot) pairs, e.g. from the dirty rings."""
        for slot in self.slots:
            mine = offsets[slot_ids == slot.slot]
            if len(mine):
                slot.block.dirty.mark_pages(mine.astype(np.int64) + slot.first_page)

    # -- VM-wide device state ------------------------------------------------------

    def get_irqchip(self, chip_id: int) -> abi.kvm_irqchip:
        chip = abi.kvm_irqchip(chip_id)
        abi.ioctl(self.fd, abi.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: abi.kvm_irqchip) -> None:
        abi.ioctl(self.fd, abi.KVM_SET_IRQCHIP, chip)

    def get_pit(self) -> abi.kvm_pit_state2:
        pit = abi.kvm_pit_state2()
        abi.ioctl(self.fd, abi.KVM_GET_PIT2, pit)
        return pit

    def set_pit(self, pit: abi.kvm_pit_state2) -> None:
        abi.ioctl(self.fd, abi.KVM_SET_PIT2, pit)

    def get_clock(self) -> abi.kvm_clock_data:
        clock = abi.kvm_clock_data()
        abi.ioctl(self.fd, abi.KVM_GET_CLOCK, clock)
        return clock

    def set_clock(self, clock: abi.kvm_clock_data) -> None:
        abi.ioctl(self.fd, abi.KVM_SET_CLOCK, clock)

    def reset_dirty_rings(self) -> int:
        return abi.ioctl(self.fd, abi.KVM_RESET_DIRTY_RINGS)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError as err:
            if err.errno != errno.EBADF:
                raise
