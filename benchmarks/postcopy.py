#!/usr/bin/env python3
"""Postcopy figures, vmigrate next to QEMU 7.2 on KVM in the same run.

Usage: ``python benchmarks/postcopy.py [--json OUT] [--only latency|dirty-twice] [--repeat N]``

1. **Page-request latency** (docs/qemu/postcopy.md §4-§5): p50 / p99 / max of
   the time from a vCPU's fault reaching the destination's fault thread to the
   page being in place (UFFDIO_COPY done), with and without postcopy-preempt
   (§7).  Both destinations run the x86 ``ab`` program under KVM (vmigrate
   ``--accel kvm``; QEMU a PC booted by our firmware, vmigrate/machine/x86guest/pc.py),
   so the faults come from a real vCPU on both.  vmigrate reports the figure
   itself (``x-vmigrate-page-latency`` of the destination's ``query-migrate``);
   QEMU has no such member, so its destination logs two trace points with
   wall-clock timestamps (``-msg timestamp=on``, log backend):
   ``postcopy_ram_fault_thread_request`` (the fault thread read the fault) and
   ``postcopy_place_page`` (after UFFDIO_COPY) / ``postcopy_place_page_zero``
   (before UFFDIO_ZEROPAGE), paired per page as vmigrate pairs them: the first
   request of a page not yet placed with that page's next placement.
2. **A guest dirtying at twice the link rate** (``stress`` at 64 MiB/s, 32 MiB/s
   link): (a) precopy with auto-converge under a time cap, (b) postcopy switched
   once the second dirty sync began (one full pass sent), (c) the client,
   ``vmigrate migrate --postcopy auto --max-precopy 5``.  Total time and downtime
   from ``query-migrate``, and, because QEMU 7.2's postcopy ``downtime`` is not
   the guest's pause (§8: it is measured up to the end of the whole migration),
   the source's STOP event to the destination's RESUME event from QMP event
   timestamps, for both implementations.
3. Ratios vmigrate / QEMU of the medians.

Source and destination are always the same implementation; the link is tcp
loopback limited by ``max-bandwidth`` / ``max-postcopy-bandwidth``.  Needs
/dev/kvm, userfaultfd on /dev/shm and qemu-system-x86_64 7.2.  Not a test: it
reports figures (the table on stdout, the JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from vmigrate.harness.launcher import QEMU, VMProcess, qemu_argv, qmp_monitor, vmigrate_argv
from vmigrate.harness.migrate import event_time
from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import GuestSpec, read_header
from vmigrate.machine.x86guest import pc

log = logging.getLogger("postcopy-bench")

MIB = 1 << 20
PAGE = 4096
IMPLS = ("vmigrate", "qemu")
#: Guest RAM of every run: small enough for two runs side by side on a 2-core host.
SIZE = 128 * MIB
#: The link (MiB/s), precopy and postcopy alike: slow enough that the destination's vCPU faults.
LINK = 32
#: ``ab`` rewrites byte 0 of every page of its window without pause (a PC has no sleep hypercall).
LATENCY_GUEST = "ab:end=64M,sleep=0"
#: Precopy time before ``migrate-start-postcopy`` in the latency runs (s): a part of RAM is there, most is not.
LATENCY_PRECOPY_S = 1.0
#: Twice the link rate over a working set one precopy pass at LINK sends in about a second.
DIRTY_GUEST = f"stress:rate={2 * LINK},wss=32M,tick=0"
#: Cap of the auto-converge run (s): past it the migration is cancelled and recorded as not converged.
AUTO_CONVERGE_CAP_S = 60.0
MODES = ("auto-converge", "postcopy-after-pass", "client-auto")
QEMU_TRACE = ("postcopy_ram_fault_thread_request", "postcopy_place_page", "postcopy_place_page_zero")
FINAL = {"completed", "failed", "cancelled"}


# -- processes -------------------------------------------------------------------------------------------------


class Pair:
    """Source and destination of one implementation, each with its own RAM file on /dev/shm.

    A second QMP socket per side serves the ``vmigrate migrate`` client: a
    QEMU monitor takes one client at a time, so QEMU gets a second monitor;
    a vmigrate VM accepts more connections on the same socket.
    """

    def __init__(self, workdir: Path, impl: str, guest: str, trace: bool = False) -> None:
        self.impl = impl
        self.workdir = workdir
        self.ram = {side: workdir / f"{impl}-{side}.ram" for side in ("src", "dst")}
        self.trace = workdir / f"{impl}-dst.trace" if impl == "qemu" and trace else None
        self.client_sock: dict[str, Path] = {}
        self.events: dict[str, list[dict]] = {"src": [], "dst": []}
        self.vms: dict[str, VMProcess] = {}
        try:
            for side in ("src", "dst"):
                self.vms[side] = self._start(side, guest)
        except BaseException:
            self.close()
            raise

    def _start(self, side: str, guest: str) -> VMProcess:
        sock = self.workdir / f"{self.impl}-{side}.sock"
        incoming = ("-incoming", "tcp:127.0.0.1:0") if side == "dst" else ()
        logfile = self.workdir / f"{self.impl}-{side}.log"
        if self.impl == "vmigrate":
            self.client_sock[side] = sock
            args = ("--accel", "kvm", "-m", f"{SIZE >> 20}M", "--guest", guest, "--mem-path", str(self.ram[side]))
            if incoming:
                args += ("--incoming", "tcp:127.0.0.1:0")
            return VMProcess(vmigrate_argv(sock, *args), sock, logfile)
        pc.prepare(self.ram[side], SIZE, GuestSpec.parse(guest))
        self.client_sock[side] = self.workdir / f"{self.impl}-{side}-client.sock"
        extra = [*qmp_monitor(self.client_sock[side]), *incoming]
        if side == "dst" and self.trace is not None:
            extra += ["-msg", "timestamp=on", "-D", str(self.trace)]
            for name in QEMU_TRACE:
                extra += ["-trace", name]
        return VMProcess(qemu_argv(sock, *extra, memory=f"{SIZE >> 20}M", mem_path=self.ram[side], pc=True),
                         sock, logfile)

    @property
    def src(self) -> VMProcess:
        return self.vms["src"]

    @property
    def dst(self) -> VMProcess:
        return self.vms["dst"]

    def port(self) -> int:
        return self.dst.migrate_status()["socket-address"][0]["port"]

    def collect_events(self) -> None:
        """Move the events each connection has queued into :attr:`events` (STOP/RESUME carry the timing)."""
        for side, vm in self.vms.items():
            self.events[side] += vm.events()

    def stop_to_resume_ms(self) -> float | None:
        """The source's last STOP to the destination's first RESUME, on the host clock (event timestamps).

        The guest's real pause: in postcopy it ends when the destination starts
        the vCPUs (docs/qemu/postcopy.md §3 RUN), not when the last page arrives.
        """
        self.collect_events()
        stops = [e for e in self.events["src"] if e["event"] == "STOP"]
        resumes = [e for e in self.events["dst"] if e["event"] == "RESUME"]
        if not stops or not resumes:
            return None
        return round((event_time(resumes[0]) - event_time(stops[-1])) * 1000, 1)

    def guest_counter(self, side: str) -> int:
        return read_header(str(self.ram[side])) or 0

    def close(self) -> None:
        for vm in self.vms.values():
            vm.close()
        for path in self.ram.values():
            path.unlink(missing_ok=True)


def set_caps(vm: VMProcess, caps: dict[str, bool]) -> None:
    vm.set_caps(events=True, **caps)


def poll_until(pair: Pair, timeout: float, on_info: Callable[[dict], None] = lambda i: None) -> dict:
    """The source's ``query-migrate`` once final (or at *timeout*); every sample goes to *on_info*.

    QEMU 7.2 can show ``total-time`` 0 for a moment after ``completed`` (docs/benchmarks.md,
    Caveats): re-read until the times are filled in.
    """
    deadline = time.monotonic() + timeout
    while True:
        info = pair.src.migrate_status()
        on_info(info)
        pair.collect_events()
        if info["status"] in FINAL or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for _ in range(20):
        if info["status"] != "completed" or info.get("total-time"):
            break
        time.sleep(0.05)
        info = pair.src.migrate_status()
    return info


def guest_runs_on_destination(pair: Pair) -> bool:
    """The guest's step counter moves on the destination after the migration (it runs, not just arrived)."""
    before = pair.guest_counter("dst")
    try:
        wait_for(lambda: pair.guest_counter("dst") > before, 5.0, "the guest on the destination", interval=0.05)
    except TimeoutError:
        return False
    return True


# -- 1. page-request latency ------------------------------------------------------------------------------------

TRACE_LINE = re.compile(r"^\d+@(\d+)\.(\d+):(\w+) (.*)$")


def qemu_trace_latency(trace: Path) -> dict:
    """Fault-to-placement times from QEMU's trace log, paired as vmigrate pairs them.

    A request opens a page (unless the page is placed already or a request
    for it is outstanding: the fault thread sees one fault per vCPU and
    re-fault); the page's next ``postcopy_place_page[_zero]`` closes it.
    Timestamps are gettimeofday() in µs.
    """
    outstanding: dict[int, float] = {}
    placed: set[int] = set()
    times: list[float] = []
    faults = 0
    for line in trace.read_text(errors="replace").splitlines():
        m = TRACE_LINE.match(line)
        if not m:
            continue
        t = int(m[1]) + int(m[2]) / 1e6
        name, args = m[3], m[4]
        if name == "postcopy_ram_fault_thread_request":
            faults += 1
            page = int(re.search(r"HVA=0x([0-9a-f]+)", args)[1], 16) // PAGE
            if page not in placed and page not in outstanding:
                outstanding[page] = t
        elif name in ("postcopy_place_page", "postcopy_place_page_zero"):
            page = int(re.search(r"host=(?:0x)?([0-9a-f]+)", args)[1], 16) // PAGE
            placed.add(page)
            if page in outstanding:
                times.append(t - outstanding.pop(page))
    return {"faults-traced": faults, **latency_figures(times)}


def latency_figures(seconds: list[float]) -> dict:
    """``requests``, ``p50-ms``, ``p99-ms``, ``max-ms``: the shape of ``x-vmigrate-page-latency``."""
    if not seconds:
        return {"requests": 0}
    ms = sorted(s * 1000 for s in seconds)

    def pct(p: float) -> float:  # linear interpolation, as numpy.percentile, which vmigrate uses
        k = (len(ms) - 1) * p / 100
        lo = int(k)
        hi = min(lo + 1, len(ms) - 1)
        return ms[lo] + (ms[hi] - ms[lo]) * (k - lo)

    return {"requests": len(ms), "p50-ms": round(pct(50), 3), "p99-ms": round(pct(99), 3),
            "max-ms": round(ms[-1], 3)}


def page_latency(workdir: Path, impl: str, preempt: bool) -> dict:
    pair = Pair(workdir, impl, LATENCY_GUEST, trace=True)
    try:
        caps = {"postcopy-ram": True} | ({"postcopy-preempt": True} if preempt else {})
        for vm in pair.vms.values():
            set_caps(vm, caps)
        pair.src.cmd("migrate-set-parameters", **{"max-bandwidth": LINK * MIB, "max-postcopy-bandwidth": LINK * MIB})
        wait_for(lambda: pair.guest_counter("src") > 0, 10, "the guest running on the source")
        pair.src.cmd("migrate", uri=f"tcp:127.0.0.1:{pair.port()}")
        time.sleep(LATENCY_PRECOPY_S)
        pair.src.cmd("migrate-start-postcopy")
        latest: dict = {}

        def sample_destination(_: dict) -> None:
            # vmigrate shows the member while it places pages; keep the last one seen.
            member = pair.dst.migrate_status().get("x-vmigrate-page-latency")
            if member is not None:
                latest.update(member)

        info = poll_until(pair, 60, sample_destination)
        wait_for(lambda: pair.dst.migrate_status()["status"] in FINAL, 10, "the destination's end")
        sample_destination({})
        row = {"impl": impl, "preempt": preempt, "status": info["status"],
               "postcopy_requests": info.get("ram", {}).get("postcopy-requests"),
               "total_time_ms": info.get("total-time"), "guest_runs_on_destination": guest_runs_on_destination(pair)}
        if impl == "vmigrate":
            row |= {"source": "x-vmigrate-page-latency", **latest}
        else:
            pair.dst.close()  # flush the trace log
            row |= {"source": "trace " + ",".join(QEMU_TRACE), **qemu_trace_latency(pair.trace)}
        return row
    finally:
        pair.close()


# -- 2. dirtying at twice the link rate -------------------------------------------------------------------------


def dirty_twice(workdir: Path, impl: str, mode: str) -> dict:
    pair = Pair(workdir, impl, DIRTY_GUEST)
    try:
        wait_for(lambda: pair.guest_counter("src") > 0, 10, "the guest running on the source")
        time.sleep(0.5)
        params = {"max-bandwidth": LINK * MIB, "max-postcopy-bandwidth": LINK * MIB}
        throttle = 0
        converged = None
        postcopy_at = None
        if mode == "client-auto":
            info, client = run_client(pair, params)
            client_summary = client
        else:
            client_summary = None
            caps = {"auto-converge": True} if mode == "auto-converge" else {"postcopy-ram": True}
            for vm in pair.vms.values():
                set_caps(vm, caps)
            pair.src.cmd("migrate-set-parameters", **params)
            t0 = time.monotonic()
            pair.src.cmd("migrate", uri=f"tcp:127.0.0.1:{pair.port()}")

            def watch(i: dict) -> None:
                nonlocal throttle, postcopy_at
                throttle = max(throttle, i.get("cpu-throttle-percentage", 0))
                # The second sync starts the second pass: one full pass has been sent (§2).
                if (mode == "postcopy-after-pass" and postcopy_at is None
                        and i.get("ram", {}).get("dirty-sync-count", 0) >= 2):
                    pair.src.cmd("migrate-start-postcopy")
                    postcopy_at = round(time.monotonic() - t0, 2)

            cap = AUTO_CONVERGE_CAP_S if mode == "auto-converge" else 90.0
            info = poll_until(pair, cap, watch)
            if mode == "auto-converge":
                converged = info["status"] == "completed"
                if info["status"] not in FINAL:
                    log.info("%s: auto-converge still %s after %g s: cancelling", impl, info["status"], cap)
                    pair.src.cmd("migrate_cancel")
                    info = pair.src.wait_migration(FINAL, 30) | {"cancelled_after_s": cap}
        ram = info.get("ram", {})
        completed = info["status"] == "completed"
        if completed:
            wait_for(lambda: pair.dst.migrate_status()["status"] in FINAL, 30, "the destination's end")
        row = {"impl": impl, "mode": mode, "status": info["status"], "converged": converged,
               "total_time_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
               "stop_to_resume_ms": pair.stop_to_resume_ms() if completed else None,
               "passes": ram.get("dirty-sync-count"), "max_throttle_pct": throttle or None,
               "postcopy_requests": ram.get("postcopy-requests"),
               "transferred_mib": round(ram.get("transferred", 0) / MIB, 1),
               "postcopy_started_s": postcopy_at,
               "guest_runs_on_destination": guest_runs_on_destination(pair) if completed else None}
        if client_summary is not None:
            row |= {"client_postcopy_start_s": client_summary.get("postcopy-start-s"),
                    "client_exit_status": client_summary.get("exit-status")}
        return row
    finally:
        pair.close()


def run_client(pair: Pair, params: dict) -> tuple[dict, dict]:
    """``vmigrate migrate --postcopy auto --max-precopy 5`` (vmigrate/cli/migrate.py) drives the pair.

    Its ``--json`` records give the summary; the benchmark's own connection
    reads the final ``query-migrate`` and sees the STOP/RESUME events.
    """
    argv = [sys.executable, "-m", "vmigrate", "migrate", "--qmp", str(pair.client_sock["src"]),
            f"tcp:127.0.0.1:{pair.port()}", "--dest-qmp", str(pair.client_sock["dst"]),
            "--postcopy", "auto", "--max-precopy", "5", "--json", "--timeout", "90",
            *(f"--param={k}={v}" for k, v in params.items())]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=150)
    summary: dict = {"exit-status": proc.returncode}
    for line in proc.stdout.splitlines():
        record = json.loads(line) if line.startswith("{") else {}
        summary |= record.get("summary", {})
    if proc.returncode:
        log.warning("%s: vmigrate migrate exited %d: %s", pair.impl, proc.returncode, proc.stderr[-2000:])
    info = pair.src.wait_migration(FINAL, 10)
    for _ in range(20):
        if info["status"] != "completed" or info.get("total-time"):
            break
        time.sleep(0.05)
        info = pair.src.migrate_status()
    pair.collect_events()
    return info, summary


# -- summary and report -----------------------------------------------------------------------------------------


def ratio(v: float | None, q: float | None) -> float | None:
    return round(v / q, 2) if v is not None and q else None


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(latency: list[dict], dirty: list[dict]) -> dict:
    """Medians per implementation and their ratio vmigrate / QEMU, per case and figure."""
    out: dict = {"latency": {}, "dirty_twice": {}}
    for preempt in (False, True):
        case = "preempt" if preempt else "plain"
        rows = [r for r in latency if r["preempt"] == preempt]
        out["latency"][case] = {}
        for key in ("p50-ms", "p99-ms", "max-ms", "requests"):
            med = {impl: median([r for r in rows if r["impl"] == impl], key) for impl in IMPLS}
            out["latency"][case][key] = med | {"ratio": ratio(med["vmigrate"], med["qemu"])}
    for mode in MODES:
        rows = [r for r in dirty if r["mode"] == mode]
        out["dirty_twice"][mode] = {}
        for key in ("total_time_ms", "downtime_ms", "stop_to_resume_ms", "passes"):
            med = {impl: median([r for r in rows if r["impl"] == impl], key) for impl in IMPLS}
            out["dirty_twice"][mode][key] = med | {"ratio": ratio(med["vmigrate"], med["qemu"])}
        out["dirty_twice"][mode]["converged"] = {impl: [r["converged"] for r in rows if r["impl"] == impl]
                                                 for impl in IMPLS} if mode == "auto-converge" else None
    return out


def table(summary: dict) -> str:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:g}"

    lines = [f"{'figure':44} {'vmigrate':>10} {'QEMU 7.2':>10} {'v/Q':>6}"]
    for case, figs in summary["latency"].items():
        for key in ("p50-ms", "p99-ms", "requests"):
            f = figs[key]
            lines.append(f"{'page latency ' + case + ' ' + key:44} {fmt(f['vmigrate']):>10} {fmt(f['qemu']):>10} "
                         f"{fmt(f['ratio']):>6}")
    for mode, figs in summary["dirty_twice"].items():
        for key in ("total_time_ms", "downtime_ms", "stop_to_resume_ms"):
            f = figs[key]
            lines.append(f"{mode + ' ' + key:44} {fmt(f['vmigrate']):>10} {fmt(f['qemu']):>10} {fmt(f['ratio']):>6}")
    return "\n".join(lines)


NOTES = [
    "QEMU 7.2 has no per-request latency member: its figures come from the destination's trace log "
    "(-msg timestamp=on, log backend, gettimeofday in microseconds); postcopy_place_page is traced after "
    "UFFDIO_COPY, postcopy_place_page_zero before UFFDIO_ZEROPAGE; vmigrate times request to placement in-process.",
    "QEMU 7.2's query-migrate 'downtime' of a postcopy migration is measured from the stop up to the end of "
    "the whole migration, not to the destination's resume (docs/qemu/postcopy.md section 8); "
    "stop_to_resume_ms (source STOP event to destination RESUME event) is the guest's pause, for both.",
    "auto-converge runs are cancelled after the cap and recorded with converged=false.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--only", choices=("latency", "dirty-twice"), help="one part only")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case, implementations alternating order")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    latency: list[dict] = []
    dirty: list[dict] = []
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="vmigrate-postcopy-bench-", dir=shm if shm.is_dir() else None) as tmp:
        workdir = Path(tmp)
        for run in range(args.repeat):
            order = IMPLS if run % 2 == 0 else IMPLS[::-1]
            if args.only in (None, "latency"):
                for preempt in (False, True):
                    for impl in order:
                        row = page_latency(workdir, impl, preempt)
                        log.info("latency %s", row)
                        latency.append(row | {"run": run})
            if args.only in (None, "dirty-twice"):
                for mode in MODES:
                    for impl in order:
                        row = dirty_twice(workdir, impl, mode)
                        log.info("dirty-twice %s", row)
                        dirty.append(row | {"run": run})
    summary = summarize(latency, dirty)
    figures = {
        "config": {"guest_ram_mib": SIZE >> 20, "link_mib_s": LINK, "latency_guest": LATENCY_GUEST,
                   "latency_precopy_s": LATENCY_PRECOPY_S, "dirty_guest": DIRTY_GUEST,
                   "auto_converge_cap_s": AUTO_CONVERGE_CAP_S, "accel": "kvm", "repeat": args.repeat,
                   "command": " ".join(["python", "benchmarks/postcopy.py", *sys.argv[1:]])},
        "host": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(),
                 "qemu": subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()[0]},
        "notes": NOTES, "page_latency": latency, "dirty_twice": dirty, "summary": summary,
    }
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(figures, indent=1) + "\n")
    print(table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
