"""What ``vmigrate migrate`` does with each sample's forecast: the postcopy switch, the stall verdict.

Both are decided from the sample's ``forecast`` (docs/client-json.md), which
the client computes from ``query-migrate`` (so it works against QEMU 7.2)
unless the VM sent its own ``x-vmigrate-forecast``.  Each decision is a JSON
record and a line for the operator.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

from vmigrate.harness.migrate import MigrationRun, Sample
from vmigrate.harness.postcopy import POSTCOPY, PostcopyPlan

log = logging.getLogger(__name__)


class Records(Protocol):
    def write(self, kind: str, body: dict) -> None: ...


def forecast_line(s: Sample, human_bytes: Callable[[float | None], str]) -> str | None:
    """The live view's forecast line, None while there is nothing to forecast (setup, the end)."""
    f = s.forecast
    if s.status in POSTCOPY:
        return "postcopy: the guest runs on the destination"
    if f is None:
        return None
    if f.get("stalled"):
        return "stalled: no progress"
    if not f.get("bandwidth"):
        return "forecast: measuring the link"
    if f["converges"]:
        return f"precopy converges in ~{f['seconds']:.0f} s"
    return (f"precopy will not converge: dirty {human_bytes(f['dirty-rate'])}/s"
            f" ≥ link {human_bytes(f['bandwidth'])}/s")


class Steering:
    """Called with each sample before the end; True asks :meth:`MigrationRun.wait` to cancel.

    A stall before postcopy is cancelled, unless ``--postcopy auto`` can
    rescue it by switching; a stall in postcopy is only reported, since
    cancelling then would lose the guest (its RAM is split between both
    sides; docs/qemu/postcopy.md §8: a paused postcopy is recovered, not
    restarted).
    """

    def __init__(self, run: MigrationRun, plan: PostcopyPlan | None, records: Records,
                 say: Callable[[str], None]) -> None:
        self.run, self.plan, self.records, self.say = run, plan, records, say
        self.notes: list[str] = []
        self.stall_reported = False

    def _note(self, t: float, text: str) -> None:
        log.info("t=%.1fs %s", t, text)
        self.notes.append(text)
        self.say(f"t={t:.1f}s {text}")

    def __call__(self, s: Sample) -> bool:
        in_postcopy = s.status in POSTCOPY or self.run.postcopy_t is not None
        stalled = bool(s.forecast and s.forecast.get("stalled"))
        if stalled and not self.stall_reported:
            self.stall_reported = True
            action = "none" if in_postcopy else "postcopy" if self.plan and self.plan.auto else "cancel"
            self.records.write("stall", {"t": round(s.t, 3), "status": s.status, "action": action})
            self._note(s.t, {"none": "stalled in postcopy: not cancelled, it can only be recovered",
                             "postcopy": "stalled: switching to postcopy",
                             "cancel": "stalled: cancelling the migration"}[action])
            if action == "cancel":
                return True
        if self.plan is not None and not in_postcopy and s.status == "active":
            reason = self.plan.reason(s.t, s.forecast)
            if reason is not None:
                self.run.start_postcopy()
                self.records.write("postcopy", {"t": round(self.run.postcopy_t, 3), "reason": reason})
                self._note(s.t, f"switching to postcopy: {reason}")
        return False
