"""Auto-converge: slow the vCPUs down when the guest dirties memory faster than we send it.

QEMU 7.2's rules (docs/qemu/convergence.md §6): at each ≥1 s period end, if the bytes
dirtied in the period exceed ``throttle-trigger-threshold`` % of the bytes
sent, a "high" period is counted; every second high period (not
necessarily consecutive) throttles down: start at ``cpu-throttle-initial``,
then add ``cpu-throttle-increment`` (or the tail-slow step), capped at
``max-cpu-throttle``.  The percentage is applied by the vCPU backend as a
fraction of wall time spent asleep.
"""

from __future__ import annotations

from vmigrate.machine.vcpus import VcpuBackend
from vmigrate.migration.config import Parameters
from vmigrate.trace import trace


class AutoConverge:
    def __init__(self, vcpus: VcpuBackend) -> None:
        self.vcpus = vcpus
        self.percentage = 0
        self._high_count = 0

    def period_end(self, dirty_bytes: int, transferred_bytes: int, params: Parameters) -> None:
        """One ≥1 s period of the dirty-rate statistics has ended (auto-converge is on).

        *params* are the current ones: QEMU reads the throttle parameters
        anew at every period, so a change during the migration applies.
        """
        threshold = transferred_bytes * params.throttle_trigger_threshold // 100
        if dirty_bytes > threshold:
            self._high_count += 1
            if self._high_count >= 2:
                self._high_count = 0
                self._throttle_down(dirty_bytes, threshold, params)

    def _throttle_down(self, dirty: int, threshold: int, params: Parameters) -> None:
        if self.percentage == 0:
            self._set(params.cpu_throttle_initial)
            return
        now = self.percentage
        increment = params.cpu_throttle_increment
        if params.cpu_throttle_tailslow:
            cpu_now = 100 - now
            cpu_ideal = int(cpu_now * (threshold / dirty))
            increment = min(cpu_now - cpu_ideal, increment)
        self._set(min(now + increment, params.max_cpu_throttle))

    def _set(self, percentage: int) -> None:
        self.percentage = max(1, min(percentage, 99))
        trace("cpu_throttle_set", new_throttle_pct=self.percentage)
        self.vcpus.throttle = self.percentage / 100

    def stop(self) -> None:
        """End of the migration, whatever the outcome: full speed again."""
        self.percentage = 0
        self.vcpus.throttle = 0.0
