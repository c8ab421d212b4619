"""``--postcopy`` and ``--stall``: the plan's decisions and what the client does with them."""

from __future__ import annotations

import pytest

from vmigrate.cli.steer import Steering, forecast_line
from vmigrate.cli.migrate import human_bytes
from vmigrate.harness.migrate import Sample
from vmigrate.harness.postcopy import PostcopyPlan

MIB = 1 << 20
CONVERGES_IN_3 = {"converges": True, "seconds": 3.0, "dirty-rate": MIB, "bandwidth": 40 * MIB, "stalled": False}
DIVERGES = {"converges": False, "dirty-rate": 80 * MIB, "bandwidth": 40 * MIB, "stalled": False}
UNMEASURED = {"converges": False, "dirty-rate": 0, "bandwidth": 0, "stalled": False}
STALLED = dict(CONVERGES_IN_3, stalled=True)


def test_parse():
    assert PostcopyPlan.parse("after=1.5", None) == PostcopyPlan(after=1.5)
    assert PostcopyPlan.parse("auto", 2.0) == PostcopyPlan(max_precopy=2.0)
    for text, budget in (("auto", None), ("later", None), ("after=soon", None)):
        with pytest.raises(ValueError):
            PostcopyPlan.parse(text, budget)


def test_after_a_fixed_time_whatever_the_forecast():
    plan = PostcopyPlan(after=1.0)
    assert plan.reason(0.9, DIVERGES) is None
    assert plan.reason(1.0, CONVERGES_IN_3) == "1 s after the start"


@pytest.mark.parametrize("t,forecast,switches", [
    (0.1, None, False),
    (0.1, UNMEASURED, False),
    (0.5, DIVERGES, True),
    (0.5, CONVERGES_IN_3, False),     # done at 3.5 s, within 4 s
    (1.5, CONVERGES_IN_3, True),      # done at 4.5 s
    (0.5, STALLED, True),
])
def test_auto_switches_when_the_forecast_misses_the_budget(t, forecast, switches):
    assert (PostcopyPlan(max_precopy=4.0).reason(t, forecast) is not None) == switches


class FakeRun:
    postcopy_t: float | None = None

    def start_postcopy(self) -> None:
        self.postcopy_t = 1.25


class Records:
    def __init__(self) -> None:
        self.written: list[dict] = []

    def write(self, kind: str, body: dict) -> None:
        self.written.append({kind: body})


def steer(plan: PostcopyPlan | None, *samples: Sample) -> tuple[list[bool], list[dict], FakeRun]:
    run, records, said = FakeRun(), Records(), []
    steering = Steering(run, plan, records, said.append)
    return [steering(s) for s in samples], records.written, run


def test_a_stall_is_cancelled_without_auto():
    cancels, written, _ = steer(PostcopyPlan(after=60), Sample(0.2, "active", forecast=STALLED))
    assert cancels == [True]
    assert written == [{"stall": {"t": 0.2, "status": "active", "action": "cancel"}}]


def test_auto_rescues_a_stall_by_switching_once():
    cancels, written, run = steer(PostcopyPlan(max_precopy=10), Sample(0.2, "active", forecast=STALLED),
                                  Sample(0.4, "active", forecast=STALLED))
    assert cancels == [False, False] and run.postcopy_t == 1.25
    assert written == [{"stall": {"t": 0.2, "status": "active", "action": "postcopy"}},
                       {"postcopy": {"t": 1.25, "reason": "no progress"}}]


def test_a_stall_in_postcopy_is_only_reported():
    cancels, written, _ = steer(None, Sample(5.0, "postcopy-active", forecast=STALLED))
    assert cancels == [False]
    assert written == [{"stall": {"t": 5.0, "status": "postcopy-active", "action": "none"}}]


def test_forecast_lines():
    assert forecast_line(Sample(1, "active", forecast=CONVERGES_IN_3), human_bytes) == "precopy converges in ~3 s"
    assert forecast_line(Sample(1, "active", forecast=DIVERGES), human_bytes) == \
        "precopy will not converge: dirty 80.0 MiB/s ≥ link 40.0 MiB/s"
    assert forecast_line(Sample(1, "postcopy-active"), human_bytes).startswith("postcopy")
    assert forecast_line(Sample(1, "setup"), human_bytes) is None
