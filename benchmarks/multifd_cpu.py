#!/usr/bin/env python3
"""Multifd's cost in the VM processes themselves: channel threads against channel workers (processes).

vmigrate -> vmigrate, ``--size`` random RAM on /dev/shm, unlimited bandwidth,
once with ``VMIGRATE_WORKERS=0`` (one thread per channel) and once
with ``=1`` (a worker process per channel, vmigrate/migration/multifd_worker.py)
for every channel count and compression, alternating per repetition.
Compression ``compress`` is the legacy capability instead, with as many
``compress-threads`` and ``decompress-threads`` as the channel count
(vmigrate/migration/compress_worker.py), and ``precopy`` the main channel
alone (channel count and mode change nothing there); their "packets" are
still 128 pages.  Per
run and side: the VM process's own CPU time (``/proc/PID/stat`` utime +
stime, which leave out its workers) and its reaped workers' (cutime +
cstime), each divided by the packets sent (guest pages / 128), and, with
``--gil``, the share of the run's wall time in which a thread of the VM
process held the interpreter lock (py-spy ``--gil`` samples over samples
taken).  The RAM must arrive equal.  Results: ``multifd-cpu.json`` and
``multifd-cpu.csv`` under ``--out`` (docs/benchmarks.md, "Multifd scaling").

Usage: ``python3 benchmarks/multifd_cpu.py [--size 1G] [--channels 2,8] [--compression none,zstd] [--gil]``
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's vmigrate

from vmigrate.cli.bench.images import fill_ram_image, verify  # noqa: E402
from vmigrate.cli.bench.memwatch import children  # noqa: E402
from vmigrate.cli.bench.report import median_of, write_outputs  # noqa: E402
from vmigrate.cli.bench.runner import RunSpec, UNLIMITED_BANDWIDTH, start_vm  # noqa: E402
from vmigrate.cli.bench.script import prepare, script_parser  # noqa: E402
from vmigrate.cli.bench.profile import stop_profiler  # noqa: E402
from vmigrate.harness.migrate import MigrationRun  # noqa: E402
from vmigrate.migration.worker_process import ENV  # noqa: E402
from vmigrate.migration.wire.multifd import PAGES_PER_PACKET  # noqa: E402

log = logging.getLogger("benchmarks.multifd_cpu")

MODES = {"threads": "0", "workers": "1"}
GIL_RATE = 250
KEYS = ("total_time_ms", "src_cpu_us_per_packet", "src_workers_cpu_us_per_packet", "dst_cpu_us_per_packet",
        "dst_workers_cpu_us_per_packet", "src_gil_share", "dst_gil_share")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of *pid*, user + system."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def gil_profiler(pid: int, path: Path) -> subprocess.Popen:
    return subprocess.Popen([shutil.which("py-spy") or "py-spy", "record", "--pid", str(pid), "--rate",
                             str(GIL_RATE), "--gil", "--nonblocking", "--format", "raw", "--output", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def gil_samples(path: Path) -> int:
    """Samples in which some thread held the lock (one raw line per stack, its count last)."""
    if not path.exists():
        return 0
    return sum(int(line.rsplit(" ", 1)[1]) for line in path.read_text().splitlines() if line.strip())


def run_once(mode: str, channels: int, method: str, size: int, image: Path, workdir: Path, logdir: Path,
             gil: bool) -> dict:
    os.environ[ENV] = MODES[mode]
    if method == "compress":
        spec = RunSpec("vmigrate", f"{mode}-{method}-x{channels}", size, ("compress",),
                       {"compress-threads": channels, "decompress-threads": channels}, timeout=300)
    elif method == "precopy":
        spec = RunSpec("vmigrate", f"{mode}-{method}", size, (), {}, timeout=300)
    else:
        spec = RunSpec("vmigrate", f"{mode}-{method}-x{channels}", size, ("multifd",),
                       {"multifd-channels": channels, "multifd-compression": method}, timeout=300)
    rec = spec.record(mode=mode, channels=channels, compression=method, loadavg_1m=os.getloadavg()[0])
    dst_ram = workdir / "dst.ram"
    vms = []
    profilers: list[subprocess.Popen] = []
    try:
        dst = start_vm(spec, "dst", dst_ram, workdir, logdir)
        vms.append(dst)
        src = start_vm(spec, "src", image, workdir, logdir)
        vms.append(src)
        mig = MigrationRun(src.qmp, "tcp:127.0.0.1:0", dst.qmp)
        mig.prepare([{"capability": cap, "state": True} for cap in spec.caps],
                    {"max-bandwidth": UNLIMITED_BANDWIDTH, **spec.params})
        before = {role: cpu_seconds(vm.pid) for role, vm in (("src", src), ("dst", dst))}
        if gil:
            profilers = [gil_profiler(vm.pid, logdir / f"{spec.scenario}-{role}.gil")
                         for role, vm in (("src", src), ("dst", dst))]
        t0 = time.monotonic()
        mig.start()
        mig.wait(300, 0.05)
        wall = time.monotonic() - t0
        info = src.qmp.execute("query-migrate")
        rec |= {"status": info["status"], "total_time_ms": info.get("total-time")}
        deadline = time.monotonic() + 30
        while dst.qmp.execute("query-migrate").get("status") not in ("completed", "failed"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        for vm in (src, dst):
            deadline = time.monotonic() + 10
            while children(vm.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        packets = size // 4096 / PAGES_PER_PACKET
        for role, vm in (("src", src), ("dst", dst)):
            own, reaped = (a - b for a, b in zip(cpu_seconds(vm.pid), before[role]))
            rec[f"{role}_cpu_us_per_packet"] = round(own / packets * 1e6, 1)
            rec[f"{role}_workers_cpu_us_per_packet"] = round(reaped / packets * 1e6, 1)
        for profiler in profilers:
            stop_profiler(profiler)
        if gil:
            for role in ("src", "dst"):
                rec[f"{role}_gil_share"] = round(gil_samples(logdir / f"{spec.scenario}-{role}.gil")
                                                 / (wall * GIL_RATE), 3)
    finally:
        for profiler in profilers:
            stop_profiler(profiler)
        for vm in reversed(vms):
            vm.close()
    if rec["status"] == "completed":
        verify(rec, image, dst_ram)
    dst_ram.unlink(missing_ok=True)
    return rec


def main() -> int:
    parser = script_parser(__doc__, ROOT / "benchmarks" / "results" / "multifd-cpu")
    parser.add_argument("--channels", default="2,8", help="multifd-channels counts (comma-separated)")
    parser.add_argument("--compression", default="none,zstd",
                        help="multifd-compression methods, compress for the legacy capability, "
                             "precopy for neither (comma-separated)")
    parser.add_argument("--gil", action="store_true", help="also sample the interpreter lock with py-spy")
    args = parser.parse_args()
    size, logdir, workdir = prepare(args, "multifdcpu")
    records: list[dict] = []
    try:
        image = fill_ram_image(workdir / "src.ram", size, 0.0, args.seed).path
        for rep in range(args.repeat):
            for method in args.compression.split(","):
                for channels in map(int, args.channels.split(",")):
                    for mode in (list(MODES) if rep % 2 == 0 else list(reversed(MODES))):
                        rec = run_once(mode, channels, method, size, image, workdir, logdir, args.gil)
                        log.info("%s", {k: rec.get(k) for k in ("scenario", "status", "verified", *KEYS)})
                        records.append(rec)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cells = sorted({(r["compression"], r["channels"], r["mode"]) for r in records})
    summary = {f"{m} x{c} {mode}": {k: median_of([r for r in records if (r["compression"], r["channels"], r["mode"])
                                                   == (m, c, mode) and r.get("verified")], k) for k in KEYS}
               for m, c, mode in cells}
    config = {"size": size, "repeat": args.repeat, "seed": args.seed, "channels": args.channels,
              "compression": args.compression, "gil": args.gil}
    write_outputs(Path(args.out), "multifd-cpu", config, records, summary)
    for cell, figures in summary.items():
        log.info("%s: %s", cell, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
