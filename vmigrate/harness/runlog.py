"""A migration's JSON log read back: what ``vmigrate migrate --json`` / ``--json-log`` write.

One record a line, each an object whose one key names its type: ``run``
(what migrated where, first), ``sample`` (one ``query-migrate`` each) and
``summary`` (last), with ``postcopy`` and ``stall`` among the samples when
they happen; docs/client-json.md documents every field.
``vmigrate plot`` reads logs to draw and compare runs, so what a plot marks
(passes, switchover, downtime) is derived here from the records alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vmigrate.harness.migrate import Sample

#: Source statuses once the guest has stopped for the last copy (QAPI MigrationStatus).
STOPPED = frozenset({"device", "completed"})


@dataclass
class RunLog:
    """The records of one migration."""

    run: dict = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    postcopy: dict | None = None
    stall: dict | None = None


def read_log(path: str | Path) -> RunLog:
    """Parse a JSON log; ValueError naming the line for anything that is not one of its records."""
    log = RunLog()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                (kind, body), = json.loads(line).items()
                if kind == "sample":
                    log.samples.append(Sample(**body))
                elif kind in ("run", "summary", "postcopy", "stall"):
                    setattr(log, kind, body)
                else:
                    raise ValueError(f"unknown record type '{kind}'")
            except (ValueError, TypeError, AttributeError) as err:
                raise ValueError(f"{path}:{number}: not a vmigrate migrate JSON record ({err})") from None
    return log


def pass_starts(samples: list[Sample]) -> list[tuple[float, int]]:
    """(t, pass) of each sample that first sees a new dirty-sync-count.

    QEMU bumps dirty-sync-count once per bitmap sync, i.e. at the start of
    every RAM pass (migration_bitmap_sync in migration/ram.c), so a change
    between two samples is a pass boundary, known to within one interval.
    """
    starts, last = [], 0
    for s in samples:
        if s.passes > last:
            starts.append((s.t, s.passes))
            last = s.passes
    return starts


def switchover(log: RunLog) -> float | None:
    """Seconds after ``migrate`` at which the source stopped the guest for the last copy.

    A completed migration reports total-time from start_time and downtime
    from downtime_start, both up to the same end (migration_calculate_complete
    in migration/migration.c, docs/qemu/convergence.md §5), so their
    difference is the moment of the stop.  Without both, the first sample
    whose status is ``device`` or ``completed`` bounds it from above.
    """
    total, downtime = log.summary.get("total-time-ms"), log.summary.get("downtime-ms")
    if total and downtime is not None:
        return (total - downtime) / 1000
    return next((s.t for s in log.samples if s.status in STOPPED), None)
