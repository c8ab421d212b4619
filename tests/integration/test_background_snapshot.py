"""The ``background-snapshot`` capability (docs/background-snapshot.md, docs/qemu/snapshot-jobs.md §8).

The source guest writes RAM all along; its RAM lives on tmpfs so the test
copies it at the freeze point (the guest is stopped first, so that instant
is the copy's) and compares it with what a destination loads from the
snapshot file.  The guest runs again from the snapshot's freeze on and
keeps writing while its pages are saved: only write protection keeps their
old content in the file.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from procs import ram_files_equal
from vmigrate.cli.analyze import analyze
from vmigrate.harness.waiting import wait_for
from vmigrate.machine import host
from vmigrate.machine.guest import read_header
from vmigrate.machine.memory import RAMBlock
from vmigrate.machine.write_tracking import write_tracking_compatible
from vmigrate.qmp.client import QMPClientError

if not host.uffd_write_protect_supported():
    pytest.skip("the host kernel has no userfaultfd write protection", allow_module_level=True)

FINAL = {"completed", "failed", "cancelled"}
SNAPSHOT = {"background-snapshot": True}
#: Writes across 60 of the 64 MiB, 2 ms at a time: most pages are written before the snapshot reaches them.
STRESS = "stress:rate=300,wss=60M,tick=2"


def start_source(spawn, shm: Path, guest: str = STRESS, size: str = "64M"):
    src = spawn("vmigrate", "-m", size, "--mem-path", str(shm / "src.ram"), "--guest", guest,
                "--trace", "get_queued_page")
    src.set_caps(events=True, **SNAPSHOT)
    wait_for(lambda: (read_header(shm / "src.ram") or 0) > 20, 10, "guest progress")
    return src


def frozen_snapshot(src, shm: Path) -> tuple[Path, Path]:
    """Stop the guest, copy its RAM (the freeze instant), snapshot it to a file while it runs again.

    The file's writer starts late: the guest runs meanwhile, and its writes
    wait on pages the snapshot has not reached.  Returns (the copy, the file).
    """
    src.cmd("stop")
    src.events()
    copy, image = shm / "frozen.ram", shm / "snapshot.bin"
    copy.write_bytes((shm / "src.ram").read_bytes())
    src.cmd("migrate", uri=f"exec:sleep 0.3; exec cat > {image}")
    info = src.wait_migration(FINAL, timeout=30)
    assert info["status"] == "completed", info
    return copy, image


def test_snapshot_is_the_freeze_point_and_loads(spawn_shm) -> None:
    """(b) a vmigrate destination loads the file: its RAM is the frozen copy byte for byte, while
    the source guest, restarted unconditionally, wrote on during the snapshot and after."""
    spawn, shm = spawn_shm
    src = start_source(spawn, shm)
    copy, image = frozen_snapshot(src, shm)
    frozen_counter = read_header(copy)

    assert src.status() == "running", "the snapshot restarts even a guest stopped before"
    wait_for(lambda: read_header(shm / "src.ram") > frozen_counter + 50, 10, "guest progress after the snapshot")
    src.cmd("stop")
    assert not ram_files_equal(copy, shm / "src.ram"), "the guest wrote nothing meanwhile"
    served = [line for line in src.log().splitlines() if "get_queued_page" in line and "dirty=0" not in line]
    assert served, "no guest write waited for its page to be saved"

    dst = spawn("vmigrate", "-m", "64M", "--mem-path", str(shm / "dst.ram"), "-S",
                "--incoming", f"exec:cat {image}")
    assert dst.wait_migration(FINAL, timeout=20)["status"] == "completed"
    assert ram_files_equal(copy, shm / "dst.ram")
    assert read_header(shm / "dst.ram") == frozen_counter


def snapshot_events(vm, timeout: float = 30.0) -> list[str]:
    """Every event up to ``MIGRATION completed`` (or failed, cancelled), MIGRATION ones with their status."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while not seen or seen[-1] not in {f"MIGRATION {s}" for s in FINAL}:
        event = vm.qmp.next_event(max(0.0, deadline - time.monotonic()))
        assert event is not None, f"no final MIGRATION event within {timeout}s; got {seen}"
        seen.append(event["event"] + (f" {event['data']['status']}" if event["event"] == "MIGRATION" else ""))
    return seen


#: QEMU 7.2's events for a snapshot of a running guest (docs/qemu/snapshot-jobs.md §8, verified).
QEMU_EVENTS = ["MIGRATION setup", "MIGRATION active", "STOP", "RESUME", "MIGRATION completed"]


def test_events_figures_and_stream_order(spawn_shm) -> None:
    """(c) QEMU's events for a running guest: setup, active, STOP, RESUME, completed, no
    MIGRATION_PASS; no dirty sync; downtime is the freeze; RAM first, devices last in the file."""
    spawn, shm = spawn_shm
    src = start_source(spawn, shm)
    src.events()
    image = shm / "snapshot.bin"
    src.cmd("migrate", uri=f"exec:cat > {image}")
    assert snapshot_events(src) == QEMU_EVENTS
    info = src.wait_migration(FINAL, timeout=30)
    assert info["status"] == "completed", info
    assert src.status() == "running"

    ram = info["ram"]
    assert ram["dirty-sync-count"] == 0
    assert ram["remaining"] == 0
    assert ram["total"] == 64 << 20
    assert ram["normal"] + ram["duplicate"] == (64 << 20) // 4096, "every page saved exactly once"
    assert 0 <= info["downtime"] < info["total-time"]
    assert info["setup-time"] <= info["total-time"]
    report = analyze(image)
    kinds = [(s["type"], s["idstr"]) for s in report.sections]
    parts = len(kinds) - 3
    assert parts >= 1
    assert kinds == [("START", "ram"), *[("PART", "ram")] * parts, ("FULL", "timer"), ("FULL", "globalstate")]
    assert report.eof and report.vmdesc is not None
    assert report.devices[-1]["values"]["runstate"].rstrip(b"\0".decode()) == "running"


def test_cancel_leaves_guest_running_and_unprotected(spawn_shm) -> None:
    """(d) cancel mid-snapshot: ``cancelled``, the guest still runs and writes everywhere."""
    spawn, shm = spawn_shm
    src = start_source(spawn, shm, "ab:start=1M,end=60M,sleep=1")
    # The reader never reads: the pipe fills and the snapshot stays active with most pages unsaved.
    src.cmd("migrate", uri="exec:exec sleep 30")
    wait_for(lambda: src.migrate_status()["status"] == "active", 10, "active snapshot")
    time.sleep(0.3)
    assert src.migrate_status()["ram"]["remaining"] > 0
    src.cmd("migrate_cancel")
    assert src.wait_migration(FINAL, timeout=10)["status"] == "cancelled"
    assert src.status() == "running"
    passes = read_header(shm / "src.ram")
    wait_for(lambda: read_header(shm / "src.ram") > passes + 20, 10, "ab passes over the whole window")
    src.cmd("stop")
    column = np.fromfile(shm / "src.ram", np.uint8)[1 << 20:60 << 20:4096]
    last = read_header(shm / "src.ram")
    assert ((column == last % 256) | (column == (last - 1) % 256)).all(), "a page stayed write-protected"


def test_refusals(spawn_shm, tmp_path: Path) -> None:
    """(e) QEMU's texts: an incompatible capability, and a RAM file write protection cannot cover."""
    spawn, shm = spawn_shm
    src = spawn("vmigrate", "-m", "16M", "--mem-path", str(shm / "src.ram"))
    src.set_caps(**SNAPSHOT)
    with pytest.raises(QMPClientError, match="Background-snapshot is not compatible with xbzrle"):
        src.set_caps(xbzrle=True)
    src.set_caps(**{"background-snapshot": False})
    src.set_caps(xbzrle=True)
    with pytest.raises(QMPClientError, match="Background-snapshot is not compatible with xbzrle"):
        src.set_caps(**SNAPSHOT)
    on_disk = spawn("vmigrate", "-m", "16M", "--mem-path", str(tmp_path / "disk.ram"))
    if write_tracking_compatible([RAMBlock("probe", 1 << 20, str(tmp_path / "probe.ram"))]):
        pytest.skip(f"write protection covers files on {tmp_path} here")
    with pytest.raises(QMPClientError, match="Background-snapshot is not compatible with guest memory configuration"):
        on_disk.set_caps(**SNAPSHOT)
