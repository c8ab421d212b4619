"""Helpers for snapshot tests: run a snapshot job to its end, make and read qcow2 images."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from vmigrate.harness.launcher import VMProcess
from vmigrate.harness.waiting import wait_for

MIB = 1 << 20


def run_job(vm: VMProcess, command: str, job_id: str, timeout: float = 60.0, **arguments) -> dict:
    """Start a snapshot job, wait for it to conclude, dismiss it; its ``query-jobs`` entry."""
    vm.cmd(command, **{"job-id": job_id, **arguments})
    job = wait_for(lambda: next((j for j in vm.cmd("query-jobs") if j["id"] == job_id
                                 and j["status"] == "concluded"), None), timeout, f"job {job_id} concluded")
    vm.cmd("job-dismiss", id=job_id)
    return job


def qcow2_with_data(path: Path, size: int, seed: int) -> np.ndarray:
    """A qcow2 image whose guest bytes are random in its first half (made by qemu-img from raw)."""
    data = np.zeros(size, np.uint8)
    data[:size // 2] = np.random.default_rng(seed).integers(0, 256, size // 2, dtype=np.uint8)
    raw = path.with_suffix(".raw")
    data.tofile(raw)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return data


def disk_bytes(path: Path) -> np.ndarray:
    """The image's guest-visible bytes (qemu-img convert to raw)."""
    raw = path.with_suffix(".read.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)], check=True)
    data = np.fromfile(raw, np.uint8)
    raw.unlink()
    return data


def qemu_io_write(path: Path, pattern: int, offset: int, length: int) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", str(path)],
                   check=True, capture_output=True)


def check_image(path: Path) -> str:
    """``qemu-img check``'s report; the test fails unless it found nothing wrong."""
    out = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert out.returncode == 0 and "No errors were found" in out.stdout, out.stdout + out.stderr
    return out.stdout


def snapshot_list(path: Path) -> str:
    return subprocess.run(["qemu-img", "snapshot", "-l", str(path)], capture_output=True, text=True,
                          check=True).stdout
