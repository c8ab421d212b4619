"""Per-vCPU dirty page rate limits (``set-vcpu-dirty-limit``; docs/qemu/dirtyrate.md §7).

A service thread measures every vCPU's dirty rate once a second from its
dirty ring and adjusts, per limited vCPU, how long that vCPU sleeps each
time its ring fills up (QEMU's mechanism; a tighter adjustment rule, see
:func:`throttle_step`).  Only the dirty ring attributes writes to a vCPU,
hence the KVM ``dirty-ring-size`` requirement, as in QEMU.
"""

from __future__ import annotations

import threading
import time
from vmigrate.errors import VMError
from vmigrate.machine.memory import PAGE_SIZE
from vmigrate.machine.vcpus import VcpuBackend

NEEDS_RING = "dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set'"
PERIOD_S = 1.0
#: Longest sleep per full ring: a vCPU still gets through a ring every ten seconds.
MAX_SLEEP_US = 10_000_000


def throttle_step(quota: int, current: int, sleep_us: int, ring_mib: int) -> int:
    """The next sleep per full ring (µs) for a vCPU measured at *current* MiB/s under *quota*.

    QEMU 7.2 stops adjusting within 25 MiB/s of the quota and otherwise moves
    by fixed fractions of a ring-fill time, so a 50 MiB/s quota settles
    anywhere in 25..75 MiB/s.  We solve for the sleep instead: a vCPU that
    sleeps ``s`` per ring of ``R`` MiB and dirties at ``c`` spends ``R/c - s``
    filling it, so running at ``q`` needs ``s' = s + R/q - R/c``.  Far from
    the quota the whole step is taken; near it, half (one-second samples
    vary by a fraction of a ring), which converges without overshoot.
    """
    if current == 0:
        return 0
    step = ring_mib * 1_000_000 * (current - quota) / (quota * current)
    if abs(quota - current) * 2 <= quota:
        step /= 2
    return max(min(round(sleep_us + step), MAX_SLEEP_US), 0)


class DirtyLimitService:
    def __init__(self, vcpus: VcpuBackend) -> None:
        self.vcpus = vcpus
        self.quota: dict[int, int] = {}
        self.current: dict[int, int] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def _check(self, index: int | None, ring_required: bool = True) -> bool:
        """QEMU's checks; False when the command is a silent no-op (cancel without a ring)."""
        if not self.vcpus.dirty_ring_entries:
            if ring_required:
                raise VMError(NEEDS_RING)
            return False
        if index is not None and not 0 <= index < self.vcpus.count:
            raise VMError("incorrect cpu index specified")
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
                self.vcpus.ring_full_sleep_us[i] = 0
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
        return range(self.vcpus.count) if index is None else range(index, index + 1)

    def _start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dirtyrate-stat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        vcpus = self.vcpus
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
                        vcpus.ring_full_sleep_us[i] = throttle_step(
                            quota, rates[i], vcpus.ring_full_sleep_us[i], ring_mib)
        finally:
            for i in range(len(vcpus.ring_full_sleep_us)):
                vcpus.ring_full_sleep_us[i] = 0
            vcpus.dirty_log_stop()
