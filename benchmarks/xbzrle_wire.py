#!/usr/bin/env python3
"""Bytes on the wire with XBZRLE, for a guest rewriting 20 % of each page of its working set.

A vmigrate source runs a workload defined here (``Rewrite``): it cycles
through a working set (default 512 MiB of a 1 GiB guest), rewriting one
contiguous 20 % stretch of every page it visits, at a fixed page rate.
Each case migrates under a bandwidth limit that cannot keep up (downtime
limit 1 ms, so no convergence) until the source has done ``--passes``
dirty-bitmap syncs, then lifts the limits and completes.  Cases:

* ``xbzrle -> vmigrate`` and ``xbzrle -> qemu``: the same source with
  XBZRLE (cache sized to hold the working set), into either destination;
* ``plain -> vmigrate``: no XBZRLE, the baseline.

QEMU cannot be the source here: ``-M none`` has no vCPU, nothing in it can
re-dirty RAM (writes through its shared RAM file are not dirty-tracked),
so a QEMU source never re-sends a page and never uses XBZRLE.  What the
QEMU case shows instead is that QEMU 7.2 decodes every delta (RAM equal at
the end) for the same bytes a vmigrate destination gets; the encoding
itself is QEMU's byte for byte (tests/unit/test_xbzrle.py).

Usage: ``python benchmarks/xbzrle_wire.py [--size 1G] [--wss 512M] [--rate 128] [--passes 6]``
(``--serve`` is internal: it is how the source process is started).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vmigrate.harness.launcher import VMProcess, qemu_argv, vmigrate_argv
from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import Stress, Workload
from vmigrate.machine.memory import PAGE_SIZE, RAMBlock, parse_size

MIB = 1 << 20


class Rewrite(Stress):
    """Rewrites ``fraction`` of each visited page (one contiguous stretch), ``rate`` MiB of pages per second."""

    name = "rewrite"

    def __init__(self, ram: RAMBlock, wss: int, rate: float, fraction: float) -> None:
        self.span = int(PAGE_SIZE * fraction)
        super().__init__(ram, rate=rate, wss=wss)

    def write(self, pages: np.ndarray, stamp: int) -> None:
        offset = (stamp * 97) % (PAGE_SIZE - self.span)
        self.ram.pages[pages, offset:offset + self.span] ^= np.uint8(1 + stamp % 255)


class RewriteSpec:
    """Stands in for GuestSpec in the VM's configuration."""

    def __init__(self, wss: int, rate: float, fraction: float) -> None:
        self.args = (wss, rate, fraction)

    def build(self, ram: RAMBlock) -> Workload:
        return Rewrite(ram, *self.args)


def serve(args: argparse.Namespace) -> int:
    from vmigrate.vm import VMConfig, run_vm

    config = VMConfig(memory=parse_size(args.size), mem_path=args.mem_path, accel="soft",
                      guest=RewriteSpec(parse_size(args.wss), args.rate, args.fraction),  # type: ignore[arg-type]
                      qmp=[f"unix:{args.qmp}"])
    return run_vm(config)


def run_case(name: str, dst_kind: str, xbzrle: bool, args, work: Path) -> dict:
    size = parse_size(args.size)
    src_ram, dst_ram = work / "src.ram", work / "dst.ram"
    for path in (src_ram, dst_ram):
        path.unlink(missing_ok=True)
    src_argv = [sys.executable, __file__, "--serve", "--qmp", str(work / "src.sock"), "--mem-path", str(src_ram),
                "--size", args.size, "--wss", args.wss, "--rate", str(args.rate), "--fraction", str(args.fraction)]
    if dst_kind == "qemu":
        dst_argv = qemu_argv(work / "dst.sock", "-S", "-incoming", "defer", memory=f"{size >> 20}M", mem_path=dst_ram)
    else:
        dst_argv = vmigrate_argv(work / "dst.sock", "--accel", "soft", "-m", args.size, "--mem-path", str(dst_ram),
                                 "-S", "--incoming", "defer")
    try:
        with VMProcess(src_argv, work / "src.sock", work / f"{name}-src.log") as src, \
                VMProcess(dst_argv, work / "dst.sock", work / f"{name}-dst.log") as dst:
            wait_for(lambda: src_ram.exists() and src_ram.read_bytes()[:8] == b"VMIGRATE", 30, "guest start",
                     interval=0.1)
            time.sleep(1.0)  # let the guest touch its whole working set once
            if xbzrle:
                src.cmd("migrate-set-capabilities", capabilities=[{"capability": "xbzrle", "state": True}])
                src.cmd("migrate-set-parameters", **{"xbzrle-cache-size": args.cache})
            src.cmd("migrate-set-parameters", **{"max-bandwidth": parse_size(args.bandwidth), "downtime-limit": 1})
            dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
            port = dst.cmd("query-migrate")["socket-address"][0]["port"]
            t0 = time.monotonic()
            src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            samples = {}
            while len(samples) < 1 or max(samples) < args.passes:
                if time.monotonic() - t0 > 600:
                    raise TimeoutError(f"{args.passes} passes")
                info = src.cmd("query-migrate")
                syncs = info.get("ram", {}).get("dirty-sync-count", 0)
                if syncs and syncs not in samples:
                    samples[syncs] = _sample(info)
                time.sleep(0.02)
            src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": 600000})
            final = src.wait_migration({"completed", "failed"}, timeout=600)
            dst.wait_migration({"completed", "failed"}, timeout=60)
            equal = final["status"] == "completed" and _equal(src_ram, dst_ram)
            # Steady state: from the first sync after XBZRLE had a round to fill its cache (pass 3).
            first = min(k for k in samples if k >= 3)
            last = max(samples)
            a, b = samples[first], samples[last]
            pages = b["pages"] - a["pages"]
            return {"case": name, "status": final["status"], "ram_equal": equal, "window_passes": [first, last],
                    "window_bytes": b["transferred"] - a["transferred"], "window_pages": pages,
                    "bytes_per_page": round((b["transferred"] - a["transferred"]) / pages, 1) if pages else None,
                    "window_xbzrle_pages": b["xbzrle_pages"] - a["xbzrle_pages"],
                    "window_xbzrle_bytes": b["xbzrle_bytes"] - a["xbzrle_bytes"],
                    "window_overflow": b["overflow"] - a["overflow"], "window_cache_miss": b["miss"] - a["miss"],
                    "total_time_ms": final.get("total-time"), "final_transferred": final["ram"]["transferred"]}
    finally:
        for path in (src_ram, dst_ram):
            path.unlink(missing_ok=True)


def _sample(info: dict) -> dict:
    ram, xb = info["ram"], info.get("xbzrle-cache") or {}
    return {"transferred": ram["transferred"], "xbzrle_pages": xb.get("pages", 0), "xbzrle_bytes": xb.get("bytes", 0),
            "overflow": xb.get("overflow", 0), "miss": xb.get("cache-miss", 0),
            "pages": ram["normal"] + ram["duplicate"] + xb.get("pages", 0)}


def _equal(a: Path, b: Path) -> bool:
    x = np.memmap(a, np.uint8, "r")
    y = np.memmap(b, np.uint8, "r")
    step = 64 * MIB
    return x.size == y.size and all(np.array_equal(x[o:o + step], y[o:o + step]) for o in range(0, x.size, step))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--qmp", help=argparse.SUPPRESS)
    ap.add_argument("--mem-path", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--wss", default="512M")
    ap.add_argument("--rate", type=float, default=128.0, help="MiB of pages rewritten per second")
    ap.add_argument("--fraction", type=float, default=0.2, help="share of each page rewritten")
    ap.add_argument("--cache", type=int, default=512 * MIB, help="xbzrle-cache-size (bytes, power of two)")
    ap.add_argument("--bandwidth", default="256M", help="max-bandwidth until the passes are done")
    ap.add_argument("--passes", type=int, default=8)
    ap.add_argument("--cases", default="xbzrle-vmigrate,xbzrle-qemu,plain-vmigrate")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.serve:
        return serve(args)
    work = Path(tempfile.mkdtemp(prefix="xbzrle-wire-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    results = []
    try:
        for case in args.cases.split(","):
            mode, dst_kind = case.split("-")
            res = run_case(case, dst_kind, mode == "xbzrle", args, work)
            results.append(res)
            print(json.dumps(res))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'case':16} {'RAM equal':>9} {'passes':>7} {'MiB sent':>9} {'pages':>8} {'bytes/page':>10} "
          f"{'xbzrle pages':>12} {'xbzrle bytes':>12} {'overflow':>8} {'misses':>7}")
    for r in results:
        print(f"{r['case']:16} {str(r['ram_equal']):>9} {'%d-%d' % tuple(r['window_passes']):>7} "
              f"{r['window_bytes'] / MIB:9.1f} {r['window_pages']:8d} {r['bytes_per_page'] or 0:10.0f} "
              f"{r['window_xbzrle_pages']:12d} {r['window_xbzrle_bytes']:12d} {r['window_overflow']:8d} "
              f"{r['window_cache_miss']:7d}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
