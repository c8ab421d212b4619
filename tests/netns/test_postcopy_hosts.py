"""Postcopy between two hosts over a shaped link that is cut mid-postcopy, then recovered.

The running destination guest (``ab``) faults on pages that travel the slow
link as page requests (docs/qemu/postcopy.md §4.3, §5).  Cutting the link
(``ip link set down``) is the failure postcopy recovery exists for (§7): the
destination cannot fall back to the source's guest, which stopped at the
switch-over, so both sides must go ``postcopy-paused`` and, with the link
back, ``migrate-recover`` + ``migrate resume=true`` finish the migration with
no page lost.  RAM files are on tmpfs: userfaultfd needs shmem.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from procs import migration_statuses
from vmigrate.harness.waiting import wait_for
from vmigrate.migration.channel import DEAD_LINK_SECONDS
from vmigrate.machine.guest import MAGIC

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
FINAL = {"completed", "failed", "cancelled"}
GUEST = "ab:end=24M"


def shape(host, rate: str = "40mbit") -> str:
    """Limit *host*'s end of the link to *rate*: netem with 5 ms delay where the kernel has
    it, else tbf at the same rate (some kernels build no sch_netem).  The qdisc used."""
    def tc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", host.netns, "tc", "qdisc", "add", "dev", host.link,
                               "root", *args], capture_output=True, timeout=10)

    if tc("netem", "rate", rate, "delay", "5ms").returncode == 0:
        return "netem"
    tbf = tc("tbf", "rate", rate, "burst", "32kbit", "latency", "50ms")
    if tbf.returncode != 0:
        pytest.skip(f"cannot shape the link with tc (netem or tbf): {tbf.stderr.decode().strip()}")
    return "tbf"



def counter(path: Path) -> int:
    return int(np.fromfile(path, np.uint64, 2)[1])


def test_link_cut_during_postcopy_then_recover(two_hosts, shm, tmp_path):
    """Postcopy over a 40 Mbit/s link, cut once faults have crossed it, recovered with the link
    back up: both sides pause, the migration completes and the ab pattern is intact."""
    if shutil.which("tc") is None:
        pytest.skip("no 'tc' command to shape the link")
    src_host, dst_host = two_hosts
    shape(src_host)

    def start(host, name: str, *args: str):
        return host.run(tmp_path / f"{name}.sock", tmp_path / f"{name}.log", "-m", "64M",
                        "--mem-path", str(shm / f"{name}.ram"), "--guest", GUEST, *args)

    src = start(src_host, "src")
    dst = start(dst_host, "dst", "--incoming", f"tcp:{dst_host.address}:4444")
    try:
        for vm in (src, dst):
            vm.set_caps(events=True, **{"postcopy-ram": True})
        wait_for(lambda: (shm / "src.ram").read_bytes()[:8] == MAGIC, 10, "the guest to start")
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 * MIB, "max-postcopy-bandwidth": 2 * MIB})
        src.cmd("migrate", uri=f"tcp:{dst_host.address}:4444")
        time.sleep(1.0)
        assert src.migrate_status()["status"] == "active", "precopy must still be running at the switch"
        src.cmd("migrate-start-postcopy")
        wait_for(lambda: src.migrate_status().get("ram", {}).get("postcopy-requests", 0) > 0, 10,
                 "page requests over the shaped link")
        time.sleep(0.5)

        dst_host.set_link(False)
        # QEMU would wait for TCP's retransmission timeout (about 15 minutes) and its reader for
        # ever; vmigrate's sockets give a dead link up within DEAD_LINK_SECONDS on both sides,
        # so each side pauses by itself (§7.1).
        for vm, name in ((src, "source"), (dst, "destination")):
            wait_for(lambda: vm.migrate_status()["status"] == "postcopy-paused", DEAD_LINK_SECONDS + 10,
                     f"the {name} to pause by itself")
        assert dst.status() == "running"

        dst_host.set_link(True)
        dst.cmd("migrate-recover", uri=f"tcp:{dst_host.address}:4445")
        src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
        src.cmd("migrate", uri=f"tcp:{dst_host.address}:4445", resume=True)
        info = src.wait_migration(FINAL, timeout=40)
        assert info["status"] == "completed", info
        assert dst.wait_migration(FINAL, timeout=10)["status"] == "completed"
        assert migration_statuses(src, "completed") == ["setup", "active", "postcopy-active", "postcopy-paused", "postcopy-recover",
                                 "postcopy-active", "completed"]
        assert migration_statuses(dst, "completed") == ["active", "postcopy-active", "postcopy-paused", "setup", "postcopy-recover",
                                 "postcopy-active", "completed"]
        assert info["ram"]["postcopy-requests"] > 0

        start_count = counter(shm / "dst.ram")
        wait_for(lambda: counter(shm / "dst.ram") > start_count + 10, 15, "the guest to go on")
        dst.cmd("stop")
        mem = np.fromfile(shm / "dst.ram", np.uint8)
        passes = int.from_bytes(mem[8:16].tobytes(), "little")
        column = mem[MIB:24 * MIB:4096]
        ok = (column == passes % 256) | (column == (passes - 1) % 256)
        assert ok.all(), f"ab pattern broken at page {int(np.flatnonzero(~ok)[0])} (passes {passes})"
    finally:
        src.close()
        dst.close()
