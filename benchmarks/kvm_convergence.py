#!/usr/bin/env python3
"""KVM figures of issue 4: dirty-rate estimates, dirty limits, convergence.

Usage: ``python benchmarks/kvm_convergence.py [--json OUT]``

1. ``calc-dirty-rate`` in its three modes on a ``stress`` guest set to a
   known rate: the estimate's error against the set rate.
2. ``set-vcpu-dirty-limit`` on a guest dirtying 200 MiB/s: the settled rate
   against the quota.
3. A ``stress`` guest dirtying at half of ``max-bandwidth`` migrates without
   auto-converge: total time, downtime against ``downtime-limit``, passes.

Needs a working /dev/kvm.  Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmigrate.qmp.client import QMPClient

MIB = 1 << 20


class VM:
    def __init__(self, workdir: Path, name: str, *args: str) -> None:
        self.sock = workdir / f"{name}.sock"
        self.log = open(workdir / f"{name}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "vmigrate", "run", "--qmp", f"unix:{self.sock}", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start; see {self.log.name}")
            time.sleep(0.05)
        self.qmp = QMPClient(str(self.sock))

    def wait(self, predicate, timeout: float, interval: float = 0.1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise SystemExit("timed out")

    def close(self) -> None:
        try:
            self.qmp.execute("quit")
        except Exception:
            pass
        self.proc.wait(timeout=20)
        self.log.close()


def dirty_rate_estimates(workdir: Path) -> list[dict]:
    rows = []
    for rate in (64, 128, 256):
        for accel, modes in (("kvm", ("page-sampling", "dirty-bitmap")), ("kvm,dirty-ring-size=65536", ("dirty-ring",))):
            vm = VM(workdir, f"rate{rate}", "--accel", accel, "-m", "1G", "--guest", f"stress:rate={rate},wss=512M")
            time.sleep(1.0)
            for mode in modes:
                args = {"calc-time": 2, "mode": mode} | ({"sample-pages": 4096} if mode == "page-sampling" else {})
                vm.qmp.execute("calc-dirty-rate", args)
                info = vm.wait(lambda: (i := vm.qmp.execute("query-dirty-rate"))["status"] == "measured" and i, 15)
                rows.append({"set_mib_s": rate, "mode": mode, "estimate_mib_s": info["dirty-rate"],
                             "error_pct": round(100 * (info["dirty-rate"] - rate) / rate, 1)})
            vm.close()
    return rows


def dirty_limits(workdir: Path) -> list[dict]:
    rows = []
    for quota in (50, 100):
        vm = VM(workdir, f"limit{quota}", "--accel", "kvm,dirty-ring-size=4096", "-m", "256M",
                "--guest", "stress:rate=200,wss=128M")
        vm.qmp.execute("set-vcpu-dirty-limit", {"dirty-rate": quota})
        # QEMU's rule moves in steps of a tenth of the ring-fill time when near the quota: let it settle.
        time.sleep(15)
        samples = []
        for _ in range(6):
            time.sleep(1)
            samples.append(vm.qmp.execute("query-vcpu-dirty-limit")[0]["current-rate"])
        rate = statistics.mean(samples)
        rows.append({"guest_mib_s": 200, "quota_mib_s": quota, "settled_mib_s": round(rate, 1),
                     "error_pct": round(100 * (rate - quota) / quota, 1)})
        vm.close()
    return rows


def convergence(workdir: Path) -> dict:
    bandwidth, rate = 256, 128
    guest = f"stress:rate={rate},wss=256M"
    dst = VM(workdir, "conv-dst", "--accel", "kvm", "-m", "512M", "--guest", guest, "--incoming", "tcp:127.0.0.1:0")
    src = VM(workdir, "conv-src", "--accel", "kvm", "-m", "512M", "--guest", guest)
    port = dst.qmp.execute("query-migrate")["socket-address"][0]["port"]
    src.qmp.execute("migrate-set-parameters", {"max-bandwidth": bandwidth * MIB, "downtime-limit": 300})
    time.sleep(1.0)
    src.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    info = src.wait(lambda: (i := src.qmp.execute("query-migrate"))["status"] in ("completed", "failed") and i,
                    120)
    result = {"guest_mib_s": rate, "max_bandwidth_mib_s": bandwidth, "downtime_limit_ms": 300,
              "status": info["status"], "total_time_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
              "passes": info.get("ram", {}).get("dirty-sync-count")}
    src.close()
    dst.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmigrate-kvm-bench-") as tmp:
        workdir = Path(tmp)
        figures = {"dirty_rate": dirty_rate_estimates(workdir), "dirty_limit": dirty_limits(workdir),
                   "convergence": convergence(workdir)}
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
