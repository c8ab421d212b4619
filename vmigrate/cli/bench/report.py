"""What every benchmark writes and prints: JSON and CSV files, number formats, the verdict."""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

from vmigrate.cli.main import CLIError
from vmigrate.harness.launcher import QEMU


def host_info() -> dict:
    try:
        qemu = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        qemu = None
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "qemu": qemu,
            "kernel": platform.release(), "loadavg": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_outputs(out: Path, kind: str, config: dict, records: list[dict], summary: dict) -> None:
    doc = {"kind": kind, "config": config, "host": host_info(), "summary": summary, "runs": records}
    (out / f"{kind}.json").write_text(json.dumps(doc, indent=1, default=str))
    columns: list[str] = []
    for rec in records:
        columns += [k for k in rec if k not in columns and k != "samples"]
    with open(out / f"{kind}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def median_of(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def fmt(value, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{unit}"


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):,.0f}"


def describe(rec: dict) -> str:
    """One progress line for a finished run."""
    if rec["status"] != "completed":
        return f"{rec['status']}: {rec.get('note') or 'see logs'}"
    return (f"completed, total-time {fmt(rec.get('total_time_ms'))} ms, downtime {fmt(rec.get('downtime_ms'))} ms, "
            f"wall {fmt(rec.get('wall_s'), digits=3)} s, RAM equal: {rec.get('verified')}"
            + (f" ({rec['note']})" if rec.get("note") else ""))


def report_failures(records: list[dict]) -> int:
    """A wrong migration is a failure of the benchmark, whatever the timings say."""
    wrong = [r for r in records if r.get("verified") is False]
    if wrong:
        raise CLIError(f"destination RAM differs from the source in {len(wrong)} run(s): "
                       + "; ".join(f"{r['impl']} {r['scenario']}: {r['note']}" for r in wrong))
    bad = [r for r in records if r["status"] not in ("completed", "n/a", "not implemented")]
    return 1 if bad else 0
