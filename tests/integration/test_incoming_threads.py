"""A failed incoming migration leaves no thread behind in the destination process."""

from __future__ import annotations

import os

import pytest

from vmigrate.harness.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20


def thread_count(vm) -> int:
    """The process's threads, as the kernel sees them (Python's own and any other)."""
    return len(os.listdir(f"/proc/{vm.pid}/task"))


@pytest.mark.parametrize("caps,params", [({}, {}), ({"multifd": True}, {"multifd-channels": 4})],
                         ids=["main-channel", "multifd"])
def test_failed_load_ends_every_thread_it_started(spawn, tmp_path, caps, params):
    """The source dies mid-stream after pages were written: the load fails, and the page writers'
    prefault helper goes with it (with multifd, the channel threads once started one each)."""
    src = spawn("vmigrate", "-m", "64M", "--guest", "stress:rate=100,wss=8M")
    dst = spawn("vmigrate", "-m", "64M", "-S", "--incoming", "defer")
    for vm in (src, dst):
        vm.set_caps(**caps)
        if params:
            vm.cmd("migrate-set-parameters", **params)
    before = thread_count(dst)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = dst.migrate_status()["socket-address"][0]["port"]
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 * MIB, "downtime-limit": 1})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_for(lambda: src.migrate_status().get("ram", {}).get("normal", 0) > 256, 30, "pages sent")
    src.proc.kill()
    info = dst.wait_migration({"failed", "completed"}, timeout=30)
    assert info["status"] == "failed" and info["error-desc"], info
    wait_for(lambda: thread_count(dst) == before, 10, f"the destination back to {before} threads")
    assert dst.status() == "inmigrate"
