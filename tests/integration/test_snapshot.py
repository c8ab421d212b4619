"""Snapshot jobs on vmigrate alone: a broken VM state loses nothing, a running guest goes on."""

from __future__ import annotations

import struct
import time
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


def test_load_into_anonymous_ram_that_the_guest_wrote(spawn_shm, tmp_path):
    """A snapshot's zero pages are written as zero into RAM the guest has dirtied: anonymous
    memory that ran is not fresh.  The loaded RAM is read back by migrating it to a VM whose RAM
    is a file."""
    spawn, shm = spawn_shm
    image = tmp_path / "d0.qcow2"
    qcow2_with_data(image, 16 * MIB, seed=5)
    disk = ("--blockdev", f"driver=qcow2,node-name=d0,file={image}")
    saver = spawn("vmigrate", "-m", "64M", "--mem-path", str(shm / "a.ram"), "--guest", "idle", *disk)
    fill_pattern(shm / "a.ram", 64 * MIB, seed=3, random_pages=1000)
    saved = pages(shm / "a.ram", 64 * MIB).copy()
    assert "error" not in run_job(saver, "snapshot-save", "s", tag="t", vmstate="d0", devices=["d0"])
    saver.close()

    vm = spawn("vmigrate", "-m", "64M", "--guest", "stress:rate=64,wss=60M", *disk)
    time.sleep(1.5)
    vm.cmd("stop")
    assert "error" not in run_job(vm, "snapshot-load", "l", tag="t", vmstate="d0", devices=["d0"])
    dst = spawn("vmigrate", "-m", "64M", "--mem-path", str(shm / "b.ram"), "-S", "--incoming", "tcp:127.0.0.1:0")
    port = dst.migrate_status()["socket-address"][0]["port"]
    vm.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert vm.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    assert dst.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    assert np.array_equal(pages(shm / "b.ram", 64 * MIB), saved)
