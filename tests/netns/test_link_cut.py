"""A precopy between two hosts whose link goes down in the middle.

TCP does not notice a dead link by itself: both sides wait, as QEMU's do.  What
must hold: ``migrate_cancel`` frees the source at once, its guest runs on with
its memory as it was; ``yank`` frees the destination, which ends ``failed``;
and with the link back, a second migration completes with RAM equal.
"""

from __future__ import annotations

import time

import numpy as np

from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import MAGIC

MIB = 1 << 20
GUEST = "stress:rate=50,wss=16M"


def test_link_cut_during_precopy(two_hosts, tmp_path):
    src_host, dst_host = two_hosts
    src = src_host.run(tmp_path / "src.sock", tmp_path / "src.log", "-m", "64M",
                       "--mem-path", str(tmp_path / "src.ram"), "--guest", GUEST)
    dst = dst_host.run(tmp_path / "dst.sock", tmp_path / "dst.log", "-m", "64M",
                       "--mem-path", str(tmp_path / "dst.ram"), "--guest", GUEST, "--incoming",
                       f"tcp:{dst_host.address}:4444")
    try:
        wait_for(lambda: (tmp_path / "src.ram").read_bytes()[:8] == MAGIC, 10, "the guest to start")
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 * MIB})
        src.cmd("migrate", uri=f"tcp:{dst_host.address}:4444")
        wait_for(lambda: src.migrate_status().get("ram", {}).get("transferred", 0) > 4 * MIB, 30, "traffic")
        dst_host.set_link(False)

        def stalled() -> bool:
            before = src.migrate_status()["ram"]["transferred"]
            time.sleep(1.0)
            return src.migrate_status()["ram"]["transferred"] == before

        wait_for(stalled, 30, "the stream to stall once the socket buffers are full")
        assert src.migrate_status()["status"] == "active" and dst.migrate_status()["status"] == "active"

        src.cmd("migrate_cancel")
        assert src.wait_migration({"cancelled", "failed"}, timeout=10)["status"] == "cancelled"
        assert src.status() == "running"
        steps = np.fromfile(tmp_path / "src.ram", np.uint64, 2)[1]
        wait_for(lambda: np.fromfile(tmp_path / "src.ram", np.uint64, 2)[1] > steps, 10, "the guest to go on")

        dst.cmd("yank", instances=[{"type": "migration"}])
        info = dst.wait_migration({"failed"}, timeout=10)
        assert info["error-desc"].startswith("load of migration failed: ")
        assert dst.status() == "inmigrate"

        dst_host.set_link(True)
        again = dst_host.run(tmp_path / "again.sock", tmp_path / "again.log", "-m", "64M", "-S",
                             "--mem-path", str(tmp_path / "again.ram"), "--guest", GUEST, "--incoming",
                             f"tcp:{dst_host.address}:4445")
        try:
            src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 30, "downtime-limit": 2000})
            src.cmd("migrate", uri=f"tcp:{dst_host.address}:4445")
            assert src.wait_migration({"completed", "failed"}, timeout=60)["status"] == "completed"
            assert again.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
            assert np.array_equal(np.fromfile(tmp_path / "src.ram", np.uint8),
                                  np.fromfile(tmp_path / "again.ram", np.uint8))
        finally:
            again.close()
    finally:
        src.close()
        dst.close()
