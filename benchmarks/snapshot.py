#!/usr/bin/env python3
"""snapshot-save and snapshot-load times, vmigrate next to QEMU 7.2 in the same run.

For each implementation and repetition (alternating order): a VM with
``--size`` of RAM (default 1 GiB, half random pages, half zero; the RAM file
on /dev/shm) and one qcow2 disk (``--disk``, default 1 GiB, fresh from
``qemu-img create`` in ``--dir``, the same filesystem for both) saves an
internal snapshot (``snapshot-save``, VM state into the disk's VM-state
area), its RAM is overwritten, and the snapshot is loaded back
(``snapshot-load``).  Each time is from the command to the job's
``concluded`` event (QMP event timestamps); the RAM after the load is
compared with the RAM saved, and ``qemu-img check`` must pass.  Results:
``snapshot.json`` and ``snapshot.csv`` under ``--out``.

Usage: ``python benchmarks/snapshot.py [--size 1G] [--disk 1G] [--repeat 3] [--out benchmarks/results/snapshot]``
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmigrate.cli.bench.images import check_space, fill_ram_image, file_sha256  # noqa: E402
from vmigrate.cli.bench.report import median_of, ratio, write_outputs  # noqa: E402
from vmigrate.cli.bench.runner import IMPLS  # noqa: E402
from vmigrate.harness.launcher import VMProcess, qemu_argv, vmigrate_argv  # noqa: E402
from vmigrate.machine.memory import parse_size  # noqa: E402

log = logging.getLogger("benchmarks.snapshot")


def start(impl: str, size: int, ram: Path, image: Path, workdir: Path) -> VMProcess:
    sock = workdir / f"{impl}.qmp"
    memory = f"{size >> 20}M"
    if impl == "vmigrate":
        argv = vmigrate_argv(sock, "-m", memory, "--mem-path", str(ram), "--guest", "idle", "--accel", "soft",
                             "--blockdev", f"driver=qcow2,node-name=disk0,file={image}")
    else:
        argv = qemu_argv(sock, "-blockdev", f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={image}",
                         memory=memory, mem_path=ram)
    return VMProcess(argv, sock, workdir / f"{impl}.log", start_timeout=30.0, qmp_timeout=600.0)


def job(vm: VMProcess, command: str, job_id: str, timeout: float) -> float:
    """Seconds from the command to its job's ``concluded`` event; fails unless the job succeeded."""
    vm.events()
    t0 = time.time()
    vm.cmd(command, **{"job-id": job_id, "tag": "bench", "vmstate": "disk0", "devices": ["disk0"]})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in vm.events(1.0):
            if event["event"] == "JOB_STATUS_CHANGE" and event["data"] == {"id": job_id, "status": "concluded"}:
                ts = event["timestamp"]
                info = next(j for j in vm.cmd("query-jobs") if j["id"] == job_id)
                if "error" in info:
                    raise RuntimeError(f"{command}: {info['error']}")
                vm.cmd("job-dismiss", id=job_id)
                return ts["seconds"] + ts["microseconds"] / 1e6 - t0
    raise TimeoutError(f"{command} did not conclude in {timeout} s")


def run_once(impl: str, size: int, disk: int, source: Path, shm: Path, workdir: Path, timeout: float) -> dict:
    ram = shm / f"{impl}.ram"
    image = workdir / f"{impl}.qcow2"
    shutil.copyfile(source, ram)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(disk)], check=True)
    rec: dict = {"impl": impl, "size_bytes": size, "disk_bytes": disk}
    vm = start(impl, size, ram, image, workdir)
    try:
        rec["save_s"] = round(job(vm, "snapshot-save", "save", timeout), 3)
        rec["vm_state_bytes"] = vm.cmd("query-migrate")["ram"]["transferred"]
        np.memmap(ram, np.uint8, "r+")[:] = 0x5A
        rec["load_s"] = round(job(vm, "snapshot-load", "load", timeout), 3)
    finally:
        vm.close()
    rec["ram_equal"] = file_sha256(ram) == file_sha256(source)
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    rec["image_check"] = check.returncode == 0
    rec["image_bytes"] = image.stat().st_blocks * 512
    ram.unlink()
    image.unlink()
    return rec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="guest RAM")
    parser.add_argument("--disk", default="1G", help="qcow2 virtual size")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the images go (default: a temporary directory)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/snapshot"))
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    size, disk = parse_size(args.size), parse_size(args.disk)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shm = Path(tempfile.mkdtemp(prefix="vmigrate-snapbench-", dir="/dev/shm"))
    workdir = Path(tempfile.mkdtemp(prefix="vmigrate-snapbench-", dir=args.dir))
    try:
        check_space(shm, 3 * size, "RAM files")
        source = fill_ram_image(shm / "source.ram", size, zero_fraction=0.5, seed=1).path
        records = []
        for rep in range(args.repeat):
            for impl in (IMPLS if rep % 2 == 0 else IMPLS[::-1]):
                rec = run_once(impl, size, disk, source, shm, workdir, args.timeout)
                rec["repeat"] = rep
                log.info("%s", rec)
                records.append(rec)
        summary = {impl: {key: median_of([r for r in records if r["impl"] == impl], key)
                          for key in ("save_s", "load_s", "vm_state_bytes", "image_bytes")} for impl in IMPLS}
        summary["ratio_vmigrate_qemu"] = {key: ratio(summary["vmigrate"][key], summary["qemu"][key])
                                          for key in ("save_s", "load_s")}
        write_outputs(out, "snapshot", vars(args), records, summary)
        log.info("summary: %s", summary)
        return 0 if all(r["ram_equal"] and r["image_check"] for r in records) else 1
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
