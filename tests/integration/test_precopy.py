"""Precopy between two vmigrate processes over real sockets.

RAM is file-backed (``--mem-path``) on both sides so the tests read guest
memory directly: the source is frozen in ``postmigrate`` after switchover and
the destination is started with ``-S``, so both files hold the switchover
state and must be byte-equal.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest

from procs import wait_guest_passes, wait_passes
from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import MAGIC
from vmigrate.qmp.client import QMPClientError

MIB = 1 << 20
AB = "ab:end=24M"


def ram(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8)


def guest_counter(path: Path) -> int:
    head = path.read_bytes()[:16]
    assert head[:8] == MAGIC
    return int.from_bytes(head[8:16], "little")


def assert_ab_pattern(path: Path, start: int = 1 * MIB, end: int = 24 * MIB) -> int:
    """Every page's first byte is the pass count or one less: no gap anywhere."""
    mem = ram(path)
    passes = int.from_bytes(mem[8:16].tobytes(), "little")
    column = mem[start:end:4096]
    ok = (column == passes % 256) | (column == (passes - 1) % 256)
    assert ok.all(), f"ab pattern broken at page {int(np.flatnonzero(~ok)[0])} (passes {passes})"
    return passes


def events_of(vm, name: str) -> list:
    return [e.get("data") for e in vm.events() if e["event"] == name]


@pytest.fixture
def pair(spawn, tmp_path):
    """(source running ab, destination -S listening on tcp port 0, uri).

    The destination is started with the same ``--guest``, as a QEMU
    destination is started with the same devices: the workload's code is
    the process's, its state is in the migrated RAM.
    """
    src = spawn("vmigrate", "-m", "64M", "--mem-path", str(tmp_path / "src.ram"), "--guest", AB)
    dst = spawn("vmigrate", "-m", "64M", "--mem-path", str(tmp_path / "dst.ram"), "--guest", AB, "-S",
                "--incoming", "tcp:127.0.0.1:0")
    port = dst.migrate_status()["socket-address"][0]["port"]
    for vm in (src, dst):
        vm.set_caps(events=True)
    wait_guest_passes(tmp_path / "src.ram")
    return src, dst, f"tcp:127.0.0.1:{port}"


def converge(src, dst, uri: str, tmp_path: Path) -> dict:
    """Migrate with a bandwidth limit and a 1 ms downtime limit (several passes, however slow the
    guest), then let it converge."""
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 32 * MIB, "downtime-limit": 1})
    src.cmd("migrate", uri=uri)
    wait_passes(src, 3)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": 60000})
    info = src.wait_migration({"completed", "failed", "cancelled"}, timeout=60)
    assert info["status"] == "completed", info
    dst.wait_migration({"completed", "failed"}, timeout=30)
    return info


def test_live_migration_ram_equal_and_guest_continues(pair, tmp_path):
    src, dst, uri = pair
    info = converge(src, dst, uri, tmp_path)

    assert src.status() == "postmigrate"
    assert dst.status() == "paused"
    assert np.array_equal(ram(tmp_path / "src.ram"), ram(tmp_path / "dst.ram"))
    passes = assert_ab_pattern(tmp_path / "dst.ram")

    stats = info["ram"]
    assert stats["total"] == 64 * MIB
    assert stats["dirty-sync-count"] >= 4
    assert stats["normal"] >= (24 - 1) * MIB // 4096
    assert stats["normal-bytes"] == stats["normal"] * 4096
    assert stats["precopy-bytes"] + stats["downtime-bytes"] == stats["transferred"]
    assert stats["downtime-bytes"] > 0 and stats["remaining"] == 0
    assert info["total-time"] >= info["setup-time"] and info["downtime"] >= 0

    src_events = [(e["event"], e.get("data")) for e in src.events()]
    statuses = [d["status"] for name, d in src_events if name == "MIGRATION"]
    assert statuses == ["setup", "active", "completed"]
    pass_numbers = [d["pass"] for name, d in src_events if name == "MIGRATION_PASS"]
    assert pass_numbers == list(range(1, len(pass_numbers) + 1)) and pass_numbers[-1] == stats["dirty-sync-count"]
    names = [name for name, _ in src_events]
    assert names.index("STOP") < len(names) - 1 - names[::-1].index("MIGRATION_PASS")

    dst_statuses = [d["status"] for d in events_of(dst, "MIGRATION")]
    assert dst_statuses == ["active", "completed"]

    dst.cmd("cont")
    wait_for(lambda: guest_counter(tmp_path / "dst.ram") > passes + 20, 20, "guest progress on the destination")
    dst.cmd("stop")
    assert_ab_pattern(tmp_path / "dst.ram")
    assert guest_counter(tmp_path / "src.ram") == passes, "the source guest must stay frozen"


def test_destination_resumes_guest_without_S(spawn, tmp_path):
    src = spawn("vmigrate", "-m", "32M", "--mem-path", str(tmp_path / "s.ram"), "--guest", "ab:end=8M")
    dst = spawn("vmigrate", "-m", "32M", "--mem-path", str(tmp_path / "d.ram"), "--guest", "ab:end=8M",
                "--incoming", "defer")
    dst.cmd("migrate-incoming", uri=f"unix:{tmp_path / 'mig.sock'}")
    wait_for(lambda: (tmp_path / "s.ram").read_bytes()[:8] == MAGIC, 10, "guest start")
    src.cmd("migrate", uri=f"unix:{tmp_path / 'mig.sock'}")
    assert src.wait_migration({"completed", "failed"})["status"] == "completed"
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
    assert dst.status() == "running"
    before = guest_counter(tmp_path / "d.ram")
    wait_for(lambda: guest_counter(tmp_path / "d.ram") > before + 10, 20, "guest runs on the destination")
    dst.cmd("stop")
    assert_ab_pattern(tmp_path / "d.ram", end=8 * MIB)


def test_paused_source_keeps_runstate(spawn, tmp_path):
    src = spawn("vmigrate", "-m", "16M", "--mem-path", str(tmp_path / "s.ram"), "--guest", "ab:end=4M")
    dst = spawn("vmigrate", "-m", "16M", "--mem-path", str(tmp_path / "d.ram"), "--incoming", "tcp:127.0.0.1:0")
    wait_for(lambda: (tmp_path / "s.ram").read_bytes()[:8] == MAGIC, 10, "guest start")
    src.cmd("stop")
    port = dst.migrate_status()["socket-address"][0]["port"]
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration({"completed", "failed"})["status"] == "completed"
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
    assert dst.status() == "paused"
    assert src.status() == "postmigrate"
    assert np.array_equal(ram(tmp_path / "s.ram"), ram(tmp_path / "d.ram"))
    with pytest.raises(QMPClientError, match="Can't migrate the vm that was paused due to previous migration"):
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")


def test_exec_transport_through_a_file(spawn, tmp_path):
    stream = tmp_path / "stream.bin"
    src = spawn("vmigrate", "-m", "16M", "--mem-path", str(tmp_path / "s.ram"), "--guest", "ab:end=4M")
    wait_for(lambda: (tmp_path / "s.ram").read_bytes()[:8] == MAGIC, 10, "guest start")
    src.cmd("migrate", uri=f"exec:cat > {stream}")
    assert src.wait_migration({"completed", "failed"})["status"] == "completed"
    dst = spawn("vmigrate", "-m", "16M", "--mem-path", str(tmp_path / "d.ram"), "-S", "--incoming", "defer")
    dst.cmd("migrate-incoming", uri=f"exec:cat {stream}")
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
    assert np.array_equal(ram(tmp_path / "s.ram"), ram(tmp_path / "d.ram"))


def test_fd_transport(spawn, tmp_path):
    src = spawn("vmigrate", "-m", "16M", "--mem-path", str(tmp_path / "s.ram"), "--guest", "ab:end=4M")
    dst = spawn("vmigrate", "-m", "16M", "--mem-path", str(tmp_path / "d.ram"), "-S", "--incoming", "defer")
    wait_for(lambda: (tmp_path / "s.ram").read_bytes()[:8] == MAGIC, 10, "guest start")
    a, b = socket.socketpair()
    src.qmp.send_fd(a.fileno())
    src.cmd("getfd", fdname="mig")
    dst.qmp.send_fd(b.fileno())
    dst.cmd("getfd", fdname="mig")
    a.close()
    b.close()
    dst.cmd("migrate-incoming", uri="fd:mig")
    src.cmd("migrate", uri="fd:mig")
    assert src.wait_migration({"completed", "failed"})["status"] == "completed"
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
    assert np.array_equal(ram(tmp_path / "s.ram"), ram(tmp_path / "d.ram"))


def test_cancel_leaves_source_running_with_memory(pair, tmp_path):
    src, dst, uri = pair
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 * MIB})
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.migrate_status()["status"] == "active", 10, "active")
    src.cmd("migrate_cancel")
    assert src.wait_migration({"cancelled", "failed", "completed"}, timeout=20)["status"] == "cancelled"
    assert src.status() == "running"
    statuses = [d["status"] for d in events_of(src, "MIGRATION")]
    assert statuses == ["setup", "active", "cancelling", "cancelled"]
    before = guest_counter(tmp_path / "src.ram")
    wait_for(lambda: guest_counter(tmp_path / "src.ram") > before + 10, 20, "source guest still running")
    src.cmd("stop")
    assert_ab_pattern(tmp_path / "src.ram")
    assert src.migrate_status() == {"status": "cancelled"}


def test_connection_refused_fails_cleanly(spawn, tmp_path):
    src = spawn("vmigrate", "-m", "16M", "--guest", "ab:end=4M")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src.set_caps(events=True)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration({"failed", "completed"}, timeout=20)
    assert info == {"status": "failed", "error-desc": f"Failed to connect to '127.0.0.1:{port}': Connection refused"}
    assert src.status() == "running"
    assert [d["status"] for d in events_of(src, "MIGRATION")] == ["setup", "failed"]


def test_destination_dies_mid_migration(pair, tmp_path):
    src, dst, uri = pair
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 * MIB})
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.migrate_status().get("ram", {}).get("transferred", 0) > 2 * MIB, 20, "transfer")
    dst.proc.kill()
    info = src.wait_migration({"failed", "completed", "cancelled"}, timeout=30)
    assert info["status"] == "failed" and info["error-desc"]
    assert src.status() == "running"
    before = guest_counter(tmp_path / "src.ram")
    wait_for(lambda: guest_counter(tmp_path / "src.ram") > before + 10, 20, "source guest still running")
    src.cmd("stop")
    assert_ab_pattern(tmp_path / "src.ram")


def test_pause_before_switchover(pair, tmp_path):
    src, dst, uri = pair
    src.set_caps(**{"pause-before-switchover": True})
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.migrate_status()["status"] == "pre-switchover", 30, "pre-switchover")
    assert src.status() == "finish-migrate"
    with pytest.raises(QMPClientError, match="Migration is not finalized yet"):
        src.cmd("cont")
    with pytest.raises(QMPClientError, match="Migration not in expected state: pre-switchover"):
        src.cmd("migrate-continue", state="active")
    time.sleep(0.3)
    src.cmd("migrate-continue", state="pre-switchover")
    info = src.wait_migration({"completed", "failed"})
    assert info["status"] == "completed" and info["downtime"] >= 300
    assert [d["status"] for d in events_of(src, "MIGRATION")] == \
        ["setup", "active", "pre-switchover", "device", "completed"]
    dst.wait_migration({"completed"})
    assert np.array_equal(ram(tmp_path / "src.ram"), ram(tmp_path / "dst.ram"))


def test_cancel_in_pre_switchover_restarts_guest(pair, tmp_path):
    src, dst, uri = pair
    src.set_caps(**{"pause-before-switchover": True})
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.migrate_status()["status"] == "pre-switchover", 30, "pre-switchover")
    src.events()
    src.cmd("migrate_cancel")
    assert src.wait_migration({"cancelled", "failed", "completed"})["status"] == "cancelled"
    assert src.status() == "running"
    seq = [(e["event"], (e.get("data") or {}).get("status")) for e in src.events()]
    assert seq == [("MIGRATION", "cancelling"), ("RESUME", None), ("MIGRATION", "cancelled")]


def test_validate_uuid_mismatch_fails_destination(spawn, tmp_path):
    src = spawn("vmigrate", "-m", "16M", "--uuid", "11111111-2222-3333-4444-555555555555")
    dst = spawn("vmigrate", "-m", "16M", "--uuid", "99999999-2222-3333-4444-555555555555",
                "--incoming", "tcp:127.0.0.1:0")
    port = dst.migrate_status()["socket-address"][0]["port"]
    src.set_caps(**{"validate-uuid": True})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = dst.wait_migration({"failed", "completed"})
    assert info["status"] == "failed"
    assert "UUID received is 11111111-2222-3333-4444-555555555555 and local is 99999999" in info["error-desc"]
    assert dst.proc.poll() is None


def test_return_path_reports_destination_failure(spawn, tmp_path):
    """With return-path the source learns the destination's verdict (SHUT) before completing."""
    src = spawn("vmigrate", "-m", "16M", "--mem-path", str(tmp_path / "s.ram"), "--guest", "ab:end=4M",
                "--uuid", "11111111-2222-3333-4444-555555555555")
    good = spawn("vmigrate", "-m", "16M", "--mem-path", str(tmp_path / "d.ram"), "-S", "--incoming", "tcp:127.0.0.1:0")
    src.set_caps(**{"return-path": True, "validate-uuid": True})
    port = good.migrate_status()["socket-address"][0]["port"]
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration({"completed", "failed"})["status"] == "completed"
    assert good.migrate_status()["status"] == "completed"
    assert np.array_equal(ram(tmp_path / "s.ram"), ram(tmp_path / "d.ram"))

    src2 = spawn("vmigrate", "-m", "16M", "--guest", "ab:end=4M")
    bad = spawn("vmigrate", "-m", "32M", "--incoming", "tcp:127.0.0.1:0")
    src2.set_caps(**{"return-path": True})
    port = bad.migrate_status()["socket-address"][0]["port"]
    src2.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src2.wait_migration({"completed", "failed"})
    assert info == {"status": "failed", "error-desc": "RP: Sibling indicated error 1"}
    assert src2.status() == "running"
    assert bad.migrate_status()["status"] == "failed"


def test_yank_fails_a_running_migration(pair, tmp_path):
    src, dst, uri = pair
    assert src.cmd("query-yank") == [{"type": "chardev", "id": "compat_monitor0"}]
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 * MIB})
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.migrate_status()["status"] == "active", 10, "active")
    assert src.cmd("query-yank") == [{"type": "chardev", "id": "compat_monitor0"}, {"type": "migration"}]
    with pytest.raises(QMPClientError, match="Instance not found"):
        src.cmd("yank", instances=[{"type": "block-node", "node-name": "nosuch"}])
    src.cmd("yank", instances=[{"type": "migration"}])
    info = src.wait_migration({"failed", "completed", "cancelled"})
    assert info["status"] == "failed"
    assert src.status() == "running"


def test_max_bandwidth_holds_on_average(spawn):
    """Batches are cut to what the 100 ms window has left, so 16 MiB/s holds (whole 4 MiB batches made 40).

    The guest dirties 64 MiB/s: the migration cannot converge, so it is still active when measured.
    """
    guest = ("-m", "64M", "--guest", "stress:rate=64,wss=32M")
    src = spawn("vmigrate", *guest)
    dst = spawn("vmigrate", *guest, "-S", "--incoming", "tcp:127.0.0.1:0")
    uri = f"tcp:127.0.0.1:{dst.migrate_status()['socket-address'][0]['port']}"
    limit = 16 * MIB
    src.cmd("migrate-set-parameters", **{"max-bandwidth": limit})
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.migrate_status().get("status") == "active", 10, "active")
    time.sleep(0.5)
    samples = []
    for _ in range(2):
        samples.append((time.monotonic(), src.migrate_status()["ram"]["transferred"]))
        time.sleep(2.0)
    (t0, b0), (t1, b1) = samples
    rate = (b1 - b0) / (t1 - t0)
    src.cmd("migrate_cancel")
    src.wait_migration({"cancelled"}, timeout=30)
    assert 0.7 * limit < rate < 1.3 * limit, f"{rate / MIB:.1f} MiB/s under a 16 MiB/s limit"
