#!/usr/bin/env python3
"""x-ignore-shared against a full copy: vmigrate -> vmigrate and QEMU 7.2 -> QEMU 7.2 in the same run.

An idle guest of ``--size`` random RAM (default 1 GiB, the RAM files on
/dev/shm) migrates over tcp loopback at unlimited bandwidth, the destination
started with ``-S``, in two cases for both implementations, in alternating
order per repetition (docs/benchmarks.md, "Fresh host memory"):

* ``full``: the destination has its own RAM file and gets every page;
* ``ignore-shared``: ``x-ignore-shared`` on both sides and one RAM file that
  both map (QEMU's local live update; docs/qemu/misc.md §4.1): no page is sent.

Each run's figures are ``query-migrate``'s total-time, downtime and
transferred bytes and the wall time to the destination's ``completed`` event.
A full copy's destination RAM must equal the source's; with ignore-shared the
shared file must still hold the image.  Results: ``ignore-shared.json`` (every
run, the medians, the full/ignore-shared ratios) and ``ignore-shared.csv``
under ``--out``.

Usage: ``python3 benchmarks/ignore_shared.py [--size 1G] [--repeat 1] [--out benchmarks/results/ignore-shared]``
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's vmigrate

from vmigrate.cli.bench.images import file_sha256, fill_ram_image  # noqa: E402
from vmigrate.cli.bench.report import median_of, ratio, write_outputs  # noqa: E402
from vmigrate.cli.bench.runner import IMPLS, RunSpec, measure, migrate_once  # noqa: E402
from vmigrate.cli.bench.script import prepare, script_parser  # noqa: E402

log = logging.getLogger("benchmarks.ignore_shared")

#: case -> capabilities
CASES: dict[str, tuple[str, ...]] = {"full": (), "ignore-shared": ("x-ignore-shared",)}
KEYS = ("total_time_ms", "downtime_ms", "setup_time_ms", "wall_s", "transferred_bytes")


def run_case(case: str, impl: str, size: int, image: Path, sha256: str, workdir: Path, logdir: Path,
             timeout: float) -> dict:
    spec = RunSpec(impl, case, size, caps=CASES[case], timeout=timeout)
    if case == "full":
        rec = migrate_once(spec, image, workdir, logdir)
    else:
        rec = measure(spec, image, image, workdir, logdir, None)
        rec["verified"] = rec["status"] == "completed" and file_sha256(image) == sha256
    rec.pop("samples", None)
    return rec


def summarize(records: list[dict]) -> dict:
    """Medians of the good runs per case and implementation; full over ignore-shared per figure."""
    summary: dict = {}
    for impl in IMPLS:
        entry: dict = {}
        for case in CASES:
            good = [r for r in records if r["scenario"] == case and r["impl"] == impl
                    and r["status"] == "completed" and r.get("verified")]
            entry[case] = {"good": len(good), **{key: median_of(good, key) for key in KEYS}}
        entry["full_over_ignore_shared"] = {key: ratio(entry["full"][key], entry["ignore-shared"][key])
                                            for key in ("total_time_ms", "downtime_ms", "wall_s")}
        summary[impl] = entry
    return summary


def main() -> int:
    args = script_parser(__doc__, ROOT / "benchmarks" / "results" / "ignore-shared").parse_args()
    size, logdir, workdir = prepare(args, "ignshared")
    records: list[dict] = []
    try:
        log.info("filling %d MiB of random guest RAM in %s", size >> 20, workdir)
        image = fill_ram_image(workdir / "src.ram", size, 0.0, args.seed)
        for rep in range(args.repeat):
            for case in CASES:
                for impl in IMPLS if rep % 2 == 0 else IMPLS[::-1]:
                    rec = run_case(case, impl, size, image.path, image.sha256, workdir, logdir,
                                   args.timeout) | {"rep": rep}
                    records.append(rec)
                    log.info("run %d %-13s %-8s %s total-time %s ms, downtime %s ms, wall %s s, "
                             "%s bytes, verified: %s", rep + 1, case, impl, rec["status"],
                             rec.get("total_time_ms"), rec.get("downtime_ms"), rec.get("wall_s"),
                             rec.get("transferred_bytes"), rec.get("verified"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(records)
    config = {"size": size, "repeat": args.repeat, "seed": args.seed, "guest": "idle",
              "cases": {case: {"caps": list(caps)} for case, caps in CASES.items()}}
    write_outputs(args.out, "ignore-shared", config, records, summary)
    for impl in IMPLS:
        log.info("%-8s %s", impl, summary[impl])
    log.info("written: %s", args.out / "ignore-shared.json")
    return 0 if all(r["status"] == "completed" and r.get("verified") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
