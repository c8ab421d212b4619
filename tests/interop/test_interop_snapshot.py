"""Internal snapshots between vmigrate and QEMU 7.2: each loads what the other saved.

The VM state goes into the qcow2 VM-state area of the ``vmstate`` node and
the snapshot table of every device (docs/qemu/snapshot-jobs.md §7); RAM and
disk contents must come back byte-equal, and ``qemu-img check`` must find
nothing wrong with any image vmigrate wrote.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from machines import Machines
from ramfile import fill_pattern, pages
from snapshots import MIB, check_image, disk_bytes, qcow2_with_data, qemu_io_write, run_job, snapshot_list

pytestmark = pytest.mark.timeout(120)

SIZE = 64 * MIB
DISK = 32 * MIB


def blockdev(kind: str, node: str, path) -> tuple[str, ...]:
    if kind == "qemu":
        return ("-blockdev", f"driver=qcow2,node-name={node},file.driver=file,file.filename={path}")
    return ("--blockdev", f"driver=qcow2,node-name={node},file={path}")


def start(machines: Machines, kind: str, *disks: tuple[str, object]):
    args = [a for node, path in disks for a in blockdev(kind, node, path)]
    if kind == "vmigrate":
        args += ["--guest", "idle"]
    return machines.start(kind, "64M", *args)


@pytest.mark.parametrize("saver,loader", [("vmigrate", "qemu"), ("qemu", "vmigrate"), ("vmigrate", "vmigrate")])
def test_snapshot_round_trip(machines: Machines, ramdir, saver: str, loader: str) -> None:
    """Save on one implementation over two disks; change RAM and disks; load on the other."""
    d0, d1 = ramdir / "d0.qcow2", ramdir / "d1.qcow2"
    disk0 = qcow2_with_data(d0, DISK, seed=1)
    disk1 = qcow2_with_data(d1, DISK, seed=2)
    src = start(machines, saver, ("d0", d0), ("d1", d1))
    fill_pattern(src.ram, src.size, seed=7, random_pages=3000)
    saved_ram = pages(src.ram, src.size).copy()
    job = run_job(src.vm, "snapshot-save", "save0", tag="snap0", vmstate="d0", devices=["d0", "d1"])
    assert "error" not in job, job
    assert src.vm.status() == "running"
    info = src.vm.migrate_status()
    assert info["status"] == "completed" and info["ram"]["downtime-bytes"] == info["ram"]["transferred"], info
    src.vm.close()
    for path in (d0, d1):
        check_image(path)
    listing = snapshot_list(d0)
    assert listing.splitlines()[1].split() == ["ID", "TAG", "VM", "SIZE", "DATE", "VM", "CLOCK", "ICOUNT"]
    assert "snap0" in listing and " 0 B " not in listing.splitlines()[2], listing
    assert " 0 B " in snapshot_list(d1).splitlines()[2]
    qemu_io_write(d0, 0x11, 0, 4 * MIB)
    qemu_io_write(d1, 0x22, DISK - MIB, MIB)

    dst = start(machines, loader, ("d0", d0), ("d1", d1))
    pages(dst.ram, dst.size, writable=True)[:] = 0x5A
    job = run_job(dst.vm, "snapshot-load", "load0", tag="snap0", vmstate="d0", devices=["d0", "d1"])
    assert "error" not in job, job
    assert dst.vm.status() == "running"
    assert np.array_equal(pages(dst.ram, dst.size), saved_ram)
    dst.vm.close()
    for path in (d0, d1):
        check_image(path)
    assert np.array_equal(disk_bytes(d0), disk0)
    assert np.array_equal(disk_bytes(d1), disk1)


def test_delete_twice(machines: Machines, ramdir) -> None:
    """Deleting an absent tag is no error (QEMU's rule); the image is clean and lists nothing."""
    d0 = ramdir / "d0.qcow2"
    qcow2_with_data(d0, DISK, seed=3)
    vm = start(machines, "vmigrate", ("d0", d0))
    assert "error" not in run_job(vm.vm, "snapshot-save", "a", tag="t", vmstate="d0", devices=["d0"])
    backup = ramdir / "copy.qcow2"
    shutil.copyfile(d0, backup)
    for job_id in ("b", "c"):
        run_job(vm.vm, "snapshot-delete", job_id, tag="t", devices=["d0"])
    vm.vm.close()
    check_image(d0)
    assert snapshot_list(d0) == ""
    check_image(backup)
