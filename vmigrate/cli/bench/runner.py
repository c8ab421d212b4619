"""One benchmark run: a source and a destination VM started, migrated, measured, verified, stopped."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vmigrate.cli.bench.images import verify
from vmigrate.cli.bench.memwatch import MemWatch
from vmigrate.cli.bench.profile import start_profiler, stop_profiler
from vmigrate.cli.bench.report import describe
from vmigrate.cli.main import CLIError
from vmigrate.harness.launcher import VMProcess, VMStartError, qemu_argv, vmigrate_argv
from vmigrate.harness.migrate import FINAL, MigrationRun, event_time, wait_migration_event
from vmigrate.qmp.client import QMPClient, QMPClientError


IMPLS = ("vmigrate", "qemu")
#: 4 EiB/s: a u64 both accept; both limit a 100 ms window to value/10 bytes only when exceeded.
UNLIMITED_BANDWIDTH = 1 << 62
START_TIMEOUT = 30.0
SAMPLE_INTERVAL = 0.25


@dataclass
class RunSpec:
    """What one migration runs with."""

    impl: str
    scenario: str
    size: int
    caps: tuple[str, ...] = ()
    params: dict | None = None
    dirty_rate: int = 0
    wss: int = 0
    timeout: float = 300.0
    #: vmigrate's vCPU backend: soft by default, the same machine as QEMU's ``-M none`` here.
    accel: str = "soft"
    #: More command-line arguments per role (``src``/``dst``), e.g. benchmarks/tls.py's credentials.
    extra_args: dict[str, tuple[str, ...]] | None = None

    @property
    def guest(self) -> str:
        return "idle" if not self.dirty_rate else f"stress:rate={self.dirty_rate},wss={self.wss >> 20}M"

    def record(self, **fields) -> dict:
        base = {"impl": self.impl, "scenario": self.scenario, "dirty_rate_mib_s": self.dirty_rate,
                "size_bytes": self.size, "status": "", "verified": None, "note": ""}
        return base | fields


def start_vm(spec: RunSpec, role: str, ram_file: Path, workdir: Path, logdir: Path) -> VMProcess:
    """One VM of a run; a destination waits (``defer``) and stays paused after the load (``-S``)."""
    sock = workdir / f"{spec.impl}-{role}.qmp"
    extra = (spec.extra_args or {}).get(role, ())
    memory = f"{spec.size >> 20}M"
    if spec.impl == "vmigrate":
        incoming = ["--incoming", "defer", "-S"] if role == "dst" else []
        argv = vmigrate_argv(sock, "-m", memory, "--mem-path", str(ram_file), "--guest", spec.guest,
                             "--accel", spec.accel, *incoming, *extra)
    else:
        incoming = ["-incoming", "defer", "-S"] if role == "dst" else []
        argv = qemu_argv(sock, *incoming, *extra, memory=memory, mem_path=ram_file)
    try:
        return VMProcess(argv, sock, logdir / f"{spec.impl}-{role}.log", start_timeout=START_TIMEOUT, qmp_timeout=60.0)
    except VMStartError as err:
        raise CLIError(f"{spec.impl} {role} VM did not start; see {err.log_path}") from None


def migrate_once(spec: RunSpec, src_ram: Path, workdir: Path, logdir: Path, profile_dir: Path | None = None) -> dict:
    """Start a source and a destination, migrate, measure, verify RAM, stop both; one record."""
    dst_ram = workdir / f"{spec.impl}-dst.ram"
    try:
        rec = measure(spec, src_ram, dst_ram, workdir, logdir, profile_dir)
        if rec["status"] == "completed" and rec.get("destination_status") == "completed":
            verify(rec, src_ram, dst_ram)
        return rec
    finally:
        dst_ram.unlink(missing_ok=True)


def warm_up(spec: RunSpec, src_ram: Path, workdir: Path, logdir: Path, console) -> None:
    """One migration whose record is not kept: the first destination after the RAM image was
    written allocates host memory the outer host has not backed yet, at a fraction of the
    speed of the runs after it (docs/benchmarks.md, "Fresh host memory")."""
    console.print(f"  warm-up, not recorded: {describe(migrate_once(spec, src_ram, workdir, logdir))}")


def measure(spec: RunSpec, src_ram: Path, dst_ram: Path, workdir: Path, logdir: Path,
            profile_dir: Path | None) -> dict:
    rec = spec.record(loadavg_1m=os.getloadavg()[0])
    vms: list[VMProcess] = []
    profilers: list[subprocess.Popen] = []
    watch: MemWatch | None = None
    try:
        dst = start_vm(spec, "dst", dst_ram, workdir, logdir)
        vms.append(dst)
        src = start_vm(spec, "src", src_ram, workdir, logdir)
        vms.append(src)
        watch = MemWatch({"src": src.pid, "dst": dst.pid}).start()
        mig = MigrationRun(src.qmp, "tcp:127.0.0.1:0", dst.qmp)
        params = {"max-bandwidth": UNLIMITED_BANDWIDTH} | (spec.params or {})
        try:
            mig.prepare([{"capability": c, "state": True} for c in spec.caps], params)
            rec["max_bandwidth_readback"] = src.qmp.execute("query-migrate-parameters").get("max-bandwidth")
        except QMPClientError as err:
            return rec | {"status": "not implemented" if "not implement" in err.desc else "error", "note": err.desc}
        if profile_dir is not None:
            profilers = [start_profiler(vm.pid, profile_dir / f"{role}.txt") for role, vm in (("src", src), ("dst", dst))]
        try:
            t0 = time.time()
            mig.start()
        except QMPClientError as err:
            return rec | {"status": "not implemented" if "not implement" in err.desc else "error", "note": err.desc}
        try:
            rec |= follow_and_collect(mig, dst.qmp, t0, spec.timeout)
        except (QMPClientError, OSError) as err:
            return rec | {"status": "error", "note": f"lost the VMs mid-run: {err}; see {logdir}"}
        if rec["total_time_ms"]:
            rec["guest_mib_s"] = round(spec.size / (1 << 20) / (rec["total_time_ms"] / 1000), 1)
        for profiler in profilers:
            stop_profiler(profiler)
        for role, peak in watch.stop().items():
            rec |= {f"{role}_peak_rss": peak["VmHWM"], f"{role}_peak_anon": peak["RssAnon"],
                    f"{role}_peak_file": peak["RssFile"], f"{role}_peak_shmem": peak["RssShmem"],
                    f"{role}_workers_peak_rss": watch.children_peak[role]}
    finally:
        if watch is not None:
            watch.stop()
        for profiler in profilers:
            stop_profiler(profiler)
        for vm in reversed(vms):
            vm.close()
    return rec


def follow_and_collect(mig: MigrationRun, dst: QMPClient, t0: float, timeout: float) -> dict:
    """Follow a started migration to its end; its figures as record fields.

    Wall times come from the ``MIGRATION`` events' own timestamps (host clock,
    like *t0*), so the 250 ms polling does not blur them.
    """
    try:
        timed_out = mig.wait(timeout, SAMPLE_INTERVAL)
    except TimeoutError as err:
        raise CLIError(str(err)) from None
    mig.settle_final()
    src_end = wait_migration_event(mig.src, FINAL, 5.0)
    dst_end = None
    if mig.final.get("status") == "completed":
        dst_end = wait_migration_event(dst, {"completed", "failed"}, 60.0)
        mig.dest_status = dst_end["data"]["status"] if dst_end else dst.execute("query-migrate").get("status")
    summary = mig.summary()
    return {
        "status": "timeout" if timed_out else summary["status"],
        "destination_status": summary["destination-status"],
        "total_time_ms": summary["total-time-ms"],
        "setup_time_ms": summary["setup-time-ms"],
        "downtime_ms": summary["downtime-ms"],
        "src_wall_s": round(event_time(src_end) - t0, 4) if src_end else None,
        "wall_s": round(event_time(dst_end) - t0, 4) if dst_end else None,
        "transferred_bytes": summary["transferred-bytes"],
        "normal_pages": summary["normal-pages"],
        "zero_pages": summary["zero-pages"],
        "passes": summary["passes"],
        "mbps": summary["mbps"],
        "note": summary["error-desc"] or ("cancelled after --timeout" if timed_out else ""),
        "samples": [s.__dict__ for s in mig.samples],
    }
