"""XBZRLE between two vmigrate processes: a guest re-dirtying its working set, several passes.

The source is frozen in ``postmigrate`` after switchover and the destination
started with ``-S``, so both RAM files must end byte-equal; deltas are only
correct if the source's cache mirrored the destination's pages exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from procs import migrate_in_passes, ram_files_equal
from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import MAGIC

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20
GUEST = "stress:rate=100,wss=8M"


def start_pair(spawn, tmp_path: Path, *caps: str, **params):
    src = spawn("vmigrate", "--accel", "soft", "-m", "32M", "--mem-path", str(tmp_path / "src.ram"),
                "--guest", GUEST)
    dst = spawn("vmigrate", "--accel", "soft", "-m", "32M", "--mem-path", str(tmp_path / "dst.ram"),
                "--guest", GUEST, "-S", "--incoming", "tcp:127.0.0.1:0")
    for vm in (src, dst):
        vm.set_caps(events=True, **{cap: True for cap in caps})
        if params:
            vm.cmd("migrate-set-parameters", **params)
    wait_for(lambda: (tmp_path / "src.ram").read_bytes()[:8] == MAGIC, 10, "guest start")
    port = dst.migrate_status()["socket-address"][0]["port"]
    return src, dst, f"tcp:127.0.0.1:{port}"


def migrate_both(src, dst, uri: str, passes: int = 5) -> dict:
    info = migrate_in_passes(src, uri, passes)
    assert info["status"] == "completed", info
    assert dst.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    return info


def test_xbzrle_deltas_reproduce_the_guest_exactly(spawn, tmp_path):
    # A 4 MiB cache holds half of the 8 MiB working set: hits, misses and evictions all happen.
    src, dst, uri = start_pair(spawn, tmp_path, "xbzrle", **{"xbzrle-cache-size": 4 * MIB})
    info = migrate_both(src, dst, uri)
    assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")

    ram, cache = info["ram"], info["xbzrle-cache"]
    assert cache["cache-size"] == 4 * MIB
    assert cache["pages"] > 0 and cache["bytes"] > 0 and cache["cache-miss"] > 0
    # The guest rewrites 8 bytes per page: deltas are far smaller than pages.
    assert cache["bytes"] < cache["pages"] * 100
    assert cache["overflow"] == 0
    assert ram["precopy-bytes"] + ram["downtime-bytes"] == ram["transferred"]
    # Every byte on the wire is accounted: the pages' records plus the encoded deltas.
    assert ram["transferred"] > ram["normal"] * 4104 + ram["duplicate"] * 9 + cache["bytes"] - cache["overflow"] * 4096


def test_xbzrle_cache_report_follows_the_capability(spawn, tmp_path):
    """``xbzrle-cache`` is shown while the capability is on at query time, with counters kept."""
    src, dst, uri = start_pair(spawn, tmp_path, "xbzrle", **{"xbzrle-cache-size": 8 * MIB})
    info = migrate_both(src, dst, uri, passes=3)
    assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")
    counters = info["xbzrle-cache"]
    src.set_caps(xbzrle=False)
    assert "xbzrle-cache" not in src.migrate_status()
    src.cmd("migrate-set-parameters", **{"xbzrle-cache-size": 16 * MIB})
    src.set_caps(xbzrle=True)
    shown = src.migrate_status()["xbzrle-cache"]
    assert shown == {**counters, "cache-size": 16 * MIB}


def test_xbzrle_is_not_used_in_the_first_round(spawn, tmp_path):
    """An idle guest is sent in one round: XBZRLE never starts, no cache lookups at all."""
    src = spawn("vmigrate", "--accel", "soft", "-m", "16M", "--mem-path", str(tmp_path / "src.ram"))
    dst = spawn("vmigrate", "--accel", "soft", "-m", "16M", "--mem-path", str(tmp_path / "dst.ram"),
                "-S", "--incoming", "tcp:127.0.0.1:0")
    src.set_caps(xbzrle=True)
    ram = np.memmap(tmp_path / "src.ram", np.uint8, "r+")
    ram[: 4 * MIB] = np.random.default_rng(5).integers(0, 256, 4 * MIB, dtype=np.uint8)
    ram.flush()
    port = dst.migrate_status()["socket-address"][0]["port"]
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration({"completed", "failed"})
    assert info["status"] == "completed"
    assert info["xbzrle-cache"] == {"cache-size": 64 * MIB, "bytes": 0, "pages": 0, "cache-miss": 0,
                                    "cache-miss-rate": 0, "encoding-rate": 0, "overflow": 0}
    assert info["ram"]["normal"] == MIB // 4096 * 4
    dst.wait_migration({"completed"})
    assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")
