"""The convergence forecast (vmigrate/migration/forecast.py) with numbers worked out by hand."""

from __future__ import annotations

import pytest

from vmigrate.migration.forecast import ConvergenceForecast, ForecastSample, precopy_seconds

MIB = 1 << 20


def sample(t: float, remaining: int, dirty: float, bandwidth: float, transferred: int | None = None,
           limit_ms: int = 300) -> ForecastSample:
    return ForecastSample(t=t, remaining=remaining, transferred=int(t * MIB) if transferred is None else transferred,
                          dirty_rate=dirty, bandwidth=bandwidth, downtime_limit_ms=limit_ms)


def test_converging_passes_shrink_geometrically():
    # 100 MiB at 40 MiB/s while 10 MiB/s are dirtied: pass 1 takes 2.5 s and leaves 25 MiB,
    # pass 2 takes 0.625 s and leaves 6.25 MiB, which fits in 40 MiB/s × 300 ms = 12 MiB.
    assert precopy_seconds(100 * MIB, 10 * MIB, 40 * MIB, 300) == pytest.approx(3.125)


def test_an_idle_guest_needs_one_pass_and_a_small_remainder_none():
    assert precopy_seconds(100 * MIB, 0, 50 * MIB, 300) == pytest.approx(2.0)
    assert precopy_seconds(10 * MIB, 30 * MIB, 40 * MIB, 300) == 0.0


@pytest.mark.parametrize("dirty,bandwidth,limit_ms", [
    (80 * MIB, 40 * MIB, 300),   # diverging: every pass grows
    (40 * MIB, 40 * MIB, 300),   # dirty == bandwidth: every pass the same
    (10 * MIB, 0, 300),          # nothing sent
    (10 * MIB, 40 * MIB, 0),     # a zero downtime limit never fits anything left
])
def test_never_converges(dirty, bandwidth, limit_ms):
    assert precopy_seconds(100 * MIB, dirty, bandwidth, limit_ms) is None


def test_rates_are_smoothed_and_an_unmeasured_bandwidth_ignored():
    fc = ConvergenceForecast()
    fc.update(sample(0.2, 100 * MIB, 8 * MIB, 40 * MIB))
    fc.update(sample(0.4, 90 * MIB, 16 * MIB, 0))
    f = fc.update(sample(0.6, 80 * MIB, 16 * MIB, 20 * MIB))
    assert f.bandwidth == 30 * MIB and f.dirty_rate == 14 * MIB
    assert f.seconds == pytest.approx(precopy_seconds(80 * MIB, 14 * MIB, 30 * MIB, 300))
    assert f.to_qmp() == {"converges": True, "seconds": round(f.seconds, 3), "dirty-rate": 14 * MIB,
                          "bandwidth": 30 * MIB, "stalled": False}


def test_before_any_bandwidth_it_does_not_converge():
    f = ConvergenceForecast().update(sample(0.1, 100 * MIB, 0, 0))
    assert f.to_qmp() == {"converges": False, "dirty-rate": 0, "bandwidth": 0, "stalled": False}


def test_diverging_has_no_seconds():
    f = ConvergenceForecast().update(sample(1.0, 100 * MIB, 80 * MIB, 40 * MIB))
    assert f.to_qmp() == {"converges": False, "dirty-rate": 80 * MIB, "bandwidth": 40 * MIB, "stalled": False}


def test_stalled_after_the_set_time_without_progress():
    fc = ConvergenceForecast(stall_after=5.0)
    assert not fc.update(sample(0.0, 100 * MIB, 0, 40 * MIB, transferred=0)).stalled
    assert not fc.update(sample(1.0, 90 * MIB, 0, 40 * MIB, transferred=10 * MIB)).stalled
    # Nothing moves from t=1 on: stalled from t=6.
    assert not fc.update(sample(5.9, 90 * MIB, 0, 40 * MIB, transferred=10 * MIB)).stalled
    assert fc.update(sample(6.0, 90 * MIB, 0, 40 * MIB, transferred=10 * MIB)).stalled
    # Only remaining shrinking (a zero page burst counts nothing in transferred) is progress again.
    assert not fc.update(sample(7.0, 89 * MIB, 0, 40 * MIB, transferred=10 * MIB)).stalled


def test_growing_remaining_with_bytes_sent_is_no_stall():
    fc = ConvergenceForecast(stall_after=1.0)
    for t in range(5):
        f = fc.update(sample(float(t), 100 * MIB + t, 80 * MIB, 40 * MIB))
    assert not f.stalled and not f.converges
