"""COLO (``x-colo``) between two vmigrate processes (docs/colo.md).

The primary runs the ``ab`` guest, whose every pass is atomic with respect to
a pause: in a stopped guest every window page's first byte is the pass
counter, so a checkpoint applied in part would show as a broken pattern.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import MAGIC
from vmigrate.qmp.client import QMPClientError

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
AB = "ab:end=24M"
DELAY_MS = 100


def ab_counter(path: Path) -> int:
    """The counter of a stopped ``ab`` guest, after checking every window page carries it."""
    mem = np.fromfile(path, dtype=np.uint8)
    assert mem[:8].tobytes() == MAGIC
    counter = int.from_bytes(mem[8:16].tobytes(), "little")
    column = mem[1 * MIB:24 * MIB:4096]
    broken = np.flatnonzero(column != counter % 256)
    assert broken.size == 0, f"ab pattern broken at window page {int(broken[0])} (counter {counter})"
    return counter


def colo_exits(vm) -> list:
    return [e["data"] for e in vm.events(0.1) if e["event"] == "COLO_EXIT"]


@pytest.fixture(params=[{}, {"return-path": True}, {"multifd": True}], ids=["plain", "return-path", "multifd"])
def colo(request, spawn_shm):
    """(primary, secondary, secondary's RAM file) after a few checkpoints, RAM files on tmpfs;
    plain, with a return path (whose reader hands the channel over to COLO) or with multifd
    (checkpoint pages on the multifd channels, held until the checkpoint is whole)."""
    spawn, shm = spawn_shm
    src = spawn("vmigrate", "-m", "64M", "--mem-path", str(shm / "primary.ram"), "--guest", AB)
    dst = spawn("vmigrate", "-m", "64M", "--mem-path", str(shm / "secondary.ram"), "--guest", AB, "-S",
                "--incoming", "tcp:127.0.0.1:0")
    port = dst.migrate_status()["socket-address"][0]["port"]
    for vm in (src, dst):
        vm.set_caps(**{"x-colo": True, "events": True})
    src.set_caps(**request.param)
    dst.set_caps(**{cap: on for cap, on in request.param.items() if cap == "multifd"})
    src.cmd("migrate-set-parameters", **{"x-checkpoint-delay": DELAY_MS})
    wait_for(lambda: (shm / "primary.ram").read_bytes()[:8] == MAGIC, 10, "guest start")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration({"colo", "failed"}, timeout=30)["status"] == "colo"
    wait_for(lambda: src.migrate_status()["x-vmigrate-colo"]["checkpoints"] >= 3, 20, "three checkpoints")
    return src, dst, shm / "secondary.ram"


def guest_counter(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[8:16], "little")


def test_primary_killed_secondary_takes_over(colo):
    src, dst, ram = colo
    info = src.migrate_status()
    assert info["status"] == "colo" and src.status() == "running"
    # Both guests run between checkpoints, as in QEMU (lock-step).
    assert dst.migrate_status()["status"] == "colo"
    wait_for(lambda: dst.status() == "running", 5, "the secondary's guest between checkpoints")
    assert dst.cmd("query-colo-status") == {"mode": "secondary", "last-mode": "none", "reason": "none"}
    assert src.cmd("query-colo-status") == {"mode": "primary", "last-mode": "none", "reason": "none"}

    before = guest_counter(ram.with_name("primary.ram"))
    done = src.migrate_status()["x-vmigrate-colo"]["checkpoints"]
    wait_for(lambda: src.migrate_status()["x-vmigrate-colo"]["checkpoints"] > done, 10,
             "a checkpoint after the counter was read")
    os.kill(src.pid, signal.SIGKILL)
    src.proc.wait(10)
    # The secondary sees the broken channel and waits for a failover (colo_process_incoming_thread).
    assert wait_for(lambda: colo_exits(dst), 10, "COLO_EXIT on the secondary") == \
        [{"mode": "secondary", "reason": "error"}]
    assert dst.migrate_status()["status"] == "colo"

    dst.cmd("x-colo-lost-heartbeat")
    assert dst.wait_migration({"completed"}, timeout=10)["status"] == "completed"
    assert dst.status() == "running"
    assert dst.cmd("query-colo-status") == {"mode": "none", "last-mode": "secondary", "reason": "request"}
    wait_for(lambda: guest_counter(ram) > before + 3, 10, "the secondary's guest to run on")
    dst.cmd("stop")
    assert ab_counter(ram) > before


def test_failover_on_request_and_status(colo):
    src, dst, _ = colo
    info = src.migrate_status()
    assert set(info) == {"status", "x-vmigrate-colo"}  # QEMU's query-migrate shows only the status in colo
    figures = info["x-vmigrate-colo"]
    assert figures["last-bytes"] > 0 and figures["last-downtime-ms"] > 0
    # Checkpoints carry the guest's pages, on the multifd channels too.
    wait_for(lambda: src.migrate_status()["x-vmigrate-colo"]["last-bytes"] > 1 << 20, 10, "a checkpoint of pages")
    with pytest.raises(QMPClientError, match="There's a migration process in progress"):
        src.cmd("migrate", uri="tcp:127.0.0.1:1")

    dst.cmd("x-colo-lost-heartbeat")
    assert dst.wait_migration({"completed"}, timeout=10)["status"] == "completed"
    assert dst.status() == "running"
    assert wait_for(lambda: colo_exits(dst), 5, "COLO_EXIT on the secondary") == \
        [{"mode": "secondary", "reason": "request"}]
    # The primary's checkpoint fails; it keeps its guest and waits for its own failover.
    assert wait_for(lambda: colo_exits(src), 10, "COLO_EXIT on the primary") == \
        [{"mode": "primary", "reason": "error"}]
    assert src.cmd("query-colo-status")["mode"] == "primary"
    src.cmd("x-colo-lost-heartbeat")
    assert src.wait_migration({"completed"}, timeout=10)["status"] == "completed"
    assert src.status() == "running"
    assert src.cmd("query-colo-status") == {"mode": "none", "last-mode": "primary", "reason": "request"}
    with pytest.raises(QMPClientError, match="The feature 'colo' is not enabled"):
        src.cmd("x-colo-lost-heartbeat")
