"""``calc-dirty-rate`` / ``query-dirty-rate``: how fast the guest dirties memory (docs/qemu/dirtyrate.md).

Independent of migration.  Page sampling hashes random pages before and
after the period; dirty-bitmap mode counts pages the vCPU backend marked
dirty, through a dirty-log client of its own so a running migration loses
nothing.  Dirty-ring mode needs per-vCPU dirty rings (KVM with
``dirty-ring-size``); without them it is refused with QEMU's message instead
of QEMU 7.2's crash.
"""

from __future__ import annotations

import random
import threading
import time
import zlib
import numpy as np

from vmigrate.errors import VMError
from vmigrate.machine.memory import PAGE_SIZE, RAMBlock
from vmigrate.machine.vcpus import VcpuBackend

MIN_BLOCK = 128 << 10
DEFAULT_SAMPLE_PAGES = 512
DIRTY_CLIENT = "dirty-rate"


def monotonic_seconds() -> int:
    """QEMU's realtime clock in seconds: host monotonic time, not Unix time."""
    return int(time.monotonic())


class DirtyRateMeasurement:
    def __init__(self, ram_blocks: list[RAMBlock], vcpus: VcpuBackend) -> None:
        self.ram_blocks = ram_blocks
        self.vcpus = vcpus
        self.status = "unstarted"
        self.mode = "page-sampling"
        self.start_time = 0
        self.calc_time = 0
        self.sample_pages = 0
        self.dirty_rate = -1
        self.vcpu_rates: list[dict] | None = None
        self._thread: threading.Thread | None = None

    def start(self, calc_time: int, sample_pages: int | None, mode: str | None) -> None:
        """The checks of calc-dirty-rate in QEMU's order, then the measuring thread."""
        mode = mode or "page-sampling"
        if self.status == "measuring":
            raise VMError("the dirty rate is already being measured.")
        if not 1 <= calc_time <= 60:
            raise VMError("calc-time is out of range[1, 60].")
        if sample_pages is not None:
            if mode == "dirty-ring":
                raise VMError("either sample-pages or dirty-ring can be specified.")
            if not 128 <= sample_pages <= 16384:
                raise VMError("sample-pages is out of range[128, 16384].")
        ring = self.vcpus.dirty_ring_entries > 0
        if mode == "dirty-ring" and not ring:
            raise VMError("mode dirty-ring is not enabled, use other method instead.")
        if mode == "dirty-bitmap" and ring:
            raise VMError("mode dirty-bitmap is not enabled, use other method instead.")
        self.status = "unstarted"
        self.vcpu_rates = None
        self.mode = mode
        self.dirty_rate = -1
        self.start_time = monotonic_seconds()
        self.calc_time = calc_time
        self.sample_pages = DEFAULT_SAMPLE_PAGES if sample_pages is None else sample_pages
        self._thread = threading.Thread(target=self._measure, name="get_dirtyrate", daemon=True)
        self._thread.start()

    def query(self) -> dict:
        info = {"status": self.status, "start-time": self.start_time, "calc-time": self.calc_time,
                "sample-pages": self.sample_pages, "mode": self.mode}
        if self.status == "measured":
            info["dirty-rate"] = self.dirty_rate
            if self.vcpu_rates is not None:
                info["vcpu-dirty-rate"] = self.vcpu_rates
        return info

    def _measure(self) -> None:
        self.status = "measuring"
        if self.mode == "page-sampling":
            self._page_sampling()
        elif self.mode == "dirty-bitmap":
            self._dirty_bitmap()
        else:
            self._dirty_ring()
        self.status = "measured"

    def _wait(self, started: float) -> int:
        """Sleep out the period; returns its length in ms (QEMU's rule of §3)."""
        duration = self.calc_time * 1000
        elapsed = (time.monotonic() - started) * 1000
        if elapsed >= duration:
            return int(elapsed)
        time.sleep((duration - elapsed) / 1000)
        return duration

    def _page_sampling(self) -> None:
        started = time.monotonic()
        self.start_time = monotonic_seconds()
        samples = []
        for block in self.ram_blocks:
            if block.size < MIN_BLOCK:
                continue
            count = (block.size * self.sample_pages) >> 30
            pages = [random.randint(0, block.npages - 2) for _ in range(count)] if count and block.npages > 1 else []
            samples.append((block, pages, [zlib.crc32(block.pages[p]) for p in pages]))
        msec = self._wait(started)
        dirty = sample_count = block_mib = 0
        for block, pages, crcs in samples:
            dirty += sum(zlib.crc32(block.pages[p]) != crc for p, crc in zip(pages, crcs))
            sample_count += len(pages)
            block_mib += (block.npages * PAGE_SIZE) >> 20
        self.calc_time = msec // 1000
        if sample_count:
            self.dirty_rate = dirty * block_mib * 1000 // (sample_count * msec)

    def _dirty_bitmap(self) -> None:
        blocks = self.ram_blocks
        vcpus = self.vcpus
        for block in blocks:
            block.dirty.start(DIRTY_CLIENT)
        vcpus.dirty_log_start()
        try:
            started = time.monotonic()
            self.start_time = monotonic_seconds()
            msec = self._wait(started)
            vcpus.dirty_log_sync()
            dirty = 0
            for block in blocks:
                dirty += block.dirty.collect_into(DIRTY_CLIENT, np.zeros(block.npages, dtype=np.bool_))
        finally:
            for block in blocks:
                block.dirty.stop(DIRTY_CLIENT)
            vcpus.dirty_log_stop()
        self.calc_time = msec // 1000
        self.sample_pages = 0
        self.dirty_rate = ((dirty * PAGE_SIZE) >> 20) * 1000 // msec

    def _dirty_ring(self) -> None:
        vcpus = self.vcpus
        vcpus.dirty_log_start()
        try:
            started = time.monotonic()
            self.start_time = monotonic_seconds()
            before = vcpus.dirty_ring_counters()
            msec = self._wait(started)
            vcpus.dirty_log_sync()
            after = vcpus.dirty_ring_counters()
        finally:
            vcpus.dirty_log_stop()
        rates = [(((a - b) * PAGE_SIZE) >> 20) * 1000 // msec for a, b in zip(after, before)]
        self.vcpu_rates = [{"id": i, "dirty-rate": r} for i, r in enumerate(rates)]
        self.dirty_rate = sum(rates)
        self.calc_time = msec // 1000
        self.sample_pages = 0

