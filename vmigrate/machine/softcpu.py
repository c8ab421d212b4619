"""The portable software vCPU: one thread per vCPU running a guest workload.

The pause handshake and throttle rule are :class:`~vmigrate.machine.vcpus.VcpuGroup`'s;
a software vCPU parks between workload steps.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from vmigrate.machine.guest import Workload
from vmigrate.machine.vcpus import VcpuGroup


class SoftVcpu(threading.Thread):
    def __init__(self, index: int, make_workload: Callable[[], Workload] | None, owner: "SoftVcpus") -> None:
        super().__init__(name=f"CPU {index}/soft", daemon=True)
        self.index = index
        self._make_workload = make_workload
        self._owner = owner
        self.workload: Workload | None = None

    def run(self) -> None:
        owner = self._owner
        while True:
            with owner._cond:
                owner._parked += 1
                owner._cond.notify_all()
                while not owner._run and not owner._quit:
                    owner._cond.wait()
                owner._parked -= 1
                if owner._quit:
                    return
            started = time.perf_counter()
            if self._make_workload is None:
                pause = 0.05
            else:
                if self.workload is None:
                    self.workload = self._make_workload()
                pause = self.workload.step()
            pause += owner.throttle_sleep(time.perf_counter() - started + pause)
            with owner._cond:
                if owner._run and not owner._quit and pause > 0:
                    owner._cond.wait(pause)


class SoftVcpus(VcpuGroup):
    """All software vCPUs of one VM; vCPU 0 runs the workload, the others idle."""

    def __init__(self, count: int, make_workload: Callable[[], Workload] | None) -> None:
        super().__init__(count)
        #: Fraction of wall time each vCPU must sleep (auto-converge / dirty limit).
        self.throttle = 0.0
        self.threads = [SoftVcpu(i, make_workload if i == 0 else None, self) for i in range(count)]
        for v in self.threads:
            v.start()

    def shutdown(self) -> None:
        self._stop_threads()

    def dirty_log_start(self) -> None:
        """Software vCPUs mark the dirty log on every write; nothing to switch on."""

    def dirty_log_sync(self) -> None:
        """The log is always current: marks are written as the guest writes."""

    def dirty_log_stop(self) -> None:
        """Nothing to switch off."""

    @property
    def dirty_ring_entries(self) -> int:
        """No accelerator, no per-vCPU rings: writes are not attributed to a vCPU."""
        return 0

    def dirty_ring_counters(self) -> list[int]:
        return [0] * self.count

    @property
    def devices(self) -> list:
        """No state outside guest RAM: the workloads keep theirs in it."""
        return []

    @property
    def workload(self) -> Workload | None:
        return self.threads[0].workload if self.threads else None
