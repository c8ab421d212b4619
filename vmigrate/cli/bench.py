"""``vmigrate bench``: vmigrate and QEMU 7.2 migrating the same memory, side by side.

Both implementations get byte-identical guest RAM (a file on ``/dev/shm``),
the same QMP commands through :class:`~vmigrate.cli.migrate.MigrationRun`,
tcp loopback and a bandwidth limit that never binds, so the only variable
is the implementation.  Every run ends with a hash of the destination's RAM
against the source's: a fast but wrong migration is reported as wrong, not
as fast.  The host is shared and small, so what these numbers support is
*ratios* measured in the same invocation, not absolute speeds.

``precopy`` is the headline comparison (plus the ceiling: how fast two
Python processes can move the same bytes over loopback at all);
``matrix`` runs the scenario × implementation × dirty-rate grid of QEMU's
guestperf, recording scenarios vmigrate does not implement and dirty rates
QEMU cannot produce (``-M none`` has no vCPU) as rows of their own.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vmigrate.cli.main import CLIError
from vmigrate.cli.migrate import FINAL, MigrationRun, human_bytes, parse_params
from vmigrate.machine.memory import PAGE_SIZE, parse_size
from vmigrate.qmp.client import QMPClient, QMPClientError

IMPLS = ("vmigrate", "qemu")
QEMU = "qemu-system-x86_64"
#: 4 EiB/s: a u64 both accept; both limit a 100 ms window to value/10 bytes only when exceeded.
UNLIMITED_BANDWIDTH = 1 << 62
#: capabilities and parameters of each guestperf-style scenario.
SCENARIOS: dict[str, tuple[tuple[str, ...], dict]] = {
    "precopy": ((), {}),
    "xbzrle": (("xbzrle",), {}),
    "compress": (("compress",), {}),
    "multifd-none": (("multifd",), {"multifd-compression": "none"}),
    "multifd-zlib": (("multifd",), {"multifd-compression": "zlib"}),
    "multifd-zstd": (("multifd",), {"multifd-compression": "zstd"}),
    "auto-converge": (("auto-converge",), {}),
}
NO_VCPU = "QEMU -M none has no vCPU, so nothing can dirty its RAM"
#: wire bytes of one page record: be64 address|flags, then 4096 data bytes or 1 fill byte.
RECORD_HEADER = 8
SPACE_MARGIN = 64 << 20
START_TIMEOUT = 30.0
SAMPLE_INTERVAL = 0.25


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark vmigrate against QEMU 7.2 (precopy, scenario matrix)")
    kinds = p.add_subparsers(dest="bench_kind", required=True, metavar="KIND")

    def common(q: argparse.ArgumentParser, size: str, out: str) -> None:
        q.add_argument("--size", default=size, help=f"guest RAM, a multiple of 1 MiB (default {size})")
        q.add_argument("--zero-fraction", type=float, default=0.0,
                       help="share of zero pages in guest RAM, the rest random (default 0)")
        q.add_argument("--impl", default=",".join(IMPLS), help="implementations to run (default vmigrate,qemu)")
        q.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="extra migration parameter for both implementations")
        q.add_argument("--out", default=out, help=f"directory for JSON, CSV, plot and logs (default {out})")
        q.add_argument("--shm-dir", default="/dev/shm", help="where RAM files live (default /dev/shm)")
        q.add_argument("--timeout", type=float, default=300.0, help="cancel a migration after this many seconds")
        q.add_argument("--seed", type=int, default=1, help="seed of the guest RAM contents")
        q.add_argument("--accel", choices=("soft", "kvm"), default="soft",
                       help="vmigrate's vCPU backend (default soft: the -M none machine QEMU runs here)")

    pre = kinds.add_parser("precopy", help="idle guest, unlimited bandwidth: vmigrate vs QEMU vs Python ceiling")
    common(pre, "4G", "bench-results/precopy")
    pre.add_argument("--repeat", type=int, default=1, help="runs per implementation (medians are reported)")
    pre.add_argument("--profile", action="store_true",
                     help="after the timed runs, one more vmigrate run sampled with py-spy (not timed)")
    mat = kinds.add_parser("matrix", help="scenario x implementation x guest dirty rate, like QEMU's guestperf")
    common(mat, "1G", "bench-results/matrix")
    mat.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"subset of {','.join(SCENARIOS)}")
    mat.add_argument("--dirty-rates", default="0,64,256", help="guest dirty rates in MiB/s (default 0,64,256)")
    mat.add_argument("--wss", default="256M", help="working set the dirtying guest cycles through (default 256M)")
    p.set_defaults(func=run)


# -- guest RAM images ------------------------------------------------------


@dataclass
class RamImage:
    path: Path
    size: int
    zero_pages: int
    sha256: str

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def wire_bytes(self) -> int:
        """Bytes of the page records a precopy of this image puts on the wire (both implementations)."""
        normal = self.npages - self.zero_pages
        return normal * (RECORD_HEADER + PAGE_SIZE) + self.zero_pages * (RECORD_HEADER + 1)


def fill_ram_image(path: Path, size: int, zero_fraction: float, seed: int, chunk: int = 64 << 20) -> RamImage:
    """Random pages, with exactly ``round(npages * zero_fraction)`` all-zero pages spread at random."""
    npages = size // PAGE_SIZE
    rng = np.random.default_rng(seed)
    zero = np.zeros(npages, dtype=np.bool_)
    nzero = round(npages * zero_fraction)
    zero[rng.permutation(npages)[:nzero]] = True
    digest = hashlib.sha256()
    pages_per_chunk = chunk // PAGE_SIZE
    with open(path, "wb") as f:
        for first in range(0, npages, pages_per_chunk):
            count = min(pages_per_chunk, npages - first)
            data = rng.integers(0, 256, count * PAGE_SIZE, dtype=np.uint8).reshape(count, PAGE_SIZE)
            data[zero[first : first + count]] = 0
            f.write(memoryview(data).cast("B"))
            digest.update(data)
    return RamImage(path, size, nzero, digest.hexdigest())


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def diff_pages(a: Path, b: Path) -> tuple[int, int | None]:
    """How many pages differ between two RAM files, and the first one (for a failed verification)."""
    x = np.memmap(a, dtype=np.uint8, mode="r")
    y = np.memmap(b, dtype=np.uint8, mode="r")
    if x.size != y.size:
        return max(x.size, y.size) // PAGE_SIZE, 0
    step = 16384 * PAGE_SIZE
    count, first = 0, None
    for off in range(0, x.size, step):
        differs = (x[off : off + step] != y[off : off + step]).reshape(-1, PAGE_SIZE).any(axis=1)
        hits = np.flatnonzero(differs)
        if hits.size and first is None:
            first = off // PAGE_SIZE + int(hits[0])
        count += int(hits.size)
    return count, first


def check_space(directory: Path, need: int, what: str) -> None:
    """Fail before starting if the RAM files cannot fit: tmpfs pages are host RAM too."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    need += SPACE_MARGIN
    if free < need:
        raise CLIError(f"{directory} has {human_bytes(free)} free, {what} needs {human_bytes(need)}")
    avail = meminfo().get("MemAvailable")
    if avail is not None and avail < need:
        raise CLIError(f"host has {human_bytes(avail)} of RAM available, {what} needs {human_bytes(need)}")


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024
    return out


# -- memory of the VM processes --------------------------------------------

MEM_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def read_status(pid: int) -> dict[str, int]:
    """The RSS lines of /proc/PID/status in bytes (empty once the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in MEM_FIELDS:
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


class MemWatch:
    """Peaks of each RSS component per process, sampled in a thread.

    VmHWM is the kernel's own peak of the total; the anon/file/shmem split
    has no kernel peak, so it is sampled (a short spike between samples can
    be missed, VmHWM cannot).  The shared RAM file counts as RssShmem.
    """

    def __init__(self, pids: dict[str, int], interval: float = 0.02) -> None:
        self.pids = pids
        self.interval = interval
        self.peaks: dict[str, dict[str, int]] = {name: dict.fromkeys(MEM_FIELDS, 0) for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memwatch", daemon=True)

    def start(self) -> "MemWatch":
        self._thread.start()
        return self

    def sample(self) -> None:
        for name, pid in self.pids.items():
            peak = self.peaks[name]
            for key, value in read_status(pid).items():
                peak[key] = max(peak[key], value)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> dict[str, dict[str, int]]:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()
        return self.peaks


# -- VM processes ------------------------------------------------------------


def vm_argv(impl: str, sock: Path, ram_file: Path, size: int, incoming: bool, guest: str,
            accel: str = "soft") -> list[str]:
    """Command line of one VM; a destination waits (``defer``) and stays paused after the load (``-S``)."""
    mib = f"{size >> 20}M"
    if impl == "vmigrate":
        argv = [sys.executable, "-m", "vmigrate", "run", "--qmp", f"unix:{sock}", "-m", mib,
                "--mem-path", str(ram_file), "--guest", guest, "--accel", accel]
        return argv + (["--incoming", "defer", "-S"] if incoming else [])
    argv = [QEMU, "-nic", "none", "-display", "none", "-M", "none,memory-backend=ram0",
            "-object", f"memory-backend-file,id=ram0,size={mib},mem-path={ram_file},share=on",
            "-m", mib, "-qmp", f"unix:{sock},server=on,wait=off"]
    return argv + (["-incoming", "defer", "-S"] if incoming else [])


class BenchVM:
    """One VM process (vmigrate or QEMU) and its QMP client."""

    def __init__(self, impl: str, role: str, sockdir: Path, logdir: Path, ram_file: Path, size: int,
                 *, incoming: bool, guest: str = "idle", accel: str = "soft") -> None:
        self.impl, self.role = impl, role
        sock = sockdir / f"{impl}-{role}.qmp"
        self.log_path = logdir / f"{impl}-{role}.log"
        self._log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(vm_argv(impl, sock, ram_file, size, incoming, guest, accel),
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise CLIError(f"{impl} {role} VM did not start; see {self.log_path}")
            time.sleep(0.02)
        self.qmp = QMPClient(str(sock), timeout=60.0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None and hasattr(self, "qmp"):
            try:
                self.qmp.execute("quit")
            except (QMPClientError, OSError):
                pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        if hasattr(self, "qmp"):
            self.qmp.close()
        self._log.close()


# -- one migration -----------------------------------------------------------


def wait_migration_event(client: QMPClient, statuses: set[str], timeout: float) -> dict | None:
    """The first ``MIGRATION`` event with a status in *statuses* (its timestamp is the emitter's clock)."""
    deadline = time.monotonic() + timeout
    while True:
        for event in client.poll_events(max(0.0, min(0.2, deadline - time.monotonic()))):
            if event.get("event") == "MIGRATION" and event["data"]["status"] in statuses:
                return event
        if time.monotonic() >= deadline:
            return None


def event_time(event: dict | None) -> float | None:
    if event is None:
        return None
    ts = event["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


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

    @property
    def guest(self) -> str:
        return "idle" if not self.dirty_rate else f"stress:rate={self.dirty_rate},wss={self.wss >> 20}M"

    def record(self, **fields) -> dict:
        base = {"impl": self.impl, "scenario": self.scenario, "dirty_rate_mib_s": self.dirty_rate,
                "size_bytes": self.size, "status": "", "verified": None, "note": ""}
        return base | fields


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


def measure(spec: RunSpec, src_ram: Path, dst_ram: Path, workdir: Path, logdir: Path,
            profile_dir: Path | None) -> dict:
    rec = spec.record(loadavg_1m=os.getloadavg()[0])
    vms: list[BenchVM] = []
    profilers: list[subprocess.Popen] = []
    watch: MemWatch | None = None
    try:
        dst = BenchVM(spec.impl, "dst", workdir, logdir, dst_ram, spec.size, incoming=True, guest=spec.guest,
                      accel=spec.accel)
        vms.append(dst)
        src = BenchVM(spec.impl, "src", workdir, logdir, src_ram, spec.size, incoming=False, guest=spec.guest,
                      accel=spec.accel)
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
            profilers = [start_profiler(vm.pid, profile_dir / f"{vm.role}.txt") for vm in (src, dst)]
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
                    f"{role}_peak_file": peak["RssFile"], f"{role}_peak_shmem": peak["RssShmem"]}
    finally:
        if watch is not None:
            watch.stop()
        for profiler in profilers:
            stop_profiler(profiler)
        for vm in reversed(vms):
            vm.stop()
    return rec


def follow_and_collect(mig: MigrationRun, dst: QMPClient, t0: float, timeout: float) -> dict:
    """Follow a started migration to its end; its figures as record fields.

    Wall times come from the ``MIGRATION`` events' own timestamps (host clock,
    like *t0*), so the 250 ms polling does not blur them.
    """
    timed_out = follow_quietly(mig, timeout)
    settle_final(mig)
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


def follow_quietly(mig: MigrationRun, timeout: float) -> bool:
    """Sample ``query-migrate`` until the source ends; True if it had to be cancelled."""
    deadline = time.monotonic() + timeout
    cancel_deadline = None
    while mig.sample().status not in FINAL:
        now = time.monotonic()
        if cancel_deadline is None and now > deadline:
            mig.cancel()
            cancel_deadline = now + 30
        elif cancel_deadline is not None and now > cancel_deadline:
            raise CLIError("a migration did not stop within 30 s of migrate_cancel")
        time.sleep(SAMPLE_INTERVAL)
    return cancel_deadline is not None


def settle_final(mig: MigrationRun, timeout: float = 5.0) -> None:
    """Re-read a ``completed`` result until its times are filled in.

    QEMU 7.2 sets the state to ``completed`` before it computes total-time
    and downtime (migration_iteration_finish), and vmigrate does the same, so
    a query in between sees both as 0.
    """
    deadline = time.monotonic() + timeout
    while mig.final.get("status") == "completed" and not mig.final.get("total-time"):
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
        mig.final = mig.src.execute("query-migrate")


def verify(rec: dict, src_ram: Path, dst_ram: Path) -> None:
    """Destination RAM must equal source RAM (both frozen: source postmigrate, destination -S)."""
    rec["src_sha256"] = file_sha256(src_ram)
    rec["dst_sha256"] = file_sha256(dst_ram)
    rec["verified"] = rec["src_sha256"] == rec["dst_sha256"]
    if not rec["verified"]:
        count, first = diff_pages(src_ram, dst_ram)
        rec["note"] = f"destination RAM differs from source in {count} pages (first: page {first})"


# -- the ceiling: raw Python loopback ----------------------------------------


def loopback_sender(port: int, nbytes: int, chunk: int) -> None:
    """Child side of :func:`loopback_ceiling`: ``sendall`` of one large buffer until *nbytes* went."""
    buf = memoryview(os.urandom(chunk))
    with socket.create_connection(("127.0.0.1", port)) as s:
        left = nbytes
        while left > 0:
            n = min(chunk, left)
            s.sendall(buf[:n])
            left -= n


def loopback_ceiling(nbytes: int, chunk: int = 8 << 20, timeout: float = 300.0) -> dict:
    """Seconds two Python processes need to move *nbytes* over tcp loopback (``sendall`` → ``recv_into``)."""
    code = f"from vmigrate.cli.bench import loopback_sender; loopback_sender({{}}, {nbytes}, {chunk})"
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(30)
        port = srv.getsockname()[1]
        child = subprocess.Popen([sys.executable, "-c", code.format(port)])
        try:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(timeout)
                view = memoryview(bytearray(chunk))
                got = 0
                t0 = time.perf_counter()
                while got < nbytes:
                    n = conn.recv_into(view)
                    if not n:
                        break
                    got += n
                seconds = time.perf_counter() - t0
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=10)
    status = "completed" if got == nbytes else "failed"
    return {"impl": "ceiling", "scenario": "precopy", "status": status, "bytes": got, "wall_s": round(seconds, 4),
            "mib_s": round(got / (1 << 20) / seconds, 1) if seconds else None}


# -- profiling ----------------------------------------------------------------


def start_profiler(pid: int, path: Path) -> subprocess.Popen:
    """py-spy sampling every thread of a running vmigrate process into collapsed stacks."""
    exe = shutil.which("py-spy")
    if exe is None:
        raise CLIError("--profile needs py-spy (pip install py-spy)")
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "200", "--threads", "--idle",
                             "--nonblocking", "--format", "raw", "--output", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(2)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
#: Threads that move migration data; the other threads of a VM process idle during a benchmark.
DATA_THREADS = ("live_migration", "incoming", "multifd", "compress")


def parse_frame(frame: str) -> tuple[str, str]:
    """``func (path:line)`` → (``func (path)``, ``func (path:line)``)."""
    m = FRAME.match(frame)
    if m is None:
        return frame, frame
    where = f"{m['func']} ({m['file']}"
    return where + ")", where + (f":{m['line']})" if m["line"] else ")")


def summarize_profile(path: Path, thread: str, top: int = 12) -> dict:
    """Self and inclusive share of each function in one thread's samples (py-spy ``raw`` format).

    Shares are of that thread's samples, idle included: a thread blocked in
    ``sendall`` shows up as time spent there, which is the point.
    """
    self_n: dict[str, int] = {}
    line_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = 0
    for row in path.read_text().splitlines():
        stack, _, count = row.rpartition(" ")
        label, _, rest = stack.partition(";")
        if label != thread or not rest:
            continue
        n = int(count)
        total += n
        frames = [parse_frame(f) for f in rest.split(";")]
        leaf_func, leaf_line = frames[-1]
        self_n[leaf_func] = self_n.get(leaf_func, 0) + n
        line_n[leaf_line] = line_n.get(leaf_line, 0) + n
        for func in {func for func, _ in frames if not func.endswith("(threading.py)")}:
            incl_n[func] = incl_n.get(func, 0) + n

    def ranked(counts: dict[str, int]) -> list[list]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [[func, round(100 * n / total, 1)] for func, n in best]

    return {"thread": thread, "samples": total, "self": ranked(self_n) if total else [],
            "self_lines": ranked(line_n) if total else [], "inclusive": ranked(incl_n) if total else []}


def profile_threads(path: Path) -> list[str]:
    """Labels of the threads that move migration data in a py-spy raw file (all threads if none is known)."""
    labels = list(dict.fromkeys(row.partition(";")[0] for row in path.read_text().splitlines() if ";" in row))
    data = [label for label in labels if any(name in label for name in DATA_THREADS)]
    return data or labels


# -- reports -----------------------------------------------------------------


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


def summarize_precopy(records: list[dict], size: int) -> dict:
    """Medians over good runs per implementation, peaks over all runs, and the vmigrate/QEMU ratios."""
    out: dict = {}
    for impl in (*IMPLS, "ceiling"):
        runs = [r for r in records if r["impl"] == impl]
        if not runs:
            continue
        good = [r for r in runs if r["status"] == "completed" and r.get("verified") is not False]
        entry = {"runs": len(runs), "good": len(good),
                 "verified": all(r.get("verified") for r in runs) if impl != "ceiling" else None,
                 "wall_s": median_of(good, "wall_s")}
        if impl != "ceiling":
            for key in ("total_time_ms", "setup_time_ms", "downtime_ms", "transferred_bytes", "guest_mib_s"):
                entry[key] = median_of(good, key)
            for role in ("src", "dst"):
                for part in ("rss", "anon", "file", "shmem"):
                    key = f"{role}_peak_{part}"
                    entry[key] = max((r.get(key) or 0 for r in runs), default=0)
                entry[f"{role}_peak_rss_vs_guest"] = round(entry[f"{role}_peak_rss"] / size, 4)
        else:
            entry["mib_s"] = median_of(good, "mib_s")
            entry["bytes"] = runs[0]["bytes"]
        out[impl] = entry
    v, q, c = out.get("vmigrate", {}), out.get("qemu", {}), out.get("ceiling", {})
    out["ratios"] = {
        "total_time_vmigrate_over_qemu": ratio(v.get("total_time_ms"), q.get("total_time_ms")),
        "wall_vmigrate_over_qemu": ratio(v.get("wall_s"), q.get("wall_s")),
        "wall_vmigrate_over_ceiling": ratio(v.get("wall_s"), c.get("wall_s")),
        "src_peak_rss_vmigrate_over_qemu": ratio(v.get("src_peak_rss"), q.get("src_peak_rss")),
        "dst_peak_rss_vmigrate_over_qemu": ratio(v.get("dst_peak_rss"), q.get("dst_peak_rss")),
    }
    return out


def fmt(value, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{unit}"


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):,.0f}"


def print_precopy(summary: dict, size: int, console) -> None:
    from rich.table import Table

    t = Table(title=f"precopy, {human_bytes(size)} guest RAM, tcp loopback, unlimited bandwidth")
    for col in ("", "runs ok", "RAM equal", "total-time ms", "wall s", "setup ms", "downtime ms",
                "guest MiB/s", "wire MiB"):
        t.add_column(col, justify="right" if col else "left")
    names = {"vmigrate": "vmigrate", "qemu": "QEMU 7.2", "ceiling": "ceiling (Python loopback)"}
    for impl, label in names.items():
        e = summary.get(impl)
        if e is None:
            continue
        if impl == "ceiling":
            t.add_row(label, f"{e['good']}/{e['runs']}", "", "", fmt(e["wall_s"], digits=3), "", "",
                      fmt(e["mib_s"]), mib(e["bytes"]))
            continue
        equal = {True: "[green]yes[/]", False: "[red]NO[/]"}.get(e["verified"], "-")
        t.add_row(label, f"{e['good']}/{e['runs']}", equal, fmt(e["total_time_ms"]), fmt(e["wall_s"], digits=3),
                  fmt(e["setup_time_ms"]), fmt(e["downtime_ms"]), fmt(e["guest_mib_s"]), mib(e["transferred_bytes"]))
    r = summary["ratios"]
    t.add_row("[bold]vmigrate / QEMU[/]", "", "", fmt(r["total_time_vmigrate_over_qemu"], digits=3),
              fmt(r["wall_vmigrate_over_qemu"], digits=3), "", "", "", "")
    t.add_row("[bold]vmigrate / ceiling[/]", "", "", "", fmt(r["wall_vmigrate_over_ceiling"], digits=3),
              "", "", "", "")
    console.print(t)
    m = Table(title="peak memory of each process (MiB; guest RAM is the shared file, counted as shmem)")
    for col in ("process", "peak RSS (VmHWM)", "% of guest RAM", "anon", "file", "shmem"):
        m.add_column(col, justify="right" if col != "process" else "left")
    for impl in IMPLS:
        e = summary.get(impl)
        if e is None:
            continue
        for role, label in (("src", "source"), ("dst", "destination")):
            m.add_row(f"{impl} {label}", mib(e[f"{role}_peak_rss"]), fmt(100 * e[f"{role}_peak_rss_vs_guest"], "%", 1),
                      mib(e[f"{role}_peak_anon"]), mib(e[f"{role}_peak_file"]), mib(e[f"{role}_peak_shmem"]))
    console.print(m)


def plot_precopy(records: list[dict], summary: dict, size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m, ax_p) = plt.subplots(1, 3, figsize=(16, 5))
    labels, walls, totals = [], [], []
    for impl in (*IMPLS, "ceiling"):
        e = summary.get(impl)
        if e is None:
            continue
        labels.append(impl)
        walls.append(e.get("wall_s") or 0)
        totals.append((e.get("total_time_ms") or 0) / 1000)
    x = np.arange(len(labels))
    ax_t.bar(x - 0.2, totals, 0.4, label="query-migrate total-time")
    ax_t.bar(x + 0.2, walls, 0.4, label="wall (migrate → destination completed)")
    ax_t.set_xticks(x, labels)
    ax_t.set_ylabel("seconds")
    ax_t.set_title(f"time to migrate {human_bytes(size)}")
    ax_t.legend(fontsize=8)
    names, parts = [], {k: [] for k in ("anon", "file", "shmem")}
    for impl in IMPLS:
        e = summary.get(impl)
        if e is None:
            continue
        for role in ("src", "dst"):
            names.append(f"{impl}\n{role}")
            for k in parts:
                parts[k].append(e[f"{role}_peak_{k}"] / (1 << 20))
    bottom = np.zeros(len(names))
    for k, values in parts.items():
        ax_m.bar(names, values, bottom=bottom, label=f"peak {k}")
        bottom += np.array(values)
    ax_m.axhline(size / (1 << 20), color="k", ls="--", lw=1, label="guest RAM")
    ax_m.axhline(size * 1.05 / (1 << 20), color="r", ls=":", lw=1, label="guest RAM + 5 %")
    ax_m.set_ylabel("MiB")
    ax_m.set_title("peak RSS components (sampled)")
    ax_m.legend(fontsize=8)
    for impl in IMPLS:
        run_ = next((r for r in records if r["impl"] == impl and r.get("samples")), None)
        if run_ is not None:
            ax_p.plot([s["t"] for s in run_["samples"]], [s["transferred"] / (1 << 20) for s in run_["samples"]],
                      marker=".", label=impl)
    ax_p.set_xlabel("seconds since migrate")
    ax_p.set_ylabel("transferred (MiB)")
    ax_p.set_title("progress (first run)")
    ax_p.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_matrix(records: list[dict], console) -> None:
    from rich.table import Table

    t = Table(title="scenario matrix (times in ms)")
    for col in ("scenario", "dirty MiB/s", "impl", "status", "RAM equal", "total-time", "downtime", "wall s",
                "passes", "wire MiB", "note"):
        t.add_column(col, overflow="fold")
    for r in records:
        equal = {True: "[green]yes[/]", False: "[red]NO[/]"}.get(r.get("verified"), "-")
        t.add_row(r["scenario"], str(r["dirty_rate_mib_s"]), r["impl"], r["status"], equal,
                  fmt(r.get("total_time_ms")), fmt(r.get("downtime_ms")), fmt(r.get("wall_s"), digits=3),
                  fmt(r.get("passes")), mib(r.get("transferred_bytes")), (r.get("note") or "")[:60])
    console.print(t)


def summarize_matrix(records: list[dict]) -> list[dict]:
    """vmigrate/QEMU ratios per (scenario, dirty rate) where both completed."""
    rows = []
    for scenario in dict.fromkeys(r["scenario"] for r in records):
        for rate in dict.fromkeys(r["dirty_rate_mib_s"] for r in records if r["scenario"] == scenario):
            cell = {r["impl"]: r for r in records if r["scenario"] == scenario and r["dirty_rate_mib_s"] == rate}
            v, q = cell.get("vmigrate", {}), cell.get("qemu", {})
            rows.append({"scenario": scenario, "dirty_rate_mib_s": rate,
                         "vmigrate": v.get("status"), "qemu": q.get("status"),
                         "total_time_ratio": ratio(v.get("total_time_ms"), q.get("total_time_ms")),
                         "downtime_ratio": ratio(v.get("downtime_ms"), q.get("downtime_ms"))})
    return rows


def plot_matrix(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in records))
    impls = list(dict.fromkeys(r["impl"] for r in records))
    rates = list(dict.fromkeys(r["dirty_rate_mib_s"] for r in records))
    fig, axes = plt.subplots(2, len(scenarios), figsize=(2.8 * len(scenarios) + 1, 6.5), squeeze=False)
    width = 0.8 / max(1, len(impls))
    short = {"not implemented": "n/i", "n/a": "n/a"}
    for col, scenario in enumerate(scenarios):
        for row, (key, label) in enumerate((("total_time_ms", "total time (s)"), ("downtime_ms", "downtime (ms)"))):
            ax = axes[row][col]
            for i, impl in enumerate(impls):
                for j, rate in enumerate(rates):
                    r = next((r for r in records if (r["scenario"], r["impl"], r["dirty_rate_mib_s"])
                              == (scenario, impl, rate)), None)
                    if r is None:
                        continue
                    xpos = j + (i - (len(impls) - 1) / 2) * width
                    value = r.get(key)
                    if r["status"] == "completed" and value is not None:
                        value = value / 1000 if key == "total_time_ms" else value
                        ax.bar(xpos, value, width, color=f"C{i}", label=impl if j == 0 else None)
                    else:
                        ax.text(xpos, 0.02, short.get(r["status"], r["status"] or "?"), rotation=90, ha="center",
                                va="bottom", fontsize=8, color=f"C{i}", transform=ax.get_xaxis_transform())
            ax.set_xticks(range(len(rates)), [str(r) for r in rates])
            ax.set_xlim(-0.5, len(rates) - 0.5)
            ax.set_ylim(bottom=0)
            if row == 0:
                ax.set_title(scenario)
            else:
                ax.set_xlabel("guest dirty rate (MiB/s)")
            if col == 0:
                ax.set_ylabel(label)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.suptitle("n/i: not implemented by vmigrate yet; n/a: QEMU -M none cannot dirty RAM", fontsize=9)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="upper left", ncol=len(handles), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path)
    plt.close(fig)


# -- the subcommands -----------------------------------------------------------


def parse_common(args: argparse.Namespace) -> tuple[int, list[str], dict]:
    try:
        size = parse_size(args.size)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if size <= 0 or size % (1 << 20):
        raise CLIError(f"--size must be a positive multiple of 1 MiB, not {args.size}")
    if not 0.0 <= args.zero_fraction <= 1.0:
        raise CLIError("--zero-fraction must be between 0 and 1")
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    unknown = set(impls) - set(IMPLS)
    if unknown or not impls:
        raise CLIError(f"--impl takes a subset of {','.join(IMPLS)}, not '{args.impl}'")
    if "qemu" in impls and shutil.which(QEMU) is None:
        raise CLIError(f"{QEMU} is not installed (or use --impl vmigrate)")
    if not Path(args.shm_dir).is_dir():
        raise CLIError(f"--shm-dir {args.shm_dir} is not a directory")
    return size, impls, parse_params(args.param)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    size, impls, params = parse_common(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logdir = out / "logs"
    logdir.mkdir(exist_ok=True)
    if args.bench_kind == "precopy":
        return run_precopy(args, size, impls, params, out, logdir, console)
    return run_matrix(args, size, impls, params, out, logdir, console)


def run_precopy(args, size: int, impls: list[str], params: dict, out: Path, logdir: Path, console) -> int:
    if args.repeat < 1:
        raise CLIError("--repeat must be at least 1")
    check_space(Path(args.shm_dir), 2 * size, f"a {human_bytes(size)} benchmark (source + destination RAM)")
    records: list[dict] = []
    profile: dict = {}
    workdir = Path(tempfile.mkdtemp(prefix="vmigrate-bench-", dir=args.shm_dir))
    try:
        console.print(f"filling {human_bytes(size)} of guest RAM ({args.zero_fraction:.0%} zero pages) "
                      f"in {workdir} ...")
        image = fill_ram_image(workdir / "src.ram", size, args.zero_fraction, args.seed)
        for rep in range(args.repeat):
            # Alternate the order: what is left of the host's state favours neither.
            for impl in impls if rep % 2 == 0 else impls[::-1]:
                spec = RunSpec(impl, "precopy", size, params=params, timeout=args.timeout, accel=args.accel)
                rec = migrate_once(spec, image.path, workdir, logdir) | {"rep": rep}
                records.append(rec)
                console.print(f"  run {rep + 1}/{args.repeat} {impl}: {describe(rec)}")
            ceiling = loopback_ceiling(image.wire_bytes, timeout=args.timeout) | {"rep": rep}
            records.append(ceiling)
            console.print(f"  run {rep + 1}/{args.repeat} Python loopback ceiling: {ceiling['wall_s']:.3f} s "
                          f"for {human_bytes(ceiling['bytes'])}")
        if args.profile:
            profile = run_profile(image, size, params, args.timeout, workdir, logdir, out, console)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize_precopy(records, size) | ({"profile": profile} if profile else {})
    config = {"size": size, "zero_fraction": args.zero_fraction, "repeat": args.repeat, "impls": impls,
              "params": {"max-bandwidth": UNLIMITED_BANDWIDTH} | params, "seed": args.seed,
              "zero_pages": image.zero_pages, "shm_dir": args.shm_dir}
    write_outputs(out, "precopy", config, records, summary)
    plot_precopy(records, summary, size, out / "precopy.png")
    print_precopy(summary, size, console)
    console.print(f"written: {out / 'precopy.json'}, {out / 'precopy.csv'}, {out / 'precopy.png'}")
    return report_failures(records)


def describe(rec: dict) -> str:
    """One progress line for a finished run."""
    if rec["status"] != "completed":
        return f"{rec['status']}: {rec.get('note') or 'see logs'}"
    return (f"completed, total-time {fmt(rec.get('total_time_ms'))} ms, downtime {fmt(rec.get('downtime_ms'))} ms, "
            f"wall {fmt(rec.get('wall_s'), digits=3)} s, RAM equal: {rec.get('verified')}"
            + (f" ({rec['note']})" if rec.get("note") else ""))


def run_profile(image: RamImage, size: int, params: dict, timeout: float, workdir: Path, logdir: Path,
                out: Path, console) -> dict:
    """One extra vmigrate run under py-spy; the hot spots of the migration threads."""
    prof_dir = out / "profile"
    prof_dir.mkdir(exist_ok=True)
    console.print("  profiling one more vmigrate run with py-spy (not timed) ...")
    rec = migrate_once(RunSpec("vmigrate", "precopy", size, params=params, timeout=timeout),
                       image.path, workdir, logdir, profile_dir=prof_dir)
    result: dict = {"status": rec["status"], "total_time_ms": rec.get("total_time_ms")}
    for role in ("src", "dst"):
        path = prof_dir / f"{role}.txt"
        if not path.exists() or not path.stat().st_size:
            result[role] = "py-spy wrote nothing (ptrace not permitted?)"
            continue
        result[role] = [summarize_profile(path, label) for label in profile_threads(path)]
    (prof_dir / "summary.json").write_text(json.dumps(result, indent=1))
    print_profile(result, console)
    return result


def print_profile(result: dict, console) -> None:
    from rich.table import Table

    for role in ("src", "dst"):
        threads = result.get(role)
        if isinstance(threads, str):
            console.print(f"{role}: {threads}")
            continue
        for th in threads or []:
            t = Table(title=f"vmigrate {role}, {th['thread']}: share of {th['samples']} samples")
            for col in ("self (function)", "%", "self (line)", "%", "inclusive", "%"):
                t.add_column(col, justify="right" if col == "%" else "left", overflow="fold")
            for a, b, c in zip(th["self"][:10], th["self_lines"][:10], th["inclusive"][:10]):
                t.add_row(a[0], str(a[1]), b[0], str(b[1]), c[0], str(c[1]))
            console.print(t)


def run_matrix(args, size: int, impls: list[str], params: dict, out: Path, logdir: Path, console) -> int:
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or not scenarios:
        raise CLIError(f"unknown scenario '{','.join(unknown)}' (choose from {','.join(SCENARIOS)})")
    try:
        rates = [int(r) for r in args.dirty_rates.split(",") if r.strip()]
        wss = parse_size(args.wss)
    except ValueError:
        raise CLIError(f"invalid --dirty-rates '{args.dirty_rates}' or --wss '{args.wss}'") from None
    if not rates or min(rates) < 0:
        raise CLIError("--dirty-rates must be non-negative integers (MiB/s)")
    dirtying = "vmigrate" in impls and any(rates)
    check_space(Path(args.shm_dir), (3 if dirtying else 2) * size,
                f"a {human_bytes(size)} matrix (pristine, {'dirtied source, ' if dirtying else ''}destination RAM)")
    records: list[dict] = []
    workdir = Path(tempfile.mkdtemp(prefix="vmigrate-bench-", dir=args.shm_dir))
    try:
        console.print(f"filling {human_bytes(size)} of guest RAM ({args.zero_fraction:.0%} zero pages) ...")
        image = fill_ram_image(workdir / "pristine.ram", size, args.zero_fraction, args.seed)
        for index, scenario in enumerate(scenarios):
            caps, scenario_params = SCENARIOS[scenario]
            for rate in rates:
                # Alternate which implementation meets the host's colder memory first (docs/benchmarks.md).
                for impl in impls if index % 2 == 0 else impls[::-1]:
                    spec = RunSpec(impl, scenario, size, caps, scenario_params | params, rate, wss, args.timeout,
                                   args.accel)
                    if impl == "qemu" and rate:
                        rec = spec.record(status="n/a", note=NO_VCPU)
                    else:
                        src_ram = image.path
                        if rate:
                            src_ram = workdir / "src.ram"
                            shutil.copyfile(image.path, src_ram)
                        rec = migrate_once(spec, src_ram, workdir, logdir)
                        if src_ram != image.path:
                            src_ram.unlink(missing_ok=True)
                    records.append(rec)
                    console.print(f"  {scenario:14} {impl:8} {rate:4} MiB/s: {describe(rec)}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    config = {"size": size, "zero_fraction": args.zero_fraction, "scenarios": scenarios, "impls": impls,
              "dirty_rates_mib_s": rates, "wss": wss, "params": {"max-bandwidth": UNLIMITED_BANDWIDTH} | params,
              "seed": args.seed, "qemu_dirty_rate_note": NO_VCPU}
    summary = summarize_matrix(records)
    write_outputs(out, "matrix", config, records, {"cells": summary})
    plot_matrix(records, out / "matrix.png")
    print_matrix(records, console)
    console.print(f"written: {out / 'matrix.json'}, {out / 'matrix.csv'}, {out / 'matrix.png'}")
    return report_failures(records)


def report_failures(records: list[dict]) -> int:
    """A wrong migration is a failure of the benchmark, whatever the timings say."""
    wrong = [r for r in records if r.get("verified") is False]
    if wrong:
        raise CLIError(f"destination RAM differs from the source in {len(wrong)} run(s): "
                       + "; ".join(f"{r['impl']} {r['scenario']}: {r['note']}" for r in wrong))
    bad = [r for r in records if r["status"] not in ("completed", "n/a", "not implemented")]
    return 1 if bad else 0
