"""The portable software vCPU: one thread per vCPU running a guest workload.

Pausing is a handshake, not a flag: :meth:`SoftVcpus.pause_all` returns only
once every vCPU thread is parked outside its workload step, so the migration
code may read RAM knowing no guest write is in flight (QEMU's
pause_all_vcpus gives the same guarantee).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from vmigrate.machine.guest import Workload


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


class SoftVcpus:
    """All software vCPUs of one VM; vCPU 0 runs the workload, the others idle."""

    def __init__(self, count: int, make_workload: Callable[[], Workload] | None) -> None:
        self._cond = threading.Condition()
        self._run = False
        self._quit = False
        self._parked = 0
        #: Fraction of wall time each vCPU must sleep (auto-converge / dirty limit).
        self.throttle = 0.0
        self.vcpus = [SoftVcpu(i, make_workload if i == 0 else None, self) for i in range(count)]
        for v in self.vcpus:
            v.start()

    def throttle_sleep(self, ran: float) -> float:
        """Extra sleep after *ran* seconds of guest time, so sleeping is the throttled fraction of wall time."""
        t = self.throttle
        return 0.0 if t <= 0 else ran * t / (1 - t)

    def pause_all(self) -> None:
        with self._cond:
            self._run = False
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._parked == len(self.vcpus), timeout=10)

    def resume_all(self) -> None:
        with self._cond:
            self._run = True
            self._cond.notify_all()

    def shutdown(self) -> None:
        with self._cond:
            self._quit = True
            self._cond.notify_all()
        for v in self.vcpus:
            v.join(timeout=5)

    def dirty_log_start(self) -> None:
        """Software vCPUs mark the dirty log on every write; nothing to switch on."""

    def dirty_log_sync(self) -> None:
        """The log is always current: marks are written as the guest writes."""

    def dirty_log_stop(self) -> None:
        """Nothing to switch off."""

    @property
    def devices(self) -> list:
        """No state outside guest RAM: the workloads keep theirs in it."""
        return []

    @property
    def workload(self) -> Workload | None:
        return self.vcpus[0].workload if self.vcpus else None
