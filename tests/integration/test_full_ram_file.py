"""A destination whose RAM file cannot grow: the load fails with the reason, nobody crashes.

The destination's RAM file lives on a 16 MiB tmpfs and the guest has 32 MiB
of random pages.  Incoming pages go into the file with ``pwrite`` or
``splice`` (docs/benchmarks.md, "Writing incoming pages through the RAM
file"): a full file system is an error of that call, where a write through
the mapping would have killed the process with SIGBUS.  Mounting needs
root; elsewhere the tests skip with one line.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vmigrate.migration.worker_process import ENV

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20
SCENARIOS = {
    "precopy": ({}, "0"),
    "multifd-threads": ({"multifd": True}, "0"),
    "multifd-workers": ({"multifd": True}, "1"),
}


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs mounted for the test, unmounted after (lazily: a stopped VM may still hold it)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs ({mounted.stderr.strip() or 'mount failed'}); "
                    "a full RAM file system stays untested here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_full_ram_file_system_fails_the_load_and_the_source_runs_on(spawn, tmp_path, small_fs, scenario,
                                                                      monkeypatch):
    caps, workers = SCENARIOS[scenario]
    monkeypatch.setenv(ENV, workers)
    src_ram = tmp_path / "src.ram"
    src_ram.write_bytes(np.random.default_rng(4).integers(0, 256, 32 * MIB, dtype=np.uint8).tobytes())
    digest = hashlib.sha256(src_ram.read_bytes()).hexdigest()
    src = spawn("vmigrate", "--accel", "soft", "-m", "32M", "--mem-path", str(src_ram), "--guest", "idle")
    dst = spawn("vmigrate", "-v", "--accel", "soft", "-m", "32M", "--mem-path", str(small_fs / "dst.ram"),
                "-S", "--incoming", "defer")
    for vm in (src, dst):
        vm.set_caps(events=True, **caps)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = dst.migrate_status()["socket-address"][0]["port"]
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert dst.wait_migration({"completed", "failed"}, timeout=30) == {
        "status": "failed", "error-desc": "load of migration failed: [Errno 28] No space left on device"}
    assert src.wait_migration({"completed", "failed"}, timeout=30)["status"] == "failed"
    assert src.status() == "running" and dst.status() == "inmigrate"
    assert hashlib.sha256(src_ram.read_bytes()).hexdigest() == digest
    if workers == "1":
        assert " channel workers (processes) receiving" in dst.log()
