"""Whether, and when, precopy can finish: a forecast from the measured dirty rate and bandwidth.

QEMU 7.2 stops the guest for the last copy only once the remaining dirty
RAM fits in ``bandwidth × downtime-limit`` (migration_iteration_run in
migration/migration.c, docs/qemu/convergence.md).  Each RAM pass sends what
remained at its start and, meanwhile, the guest dirties ``dirty/bandwidth``
of it again, so passes shrink geometrically when the guest dirties slower
than the link sends and never shrink otherwise.  Beyond QEMU: this says so
up front, so a client can switch to postcopy (docs/qemu/postcopy.md) or
give up instead of watching passes repeat.

Pure code: fed samples, no I/O and no clock of its own, so the VM's
``query-migrate`` and the client (docs/client-json.md) compute the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Weight of the newest measurement in the moving averages: a pass's rate
#: window is noisy (a burst of zero pages, a throttle step), a few samples are not.
SMOOTHING = 0.5
#: Seconds without progress after which a migration counts as stalled.
STALL_AFTER = 30.0


@dataclass(frozen=True)
class ForecastSample:
    """What one ``query-migrate`` tells: *t* seconds since the start, bytes and bytes/s."""

    t: float
    remaining: int
    transferred: int
    dirty_rate: float
    bandwidth: float
    downtime_limit_ms: int


def precopy_seconds(remaining: float, dirty_rate: float, bandwidth: float, downtime_limit_ms: int) -> float | None:
    """Seconds until the remainder fits in the downtime limit, None if it never does.

    Pass *n* starts with ``remaining × q**n`` (``q = dirty/bandwidth``) and
    takes that over the bandwidth, so the time is a geometric sum up to the
    first pass whose start fits in ``bandwidth × downtime-limit``.
    """
    if bandwidth <= 0:
        return None
    threshold = bandwidth * downtime_limit_ms / 1000
    if remaining <= threshold:
        return 0.0
    if dirty_rate >= bandwidth or threshold <= 0:
        return None
    q = dirty_rate / bandwidth
    passes = 1 if q == 0 else math.ceil(math.log(threshold / remaining) / math.log(q))
    return remaining / bandwidth * (passes if q == 0 else (1 - q ** passes) / (1 - q))


@dataclass(frozen=True)
class Forecast:
    """The forecast after the latest sample."""

    converges: bool
    seconds: float | None
    dirty_rate: float
    bandwidth: float
    stalled: bool

    def to_qmp(self) -> dict:
        """The ``x-vmigrate-forecast`` member of ``query-migrate`` (docs/client-json.md).

        Rates in bytes/s; ``seconds`` only when precopy converges.
        """
        out: dict = {"converges": self.converges, "dirty-rate": round(self.dirty_rate),
                     "bandwidth": round(self.bandwidth), "stalled": self.stalled}
        if self.seconds is not None:
            out["seconds"] = round(self.seconds, 3)
        return out


class ConvergenceForecast:
    """Smooths the rates over samples (EWMA) and tracks the last sample that made progress.

    A bandwidth of 0 is QEMU's "not measured yet" (``mbps`` before the first
    rate window), so it does not pull the average down; until a bandwidth
    was measured, precopy does not count as converging.
    """

    def __init__(self, stall_after: float = STALL_AFTER, smoothing: float = SMOOTHING) -> None:
        self.stall_after = stall_after
        self.smoothing = smoothing
        self.dirty_rate: float | None = None
        self.bandwidth: float | None = None
        self._last: ForecastSample | None = None
        self._progress_t: float | None = None

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else self.smoothing * new + (1 - self.smoothing) * old

    def update(self, s: ForecastSample) -> Forecast:
        """Take one sample; the forecast it leads to."""
        last = self._last
        if last is None or s.remaining < last.remaining or s.transferred > last.transferred:
            self._progress_t = s.t
        self._last = s
        self.dirty_rate = self._average(self.dirty_rate, s.dirty_rate)
        if s.bandwidth > 0:
            self.bandwidth = self._average(self.bandwidth, s.bandwidth)
        return self.forecast()

    def forecast(self) -> Forecast:
        """The forecast from the samples so far (none yet: not converging, not stalled)."""
        last, bandwidth, dirty = self._last, self.bandwidth or 0.0, self.dirty_rate or 0.0
        seconds = None if last is None else precopy_seconds(last.remaining, dirty, bandwidth, last.downtime_limit_ms)
        stalled = last is not None and last.t - self._progress_t >= self.stall_after
        return Forecast(converges=seconds is not None, seconds=seconds, dirty_rate=dirty, bandwidth=bandwidth,
                        stalled=stalled)
