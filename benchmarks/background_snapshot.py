#!/usr/bin/env python3
"""Background snapshot figures: the guest's write rate before and during a snapshot, and the snapshot's time.

Usage: ``python benchmarks/background_snapshot.py [--size 1G] [--rate MIBS] [--accel soft|kvm] [--repeat N]
[--json OUT]``

vmigrate runs the ``stress`` workload over all its RAM (RAM on /dev/shm,
every page filled with random bytes first, so every page is a normal page
in the stream).  The script reads the workload's cursor (header word 2,
docs of vmigrate/machine/guest.py) from the RAM file every few ms: pages
written per second for 2 s before the snapshot, then during the snapshot
(``migrate`` with ``background-snapshot`` to ``exec:cat > FILE`` on
/dev/shm), where a write to a page not saved yet waits for it
(docs/background-snapshot.md).  The snapshot's total time, downtime and
throughput are ``query-migrate``'s.

QEMU 7.2 ``-M none`` has no vCPU, so nothing dirties its RAM: for QEMU the
script reports only the snapshot of the same RAM (same random content,
memory-backend-file on /dev/shm).  Not a test: it reports figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vmigrate.harness.launcher import VMProcess, qemu_argv, vmigrate_argv
from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import read_header
from vmigrate.machine.memory import PAGE_SIZE, parse_size

log = logging.getLogger("background-snapshot-bench")

FINAL = {"completed", "failed", "cancelled"}
#: Seconds of write-rate sampling before the snapshot.
BEFORE_S = 2.0
#: Cursor sampling period (s): short enough that the cursor never wraps between samples.
SAMPLE_S = 0.002


def fill_random(path: Path, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for _ in range(size // (64 << 20) or 1):
            f.write(rng.integers(0, 256, min(size, 64 << 20), dtype=np.uint8).tobytes())


class CursorRate:
    """Pages the stress workload wrote, from its cursor in the RAM file (wraps at the working set)."""

    def __init__(self, ram: Path, wss_pages: int) -> None:
        self.ram = ram
        self.wss_pages = wss_pages
        self.pages = 0
        self._last = self._cursor()

    def _cursor(self) -> int:
        with open(self.ram, "rb") as f:
            return int.from_bytes(f.read(24)[16:24], "little")

    def sample(self) -> None:
        cursor = self._cursor()
        self.pages += (cursor - self._last) % self.wss_pages
        self._last = cursor


def snapshot_info(vm: VMProcess) -> dict:
    info = vm.wait_migration(FINAL, timeout=600)
    if info["status"] != "completed":
        raise RuntimeError(f"snapshot ended {info['status']}: {info.get('error-desc')}")
    return {"total_ms": info["total-time"], "downtime_ms": info["downtime"], "setup_ms": info["setup-time"],
            "mbps": round(info["ram"]["mbps"], 1), "transferred": info["ram"]["transferred"]}


def run_vmigrate(work: Path, size: int, rate: int, accel: str, seed: int) -> dict:
    ram, image = work / "vmigrate.ram", work / "vmigrate.snapshot"
    fill_random(ram, size, seed)
    wss = size - PAGE_SIZE
    guest = f"stress:rate={rate},wss={wss // 1024}K,tick=2"
    argv = vmigrate_argv(work / "vmigrate.sock", "--accel", accel, "-m", f"{size >> 20}M", "--mem-path", str(ram),
                         "--guest", guest)
    with VMProcess(argv, work / "vmigrate.sock", work / "vmigrate.log") as vm:
        vm.set_caps(**{"background-snapshot": True})
        wait_for(lambda: (read_header(ram) or 0) > 10, 30, "guest start")
        counter = CursorRate(ram, wss // PAGE_SIZE)
        start = time.monotonic()
        while time.monotonic() - start < BEFORE_S:
            time.sleep(SAMPLE_S)
            counter.sample()
        before = counter.pages / (time.monotonic() - start)
        counter.pages = 0
        start = time.monotonic()
        vm.cmd("migrate", uri=f"exec:cat > {image}")
        while vm.migrate_status()["status"] not in FINAL:
            time.sleep(SAMPLE_S)
            counter.sample()
        during = counter.pages / (time.monotonic() - start)
        figures = snapshot_info(vm)
    image.unlink()
    ram.unlink()
    return {"impl": "vmigrate", "accel": accel, "guest": guest,
            "pages_per_s_before": round(before), "pages_per_s_during": round(during),
            "write_rate_kept": round(during / before, 3) if before else None, **figures}


def run_qemu(work: Path, size: int, seed: int) -> dict:
    ram, image = work / "qemu.ram", work / "qemu.snapshot"
    fill_random(ram, size, seed)
    argv = qemu_argv(work / "qemu.sock", memory=f"{size // (1 << 20)}M", mem_path=ram)
    with VMProcess(argv, work / "qemu.sock", work / "qemu.log") as vm:
        vm.set_caps(**{"background-snapshot": True})
        vm.cmd("migrate", uri=f"exec:cat > {image}")
        figures = snapshot_info(vm)
    image.unlink()
    ram.unlink()
    return {"impl": "qemu", "guest": "none (-M none has no vCPU)", **figures}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="guest RAM (default 1G)")
    parser.add_argument("--rate", type=int, default=256, help="stress write rate, MiB/s (default 256)")
    parser.add_argument("--accel", default="soft", choices=("soft", "kvm"))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    size = parse_size(args.size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vmigrate-bgsnap-", dir="/dev/shm") as tmp:
        for n in range(args.repeat):
            rows.append(run_vmigrate(Path(tmp), size, args.rate, args.accel, n))
            rows.append(run_qemu(Path(tmp), size, n))
    for impl in ("vmigrate", "qemu"):
        mine = [r for r in rows if r["impl"] == impl]
        med = {k: statistics.median(r[k] for r in mine) for k in ("total_ms", "downtime_ms", "mbps")}
        line = f"{impl:8s} snapshot of {args.size}: total {med['total_ms']:.0f} ms, downtime {med['downtime_ms']:.0f} ms, " \
               f"{med['mbps']:.0f} Mbit/s"
        if impl == "vmigrate":
            before = statistics.median(r["pages_per_s_before"] for r in mine)
            during = statistics.median(r["pages_per_s_during"] for r in mine)
            line += f"; guest writes {before:.0f} pages/s before, {during:.0f} pages/s during"
        log.info("%s", line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"size": size, "rate_mib_s": args.rate, "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
