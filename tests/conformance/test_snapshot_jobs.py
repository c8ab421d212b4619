"""Snapshot jobs, job verbs and dirty-bitmap commands against the live QEMU 7.2.

Both sides open the same disks (each its own copy): qcow2 nodes that can
take snapshots, a raw node and a read-only qcow2 node that cannot, and a
``-drive`` device.  Replies, job lists and the JOB_STATUS_CHANGE / STOP /
RESUME sequences must be equal (docs/qemu/snapshot-jobs.md).
"""

from __future__ import annotations

import json
import re

import pytest
from harness import Disk

DISKS = (Disk("d0"), Disk("d1"), Disk("r0", fmt="raw", size="16M"), Disk("ro", read_only=True),
         Disk("n0", fmt="raw", size="16M", device="drive0"))


@pytest.fixture
def disks_pair(fresh_pair):
    return fresh_pair(disks=DISKS)


def _job(pair, command: str, job_id: str, **arguments) -> list[dict]:
    """Run a snapshot job to its end on both sides; the events up to ``concluded`` and query-jobs."""
    pair.same(command, {"job-id": job_id, **arguments})
    pair.events_until(lambda seen: ("JOB_STATUS_CHANGE", {"id": job_id, "status": "concluded"}) in seen)
    return pair.same("query-jobs")["return"]


@pytest.mark.parametrize("arguments, error", [
    ({"devices": []}, "At least one device is required for snapshot"),
    ({"devices": ["nodev"]}, "No block device node 'nodev'"),
    ({"devices": ["r0"]}, "Device 'r0' is writable but does not support snapshots"),
    ({"devices": ["ro"]}, "Device 'ro' is writable but does not support snapshots"),
    ({"devices": ["d1"]}, "vmstate block device 'd0' does not exist"),
])
def test_save_refusals(disks_pair, arguments, error):
    jobs = _job(disks_pair, "snapshot-save", "s0", tag="t", vmstate="d0", **arguments)
    assert jobs[0]["error"] == error


def test_job_ids_and_verbs(disks_pair):
    pair = disks_pair
    assert pair.same("snapshot-save", {"job-id": "1bad", "tag": "t", "vmstate": "d0",
                                       "devices": []})["error"]["desc"] == "Invalid job ID '1bad'"
    _job(pair, "snapshot-delete", "j0", tag="none", devices=["d0"])
    assert pair.same("snapshot-delete", {"job-id": "j0", "tag": "t", "devices": ["d0"]})["error"]["desc"] == (
        "Job ID 'j0' already in use")
    for verb in ("job-cancel", "job-pause", "job-resume", "job-complete", "job-finalize"):
        pair.same(verb, {"id": "j0"})
    pair.same("job-dismiss", {"id": "nojob"})
    pair.same("job-dismiss", {"id": "j0"})
    pair.same_events()
    assert pair.same("query-jobs")["return"] == []


def test_save_load_delete(disks_pair):
    """A snapshot over two devices: events, the job list and the image's snapshot table agree."""
    pair = disks_pair
    pair.same("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    devices = ["d0", "d1"]
    jobs = _job(pair, "snapshot-save", "s0", tag="snap0", vmstate="d0", devices=devices)
    assert "error" not in jobs[0]
    jobs = _job(pair, "snapshot-save", "s1", tag="snap0", vmstate="d0", devices=devices)
    assert jobs[0]["error"] == "Snapshot 'snap0' already exists in one or more devices"
    status = pair.same("query-migrate")["return"]
    assert status["status"] == "completed"
    jobs = _job(pair, "snapshot-load", "l0", tag="snap0", vmstate="d1", devices=devices)
    assert jobs[0]["error"] == "This is a disk-only snapshot. Revert to it  offline using qemu-img"
    assert pair.same("query-status")["return"]["status"] == "restore-vm"
    pair.same("cont")
    jobs = _job(pair, "snapshot-load", "l1", tag="nosuch", vmstate="d0", devices=devices)
    assert jobs[0]["error"] == "Snapshot 'nosuch' does not exist in one or more devices"
    pair.same("cont")
    jobs = _job(pair, "snapshot-load", "l2", tag="snap0", vmstate="d0", devices=devices)
    assert "error" not in jobs[0]
    assert pair.same("query-status")["return"]["status"] == "running"
    _job(pair, "snapshot-delete", "x0", tag="snap0", devices=devices)
    _job(pair, "snapshot-delete", "x1", tag="snap0", devices=devices)
    pair.same_events()


@pytest.mark.parametrize("arguments", [
    {"node": "d0", "name": ""},
    {"node": "nonode", "name": "b"},
    {"node": "d0", "name": "b", "granularity": 1000},
    {"node": "d0", "name": "b", "granularity": 256},
    {"node": "r0", "name": "b", "persistent": True},
    {"node": "d0", "name": "x" * 1024},
])
def test_bitmap_add_refusals(pair_with_disks, arguments):
    pair_with_disks.same("block-dirty-bitmap-add", arguments)


def test_bitmap_commands(pair_with_disks):
    pair = pair_with_disks
    pair.same("block-dirty-bitmap-add", {"node": "drive0", "name": "b0"})
    pair.same("block-dirty-bitmap-add", {"node": "d0", "name": "b1", "granularity": 4096, "disabled": True})
    pair.same("block-dirty-bitmap-add", {"node": "d0", "name": "b1"})
    for command in ("block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-clear"):
        pair.same(command, {"node": "d0", "name": "b1"})
        pair.same(command, {"node": "d0", "name": "nob"})
        pair.same(command, {"node": "nonode", "name": "b1"})
    qemu, vm = pair.send({"execute": "query-named-block-nodes"})
    assert _masked(vm) == _masked(qemu)
    infos = {n["node-name"]: n.get("dirty-bitmaps") for n in qemu["return"] if not n["node-name"].startswith("#")}
    assert infos["d0"] == [{"name": "b1", "recording": False, "persistent": False, "busy": False,
                            "granularity": 4096, "count": 0}]
    pair.same("block-dirty-bitmap-remove", {"node": "d0", "name": "b1"})
    pair.same("block-dirty-bitmap-remove", {"node": "d0", "name": "b1"})
    pair.same("block-dirty-bitmap-remove", {"node": "drive0", "name": "b0"})


def _masked(reply: dict) -> str:
    """The answer with each side's image paths and generated node names made alike."""
    text = json.dumps(reply).replace("/qemu-", "/SIDE-").replace("/vmigrate-", "/SIDE-")
    return re.sub(r"#block[0-9]+", "#block", text)


@pytest.fixture(scope="module")
def pair_with_disks(tmp_path_factory):
    from harness import Options, Pair

    p = Pair.start(tmp_path_factory.mktemp("disks"), Options(disks=DISKS))
    yield p
    p.close()
