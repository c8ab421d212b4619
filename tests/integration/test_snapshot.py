"""Snapshot jobs on vmigrate alone: a broken VM state loses nothing, a running guest goes on."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "interop"))

from ramfile import fill_pattern, pages  # noqa: E402
from snapshots import MIB, check_image, qcow2_with_data, run_job  # noqa: E402

pytestmark = pytest.mark.timeout(90)


def shorten_vm_state(image: Path, by: int) -> None:
    """Make the first snapshot's table entry claim *by* fewer VM-state bytes (a stream cut short)."""
    with open(image, "r+b") as f:
        header = f.read(72)
        table = struct.unpack(">Q", header[64:72])[0]
        f.seek(table + 32)
        old32 = struct.unpack(">I", f.read(4))[0]
        f.seek(table + 40)
        old64 = struct.unpack(">Q", f.read(8))[0]
        assert old32 == old64 > by
        f.seek(table + 32)
        f.write(struct.pack(">I", old32 - by))
        f.seek(table + 40)
        f.write(struct.pack(">Q", old64 - by))


def test_a_broken_vm_state_leaves_ram_as_it_was(spawn_shm, tmp_path):
    spawn, shm = spawn_shm
    image = tmp_path / "d0.qcow2"
    qcow2_with_data(image, 16 * MIB, seed=4)
    ram = shm / "vm.ram"
    vm = spawn("vmigrate", "-m", "64M", "--mem-path", str(ram), "--guest", "idle",
               "--blockdev", f"driver=qcow2,node-name=d0,file={image}")
    fill_pattern(ram, 64 * MIB, seed=1, random_pages=2000)
    assert "error" not in run_job(vm, "snapshot-save", "s", tag="t", vmstate="d0", devices=["d0"])
    fill_pattern(ram, 64 * MIB, seed=2, random_pages=2000)
    before = pages(ram, 64 * MIB).copy()
    vm.close()
    shorten_vm_state(image, 4000)
    check_image(image)

    vm = spawn("vmigrate", "-m", "64M", "--mem-path", str(ram), "--guest", "idle",
               "--blockdev", f"driver=qcow2,node-name=d0,file={image}")
    job = run_job(vm, "snapshot-load", "l", tag="t", vmstate="d0", devices=["d0"])
    assert job["error"] == "Error -22 while loading VM state"
    assert vm.status() == "restore-vm"
    assert np.array_equal(pages(ram, 64 * MIB), before)
    vm.cmd("cont")
    assert vm.status() == "running"
