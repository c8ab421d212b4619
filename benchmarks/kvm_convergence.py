#!/usr/bin/env python3
"""KVM figures of issue 4: dirty-rate estimates, dirty limits, convergence.

Usage: ``python benchmarks/kvm_convergence.py [--json OUT]``

1. ``calc-dirty-rate`` in its three modes on a ``stress`` guest set to a
   known rate: the estimate's error against the set rate.
2. ``set-vcpu-dirty-limit`` on a guest dirtying 200 MiB/s: the settled rate
   against the quota.
3. A ``stress`` guest dirtying at half of ``max-bandwidth`` migrates without
   auto-converge: total time, downtime against ``downtime-limit``, passes.
4. Side by side with QEMU 7.2 on KVM: the same ``stress`` program, booted on
   a QEMU PC by our firmware (vmigrate/machine/x86guest/pc.py), migrated
   under the same parameters by both, at half the bandwidth and (with
   auto-converge) at twice the bandwidth; the guest spins on the TSC between
   steps in both (``tick=0``: a PC has no sleep hypercall).  Each run checks
   that the guest keeps stamping pages on the destination.

Needs a working /dev/kvm and qemu-system-x86_64.  Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from vmigrate.harness.launcher import VMProcess, qemu_argv, vmigrate_argv
from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import GuestSpec
from vmigrate.machine.x86guest import pc

MIB = 1 << 20


def start_vm(workdir: Path, name: str, *args: str) -> VMProcess:
    """A vmigrate VM; *args* for ``vmigrate run``."""
    sock = workdir / f"{name}.sock"
    return VMProcess(vmigrate_argv(sock, *args), sock, workdir / f"{name}.log")


def start_qemu_pc(workdir: Path, name: str, ram: Path, size: int, *args: str) -> VMProcess:
    """QEMU 7.2 on a KVM PC booting the guest program :func:`pc.prepare` put into *ram*."""
    sock = workdir / f"{name}.sock"
    return VMProcess(qemu_argv(sock, *args, memory=f"{size >> 20}M", mem_path=ram, pc=True), sock,
                     workdir / f"{name}.log")


def dirty_rate_estimates(workdir: Path) -> list[dict]:
    rows = []
    for rate in (64, 128, 256):
        for accel, modes in (("kvm", ("page-sampling", "dirty-bitmap")), ("kvm,dirty-ring-size=65536", ("dirty-ring",))):
            vm = start_vm(workdir, f"rate{rate}", "--accel", accel, "-m", "1G",
                          "--guest", f"stress:rate={rate},wss=512M")
            time.sleep(1.0)
            for mode in modes:
                args = {"calc-time": 2, "mode": mode} | ({"sample-pages": 4096} if mode == "page-sampling" else {})
                vm.qmp.execute("calc-dirty-rate", args)
                info = wait_for(lambda: (i := vm.qmp.execute("query-dirty-rate"))["status"] == "measured" and i, 15,
                                "a dirty rate", interval=0.1)
                rows.append({"set_mib_s": rate, "mode": mode, "estimate_mib_s": info["dirty-rate"],
                             "error_pct": round(100 * (info["dirty-rate"] - rate) / rate, 1)})
            vm.close()
    return rows


def dirty_limits(workdir: Path) -> list[dict]:
    rows = []
    for quota in (50, 100):
        vm = start_vm(workdir, f"limit{quota}", "--accel", "kvm,dirty-ring-size=4096", "-m", "256M",
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
    dst = start_vm(workdir, "conv-dst", "--accel", "kvm", "-m", "512M", "--guest", guest,
                   "--incoming", "tcp:127.0.0.1:0")
    src = start_vm(workdir, "conv-src", "--accel", "kvm", "-m", "512M", "--guest", guest)
    port = dst.qmp.execute("query-migrate")["socket-address"][0]["port"]
    src.qmp.execute("migrate-set-parameters", {"max-bandwidth": bandwidth * MIB, "downtime-limit": 300})
    time.sleep(1.0)
    src.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    info = src.wait_migration({"completed", "failed"}, timeout=120)
    result = {"guest_mib_s": rate, "max_bandwidth_mib_s": bandwidth, "downtime_limit_ms": 300,
              "status": info["status"], "total_time_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
              "passes": info.get("ram", {}).get("dirty-sync-count")}
    src.close()
    dst.close()
    return result


def guest_counter(ram: Path) -> int:
    """The stress program's step counter, from the header page of its RAM file."""
    return int(np.fromfile(ram, dtype=np.uint64, count=2)[1])


#: Side-by-side scenarios: the guest's dirty rate and the link (MiB/s), and the source's capabilities.
SCENARIOS = {
    "half-bandwidth": {"rate": 128, "bandwidth": 256, "caps": {}},
    "auto-converge": {"rate": 256, "bandwidth": 128, "caps": {"auto-converge": True}},
}


def side_by_side(workdir: Path, runs: int = 3) -> list[dict]:
    size = 512 * MIB
    rows = []
    for scenario, spec in SCENARIOS.items():
        text = f"stress:rate={spec['rate']},wss=256M,tick=0"
        guest = GuestSpec.parse(text)
        for run in range(runs):
            for impl in ("vmigrate", "qemu") if run % 2 == 0 else ("qemu", "vmigrate"):
                src_ram, dst_ram = workdir / "src.ram", workdir / "dst.ram"
                if impl == "qemu":
                    pc.prepare(src_ram, size, guest)
                    pc.prepare(dst_ram, size, guest)
                    src = start_qemu_pc(workdir, "sbs-src", src_ram, size)
                    dst = start_qemu_pc(workdir, "sbs-dst", dst_ram, size, "-incoming", "tcp:127.0.0.1:0")
                else:
                    common = ("--accel", "kvm", "-m", "512M", "--guest", text)
                    src = start_vm(workdir, "sbs-src", *common, "--mem-path", str(src_ram))
                    dst = start_vm(workdir, "sbs-dst", *common, "--mem-path", str(dst_ram),
                             "--incoming", "tcp:127.0.0.1:0")
                rows.append({"scenario": scenario, "impl": impl, "run": run,
                             **migrate_once(src, dst, spec, src_ram, dst_ram)})
                src.close()
                dst.close()
                src_ram.unlink()
                dst_ram.unlink()
    return rows


def migrate_once(src: VMProcess, dst: VMProcess, spec: dict, src_ram: Path, dst_ram: Path) -> dict:
    port = dst.qmp.execute("query-migrate")["socket-address"][0]["port"]
    if spec["caps"]:
        src.qmp.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": c, "state": v} for c, v in spec["caps"].items()]})
    src.qmp.execute("migrate-set-parameters", {"max-bandwidth": spec["bandwidth"] * MIB, "downtime-limit": 300})
    time.sleep(1.0)
    src.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    throttle = 0

    def finished() -> dict | None:
        nonlocal throttle
        info = src.qmp.execute("query-migrate")
        throttle = max(throttle, info.get("cpu-throttle-percentage", 0))
        return info if info["status"] in ("completed", "failed") else None

    info = wait_for(finished, 180, "the migration", interval=0.1)
    at_switchover = guest_counter(src_ram)
    time.sleep(0.5)
    return {"status": info["status"], "total_time_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
            "passes": info.get("ram", {}).get("dirty-sync-count"), "max_throttle_pct": throttle,
            "transferred_mib": round(info.get("ram", {}).get("transferred", 0) / MIB, 1),
            "guest_runs_on_destination": guest_counter(dst_ram) > at_switchover}


def summary(rows: list[dict]) -> dict:
    """Per scenario, medians per implementation and their ratios, vmigrate / QEMU."""
    out = {}
    for scenario in SCENARIOS:
        runs = [r for r in rows if r["scenario"] == scenario]
        out[scenario] = {}
        for key in ("total_time_ms", "downtime_ms", "passes", "max_throttle_pct"):
            med = {impl: statistics.median(r[key] for r in runs if r["impl"] == impl) for impl in ("vmigrate", "qemu")}
            out[scenario][key] = {**med, "ratio": round(med["vmigrate"] / med["qemu"], 2) if med["qemu"] else None}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--only", choices=("dirty-rate", "dirty-limit", "convergence", "side-by-side"),
                        help="one part only")
    args = parser.parse_args()
    parts = {"dirty-rate": dirty_rate_estimates, "dirty-limit": dirty_limits, "convergence": convergence,
             "side-by-side": side_by_side}
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="vmigrate-kvm-bench-", dir=shm if shm.is_dir() else None) as tmp:
        workdir = Path(tmp)
        figures = {name.replace("-", "_"): run(workdir) for name, run in parts.items()
                   if args.only in (None, name)}
    if "side_by_side" in figures:
        figures["side_by_side_summary"] = summary(figures["side_by_side"])
    print(json.dumps(figures, indent=1))
    if args.json:
        out = Path(args.json)
        # One part re-measured replaces its figures and keeps the others'.
        kept = json.loads(out.read_text()) if args.only and out.exists() else {}
        out.write_text(json.dumps(kept | figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
