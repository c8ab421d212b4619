"""Compression threads between two vmigrate processes (the ``compress`` capability), their
zlib work in the threads or in worker processes (vmigrate/migration/compress_worker.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from procs import migrate_in_passes, ram_files_equal
from test_multifd_worker_vms import assert_failed_and_reaped
from vmigrate.cli.bench.memwatch import children
from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import MAGIC
from vmigrate.migration.worker_process import ENV

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20
GUEST = "stress:rate=100,wss=8M"


#: Where the zlib work runs: in worker processes (the default with RAM from a file) or in the threads.
WORKERS = {"threads": "0", "workers": "1"}


@pytest.fixture(params=sorted(WORKERS))
def compress_loops(request, monkeypatch) -> str:
    monkeypatch.setenv(ENV, WORKERS[request.param])
    return request.param


def assert_compress_loops(src, dst, compress_loops: str) -> None:
    """Both VMs (run with ``-v``) did their zlib work where the test asked."""
    for vm, side in ((src, "compression"), (dst, "decompression")):
        assert (f" {side} workers (processes)" in vm.log()) == (compress_loops == "workers"), vm.log()[-2000:]


def start_pair(spawn, tmp_path: Path, src_caps: dict, dst_caps: dict, **params):
    src = spawn("vmigrate", "-v", "--accel", "soft", "-m", "32M", "--mem-path", str(tmp_path / "src.ram"),
                "--guest", GUEST)
    dst = spawn("vmigrate", "-v", "--accel", "soft", "-m", "32M", "--mem-path", str(tmp_path / "dst.ram"),
                "--guest", GUEST, "-S", "--incoming", "tcp:127.0.0.1:0")
    src.set_caps(events=True, **src_caps)
    dst.set_caps(events=True, **dst_caps)
    if params:
        src.cmd("migrate-set-parameters", **params)
    ram = np.memmap(tmp_path / "src.ram", np.uint8, "r+")
    # Random (incompressible) and repetitive (compressible) pages outside the guest's working set.
    ram[12 * MIB:16 * MIB] = np.random.default_rng(3).integers(0, 256, 4 * MIB, dtype=np.uint8)
    ram[16 * MIB:20 * MIB] = np.tile(np.arange(256, dtype=np.uint8), 4 * MIB // 256)
    ram.flush()
    wait_for(lambda: (tmp_path / "src.ram").read_bytes()[:8] == MAGIC, 10, "guest start")
    port = dst.migrate_status()["socket-address"][0]["port"]
    return src, dst, f"tcp:127.0.0.1:{port}"


def test_compressed_pages_with_a_dirtying_guest(spawn, tmp_path, compress_loops):
    src, dst, uri = start_pair(spawn, tmp_path, {"compress": True}, {"compress": True},
                               **{"compress-threads": 3, "compress-level": 6})
    info = migrate_in_passes(src, uri, bandwidth=8 * MIB)
    assert info["status"] == "completed", info
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
    assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")
    comp, ram = info["compression"], info["ram"]
    assert comp["busy"] == 0 and comp["busy-rate"] == 0
    # Every page but the first of the block goes through the threads; the random MiBs barely shrink.
    assert comp["pages"] > 4 * MIB // 4096 * 2
    assert 4 * MIB < comp["compressed-size"] < comp["pages"] * 4096
    assert ram["normal"] == 1 and ram["duplicate"] > 0
    assert ram["precopy-bytes"] + ram["downtime-bytes"] == ram["transferred"]
    assert_compress_loops(src, dst, compress_loops)
    wait_for(lambda: not children(src.pid), 10, "compression workers reaped")


def test_busy_threads_send_plain_pages_when_not_waiting(spawn, tmp_path, compress_loops):
    src, dst, uri = start_pair(spawn, tmp_path, {"compress": True}, {"compress": True},
                               **{"compress-threads": 1, "compress-level": 9, "compress-wait-thread": False})
    src.cmd("migrate", uri=uri)
    info = src.wait_migration({"completed", "failed"}, timeout=60)
    assert info["status"] == "completed", info
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
    assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")
    comp, ram = info["compression"], info["ram"]
    assert comp["busy"] > 0 and comp["pages"] > 0
    assert ram["normal"] + ram["duplicate"] + comp["pages"] >= 32 * MIB // 4096
    assert_compress_loops(src, dst, compress_loops)


def test_compress_then_xbzrle(spawn, tmp_path):
    """Compression serves the first round only; XBZRLE takes over from the first wrap."""
    caps = {"compress": True, "xbzrle": True}
    src, dst, uri = start_pair(spawn, tmp_path, caps, {"compress": True})
    info = migrate_in_passes(src, uri, bandwidth=8 * MIB)
    assert info["status"] == "completed", info
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
    assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")
    assert info["compression"]["pages"] > 0
    assert info["xbzrle-cache"]["pages"] > 0 and info["xbzrle-cache"]["cache-miss"] > 0


def test_destination_without_compress_refuses_compressed_pages(spawn, tmp_path):
    src, dst, uri = start_pair(spawn, tmp_path, {"compress": True}, {})
    src.cmd("migrate", uri=uri)
    assert src.wait_migration({"completed", "failed"}, timeout=30)["status"] == "failed"
    info = dst.wait_migration({"completed", "failed"}, timeout=30)
    assert info["status"] == "failed"
    assert "Received an unexpected compressed page" in info["error-desc"]


def test_a_killed_compression_worker_fails_the_migration_and_the_guest_runs_on(spawn, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "1")
    src, dst, uri = start_pair(spawn, tmp_path, {"compress": True}, {"compress": True},
                               **{"compress-threads": 2, "max-bandwidth": 2 * MIB})
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.migrate_status().get("compression", {}).get("pages", 0) > 64, 20, "compressed pages")
    assert len(children(src.pid)) == 2 and len(children(dst.pid)) == 2
    os.kill(children(src.pid)[1], signal.SIGKILL)
    assert_failed_and_reaped(src, dst, "compress: worker ")
