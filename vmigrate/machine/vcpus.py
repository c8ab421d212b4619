"""The vCPU backend port and what every backend shares: the run/pause handshake, the throttle rule.

:class:`VcpuBackend` is all that the run state, the migration engine and the
dirty-rate services may ask of the vCPUs, whichever accelerator runs them.

Pausing is a handshake, not a flag: :meth:`VcpuGroup.pause_all` returns only
once every vCPU thread is parked outside guest execution, so the migration
code may read RAM and vCPU state knowing no guest write is in flight (QEMU's
pause_all_vcpus gives the same guarantee).  A backend's threads park by
incrementing ``_parked`` under ``_cond`` and wait for ``_run``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from vmigrate.machine.devices import DeviceModel

PAUSE_TIMEOUT = 10.0


class VcpuBackend(Protocol):
    """The port through which everything outside ``machine/`` drives the vCPUs.

    Dirty logging is reference-counted by the backends: migration, the
    dirty-rate measurement and the dirty-limit service each start and stop
    it independently (QEMU's global dirty-log users).
    """

    #: Fraction of wall time each vCPU sleeps (auto-converge), 0..0.99.
    throttle: float
    #: Per vCPU, how long it sleeps each time its dirty ring fills (µs; the dirty limit).
    ring_full_sleep_us: list[int]

    @property
    def count(self) -> int: ...

    def pause_all(self) -> None: ...  # returns once no vCPU touches RAM any more

    def resume_all(self) -> None: ...

    def dirty_log_start(self) -> None: ...

    def dirty_log_sync(self) -> None: ...  # pull what the accelerator logged into the RAM blocks' logs

    def dirty_log_stop(self) -> None: ...

    @property
    def dirty_ring_entries(self) -> int: ...  # entries per vCPU dirty ring; 0 without rings

    def dirty_ring_counters(self) -> list[int]: ...  # pages collected from each vCPU's ring so far

    @property
    def devices(self) -> list["DeviceModel"]: ...  # migrated device models, in stream order

    def thread_ids(self) -> list[int]: ...  # each vCPU thread's kernel tid (postcopy blocktime)

    def shutdown(self) -> None: ...


class VcpuGroup:
    """Base of :class:`SoftVcpus` and :class:`KvmVcpus`; subclasses set ``threads``."""

    threads: list[threading.Thread]

    def __init__(self, count: int) -> None:
        self._cond = threading.Condition()
        self._run = False
        self._quit = False
        self._parked = 0
        self.ring_full_sleep_us = [0] * count

    @property
    def count(self) -> int:
        return len(self.ring_full_sleep_us)

    def _kick_all(self) -> None:
        """Make vCPUs that are executing guest code come back now (KVM: out of KVM_RUN)."""

    def thread_ids(self) -> list[int]:
        return [t.native_id or 0 for t in self.threads]

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
