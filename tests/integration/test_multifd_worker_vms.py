"""Multifd channel workers (processes) between two vmigrate processes: RAM equal, failures, no leaks.

The VM processes run with ``VMIGRATE_WORKERS=1`` so that workers are
used at any channel count; their RAM is a ``--mem-path`` file, which the
workers share.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from procs import migrate_in_passes, ram_files_equal
from test_multifd import MIB, start_pair
from vmigrate.cli.bench.memwatch import children
from vmigrate.harness.waiting import wait_for
from vmigrate.migration.worker_process import ENV

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(autouse=True)
def workers_everywhere(monkeypatch):
    monkeypatch.setenv(ENV, "1")


@pytest.mark.parametrize("method,channels", [("none", 1), ("none", 4), ("zstd", 3), ("zlib", 2)])
def test_ram_arrives_equal_through_workers(spawn, tmp_path, method, channels):
    src, dst, uri = start_pair(spawn, tmp_path, src_args=("-v",), dst_args=("-v",),
                               **{"multifd-channels": channels, "multifd-compression": method})
    info = migrate_in_passes(src, uri, bandwidth=16 * MIB)
    assert info["status"] == "completed", info
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
    assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")
    assert f"multifd: {channels} channel workers (processes) sending" in src.log()
    assert f"multifd: {channels} channel workers (processes) receiving" in dst.log()
    wait_for(lambda: not children(src.pid) and not children(dst.pid), 10, "workers reaped")


def slow_migration(spawn, tmp_path: Path, channels: int, method: str = "none"):
    """A migration at 4 MiB/s with *channels* workers a side, under way (a MiB of multifd traffic out)."""
    src, dst, uri = start_pair(spawn, tmp_path, **{"multifd-channels": channels, "multifd-compression": method})
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 * MIB, "downtime-limit": 1})
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.migrate_status().get("ram", {}).get("multifd-bytes", 0) > MIB, 20, "multifd traffic")
    assert len(children(src.pid)) == channels and len(children(dst.pid)) == channels
    return src, dst


def test_a_killed_worker_fails_the_migration_and_the_guest_runs_on(spawn, tmp_path):
    src, dst = slow_migration(spawn, tmp_path, 3)
    os.kill(children(src.pid)[1], signal.SIGKILL)
    assert_failed_and_reaped(src, dst, "multifd: channel worker ")


def assert_failed_and_reaped(src, dst, error: str) -> None:
    """The migration failed with *error* at the start of its text, the source guest runs on, and
    both VM processes reaped their workers."""
    info = src.wait_migration({"failed", "completed", "cancelled"}, timeout=30)
    assert info["status"] == "failed"
    assert info["error-desc"].startswith(error), info
    assert src.status() == "running"
    assert dst.wait_migration({"failed", "completed"}, timeout=30)["status"] == "failed"
    wait_for(lambda: not children(src.pid) and not children(dst.pid), 10, "workers reaped")


def test_cancel_leaves_no_worker(spawn, tmp_path):
    src, dst = slow_migration(spawn, tmp_path, 2, "zstd")
    src.cmd("migrate_cancel")
    assert src.wait_migration({"cancelled", "failed", "completed"}, timeout=20)["status"] == "cancelled"
    assert src.status() == "running"
    assert dst.wait_migration({"failed", "completed"}, timeout=20)["status"] == "failed"
    wait_for(lambda: not children(src.pid) and not children(dst.pid), 10, "workers reaped")


def test_workers_die_with_the_vm_process(spawn, tmp_path):
    src, dst = slow_migration(spawn, tmp_path, 2)
    workers = children(src.pid)
    src.proc.kill()
    src.proc.wait()

    def gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                       for pid in workers)
    wait_for(gone, 10, "workers gone with their VM process")
    assert dst.wait_migration({"failed", "completed"}, timeout=30)["status"] == "failed"
