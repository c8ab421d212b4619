"""``x-ignore-shared`` between two vmigrate processes mapping one RAM file (QEMU's local live update).

The RAM block comes from a shared file on /dev/shm that both processes map:
the source lists the block with its GPA and sends none of its pages, the
destination finds the guest's memory already there and runs on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import MAGIC

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
SIZE = 256 * MIB
FIRST, LAST = 1 * MIB, 24 * MIB
AB = f"ab:start={FIRST},end={LAST}"
FINAL = {"completed", "failed", "cancelled"}
IGNORE_SHARED = {"x-ignore-shared": True, "events": True}


def counter(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(16)
    assert head[:8] == MAGIC
    return int.from_bytes(head[8:16], "little")


def ab_broken(path: Path) -> np.ndarray:
    """Window pages whose first byte is not the pass count (a paused ab guest has none)."""
    mem = np.memmap(path, dtype=np.uint8, mode="r", shape=(SIZE,))
    column = np.asarray(mem[FIRST:LAST:4096])
    return np.flatnonzero(column != counter(path) & 0xFF)


def incoming(spawn, *args: str):
    dst = spawn("vmigrate", "-m", str(SIZE // MIB) + "M", *args, "--incoming", "tcp:127.0.0.1:0")
    dst.set_caps(**IGNORE_SHARED)
    return dst, f"tcp:127.0.0.1:{dst.migrate_status()['socket-address'][0]['port']}"


def test_same_file_sends_no_page_and_the_guest_runs_on(spawn_shm):
    spawn, shm = spawn_shm
    path = shm / "guest.ram"
    src = spawn("vmigrate", "-m", "256M", "--mem-path", str(path), "--guest", AB)
    src.set_caps(**IGNORE_SHARED)
    dst, uri = incoming(spawn, "--mem-path", str(path), "--guest", AB)
    wait_for(lambda: counter(path) > 2, 10, "the ab guest to run")

    src.cmd("migrate", uri=uri)
    info = src.wait_migration(FINAL, timeout=30)
    assert info["status"] == "completed", info
    assert dst.wait_migration(FINAL, timeout=30)["status"] == "completed"
    ram = info["ram"]
    # ram_bytes_total leaves the ignored block out: nothing to send, nothing remaining.
    assert (ram["total"], ram["remaining"], ram["normal"], ram["duplicate"]) == (0, 0, 0, 0), ram
    assert ram["transferred"] < 64 * 1024, ram
    assert src.status() == "postmigrate" and dst.status() == "running"

    before = counter(path)
    wait_for(lambda: counter(path) > before + 2, 10, "the destination's guest to go on")
    dst.cmd("stop")
    assert ab_broken(path).size == 0


def test_destination_not_shared_is_refused(spawn_shm):
    """A destination with anonymous RAM would run on memory nobody sent: the load fails."""
    spawn, shm = spawn_shm
    path = shm / "guest.ram"
    src = spawn("vmigrate", "-m", "256M", "--mem-path", str(path), "--guest", AB)
    src.set_caps(**IGNORE_SHARED)
    dst, uri = incoming(spawn)
    src.cmd("migrate", uri=uri)
    info = dst.wait_migration(FINAL, timeout=30)
    assert info["status"] == "failed"
    assert "Block ram is not shared here" in info["error-desc"], info
    assert dst.status() == "inmigrate"
