"""Auto-converge: slow the vCPUs down when the guest dirties memory faster than we send it.

QEMU 7.2's rules (convergence.md §6): at each ≥1 s period end, if the bytes
dirtied in the period exceed ``throttle-trigger-threshold`` % of the bytes
sent, a "high" period is counted; every second high period (not
necessarily consecutive) throttles down: start at ``cpu-throttle-initial``,
then add ``cpu-throttle-increment`` (or the tail-slow step), capped at
``max-cpu-throttle``.  The percentage is applied by the vCPU backend as a
fraction of wall time spent asleep.
"""

from __future__ import annotations

from typing import Protocol

from vmigrate.migration.options import MigrationOptions


class Throttleable(Protocol):
    throttle: float  # fraction of time each vCPU sleeps, 0..0.99


class AutoConverge:
    def __init__(self, options: MigrationOptions, vcpus: Throttleable) -> None:
        self.options = options
        self.vcpus = vcpus
        self.percentage = 0
        self._high_count = 0

    def period_end(self, dirty_bytes: int, transferred_bytes: int) -> None:
        """One ≥1 s period of the dirty-rate statistics has ended."""
        if not self.options.cap("auto-converge"):
            return
        threshold = transferred_bytes * self.options.param("throttle-trigger-threshold") // 100
        if dirty_bytes > threshold:
            self._high_count += 1
            if self._high_count >= 2:
                self._high_count = 0
                self._throttle_down(dirty_bytes, threshold)

    def _throttle_down(self, dirty: int, threshold: int) -> None:
        opts = self.options
        if self.percentage == 0:
            self._set(opts.param("cpu-throttle-initial"))
            return
        now = self.percentage
        increment = opts.param("cpu-throttle-increment")
        if opts.param("cpu-throttle-tailslow"):
            cpu_now = 100 - now
            cpu_ideal = int(cpu_now * (threshold / dirty))
            increment = min(cpu_now - cpu_ideal, increment)
        self._set(min(now + increment, opts.param("max-cpu-throttle")))

    def _set(self, percentage: int) -> None:
        self.percentage = max(1, min(percentage, 99))
        self.vcpus.throttle = self.percentage / 100

    def stop(self) -> None:
        """End of the migration, whatever the outcome: full speed again."""
        self.percentage = 0
        self.vcpus.throttle = 0.0
