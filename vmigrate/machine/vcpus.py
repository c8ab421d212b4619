"""What every vCPU backend shares: the run/pause handshake and the throttle rule.

Pausing is a handshake, not a flag: :meth:`VcpuGroup.pause_all` returns only
once every vCPU thread is parked outside guest execution, so the migration
code may read RAM and vCPU state knowing no guest write is in flight (QEMU's
pause_all_vcpus gives the same guarantee).  A backend's threads park by
incrementing ``_parked`` under ``_cond`` and wait for ``_run``.
"""

from __future__ import annotations

import threading

PAUSE_TIMEOUT = 10.0


class VcpuGroup:
    """Base of :class:`SoftVcpus` and :class:`KvmVcpus`; subclasses set ``threads``."""

    threads: list[threading.Thread]

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._run = False
        self._quit = False
        self._parked = 0

    def _kick_all(self) -> None:
        """Make vCPUs that are executing guest code come back now (KVM: out of KVM_RUN)."""

    def pause_all(self) -> None:
        with self._cond:
            self._run = False
            self._kick_all()
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._parked == len(self.threads), timeout=PAUSE_TIMEOUT):
                raise RuntimeError(f"a vCPU did not stop within {PAUSE_TIMEOUT:.0f} s")

    def resume_all(self) -> None:
        with self._cond:
            self._run = True
            self._cond.notify_all()

    def _stop_threads(self) -> None:
        """Tell every vCPU thread to end and wait for them (bounded)."""
        with self._cond:
            self._quit = True
            self._kick_all()
            self._cond.notify_all()
        for t in self.threads:
            t.join(timeout=5)

    def throttle_sleep(self, ran: float) -> float:
        """Extra sleep after *ran* seconds of guest time, so sleeping is the throttled fraction of wall time."""
        t = self.throttle
        return 0.0 if t <= 0 else ran * t / (1 - t)
