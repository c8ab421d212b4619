"""Per-vCPU dirty page rate limits (``set-vcpu-dirty-limit``; dirtyrate.md §7).

A service thread measures every vCPU's dirty rate once a second from its
dirty ring and adjusts, per limited vCPU, how long that vCPU sleeps each
time its ring fills up.  Only the dirty ring attributes writes to a vCPU,
hence the KVM ``dirty-ring-size`` requirement, as in QEMU.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from vmigrate.machine.memory import PAGE_SIZE
from vmigrate.qmp.errors import QMPError

if TYPE_CHECKING:
    from vmigrate.vm import VM

NEEDS_RING = "dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set'"
TOLERANCE_MIB = 25
PERIOD_S = 1.0


def throttle_step(quota: int, current: int, sleep_us: int, ring_mib: int, max_rate: int) -> int:
    """QEMU 7.2's adjustment of one vCPU's sleep per full ring (µs); *max_rate* already updated."""
    if abs(quota - current) <= TOLERANCE_MIB:
        return sleep_us
    if current == 0:
        return 0
    full_us = ring_mib * 1_000_000 // max_rate
    if abs(quota - current) * 100 // max(quota, current) > 50:
        if quota < current:
            pct = (current - quota) * 100 // current
            sleep_us += int(full_us * pct / (100 - pct))
        else:
            pct = (quota - current) * 100 // quota
            sleep_us -= int(full_us * pct / (100 - pct))
    else:
        sleep_us += full_us // 10 if quota < current else -(full_us // 10)
    return max(min(sleep_us, full_us * 99), 0)


class DirtyLimitService:
    def __init__(self, vm: "VM") -> None:
        self.vm = vm
        self.quota: dict[int, int] = {}
        self.current: dict[int, int] = {}
        self._max_rate = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def _check(self, index: int | None, ring_required: bool = True) -> bool:
        """QEMU's checks; False when the command is a silent no-op (cancel without a ring)."""
        if not getattr(self.vm.vcpus, "dirty_ring_enabled", False):
            if ring_required:
                raise QMPError(NEEDS_RING)
            return False
        if index is not None and not 0 <= index < self.vm.config.smp:
            raise QMPError("incorrect cpu index specified")
        return True

    def set_limit(self, index: int | None, rate: int) -> None:
        self._check(index)
        if rate == 0:
            self.cancel(index)
            return
        with self._lock:
            for i in self._indices(index):
                self.quota[i] = rate
        self._start()

    def cancel(self, index: int | None) -> None:
        if not self._check(index, ring_required=False) or self._thread is None:
            return
        with self._lock:
            for i in self._indices(index):
                self.quota.pop(i, None)
                self.vm.vcpus.ring_full_sleep_us[i] = 0
            idle = not self.quota
        if idle:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    def query(self) -> list[dict]:
        with self._lock:
            return [{"cpu-index": i, "limit-rate": q, "current-rate": self.current.get(i, 0)}
                    for i, q in sorted(self.quota.items())]

    def _indices(self, index: int | None) -> range:
        return range(self.vm.config.smp) if index is None else range(index, index + 1)

    def _start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dirtyrate-stat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        vcpus = self.vm.vcpus
        ring_mib = (vcpus.dirty_ring_entries * PAGE_SIZE) >> 20
        vcpus.dirty_log_start()
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                before = vcpus.dirty_ring_counters()
                if self._stop.wait(PERIOD_S):
                    break
                vcpus.dirty_log_sync()
                after = vcpus.dirty_ring_counters()
                msec = max(1, int((time.monotonic() - started) * 1000))
                rates = [(((a - b) * PAGE_SIZE) >> 20) * 1000 // msec for a, b in zip(after, before)]
                with self._lock:
                    self.current = dict(enumerate(rates))
                    for i, quota in self.quota.items():
                        current = rates[i]
                        if abs(quota - current) > TOLERANCE_MIB and current:
                            self._max_rate = max(self._max_rate, current)
                        vcpus.ring_full_sleep_us[i] = throttle_step(
                            quota, current, vcpus.ring_full_sleep_us[i], ring_mib, max(self._max_rate, 1))
        finally:
            for i in range(len(vcpus.ring_full_sleep_us)):
                vcpus.ring_full_sleep_us[i] = 0
            vcpus.dirty_log_stop()
