"""Multifd between two vmigrate processes: channels, payload codecs, sync, zero copy, refusals."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from hostile import zstd_rle_frame
from procs import listen_with_data, migrate_in_passes, peak_rss, ram_files_equal
from vmigrate.harness.waiting import wait_for
from vmigrate.migration.wire import multifd as M
from vmigrate.migration.wire import ram as R
from vmigrate.migration.wire import stream as S

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20
HEADER = 1344
GUEST = "stress:rate=100,wss=8M"


def start_pair(spawn, tmp_path: Path, uri: str = "tcp:127.0.0.1:0", src_args=(), dst_args=(), **params):
    src = spawn("vmigrate", "--accel", "soft", "-m", "32M", "--mem-path", str(tmp_path / "src.ram"),
                "--guest", GUEST, *src_args)
    dst = spawn("vmigrate", "--accel", "soft", "-m", "32M", "--mem-path", str(tmp_path / "dst.ram"),
                "--guest", GUEST, "-S", "--incoming", "defer", *dst_args)
    for vm in (src, dst):
        vm.set_caps(events=True, multifd=True)
        if params:
            vm.cmd("migrate-set-parameters", **params)
    return src, dst, listen_with_data(tmp_path / "src.ram", dst, uri, seed=9)


@pytest.mark.parametrize("method,channels", [("none", 2), ("zlib", 3), ("zstd", 2)])
def test_multifd_pages_arrive_through_the_channels(spawn, tmp_path, method, channels):
    src, dst, uri = start_pair(spawn, tmp_path, **{"multifd-channels": channels, "multifd-compression": method})
    info = migrate_in_passes(src, uri, bandwidth=16 * MIB)
    assert info["status"] == "completed", info
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
    assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")
    ram = info["ram"]
    # Pages are counted uncompressed at queue time, plus 1344 bytes per packet header.
    overhead = ram["multifd-bytes"] - ram["normal"] * 4096
    assert overhead > 0 and overhead % HEADER == 0
    # At least one SYNC per channel for the START, every PART and the END section.
    assert overhead // HEADER >= channels * (ram["dirty-sync-count"] + 1)
    assert ram["transferred"] == ram["precopy-bytes"] + ram["downtime-bytes"] + ram["multifd-bytes"]
    assert ram["normal"] > 8 * MIB // 4096


def test_zero_copy_send_on_loopback(spawn, tmp_path):
    """MSG_ZEROCOPY works over TCP; on loopback the kernel copies, so every flush counts as missed."""
    src, dst, uri = start_pair(spawn, tmp_path)
    src.set_caps(**{"zero-copy-send": True})
    info = migrate_in_passes(src, uri, passes=3, bandwidth=16 * MIB)
    assert info["status"] == "completed", info
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
    assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")
    assert info["ram"]["dirty-sync-missed-zero-copy"] > 0


def test_zero_copy_needs_a_socket_that_supports_it(spawn, tmp_path):
    src, dst, uri = start_pair(spawn, tmp_path, uri=f"unix:{tmp_path / 'mig.sock'}")
    src.set_caps(**{"zero-copy-send": True})
    src.cmd("migrate", uri=uri)
    info = src.wait_migration({"completed", "failed"}, timeout=30)
    assert info == {"status": "failed", "error-desc": "Zero copy send feature not detected in host kernel"}
    assert src.status() == "running"


def test_multifd_is_refused_on_exec(spawn, tmp_path):
    """QEMU 7.2 fails in setup with the reason on stderr only (no error-desc)."""
    src = spawn("vmigrate", "--accel", "soft", "-m", "16M")
    src.set_caps(events=True, multifd=True)
    src.cmd("migrate", uri=f"exec:cat > {tmp_path / 'stream.bin'}")
    assert src.wait_migration({"completed", "failed"}, timeout=30) == {"status": "failed"}
    assert "multifd is not supported by current protocol" in src.log()
    assert [e["data"]["status"] for e in src.events() if e["event"] == "MIGRATION"] == ["setup", "failed"]


def test_channel_uuid_must_match_the_destination(spawn, tmp_path):
    src, dst, uri = start_pair(spawn, tmp_path, src_args=("--uuid", "11111111-2222-3333-4444-555555555555"),
                               dst_args=("--uuid", "99999999-2222-3333-4444-555555555555"))
    src.cmd("migrate", uri=uri)
    info = dst.wait_migration({"completed", "failed"}, timeout=30)
    assert info["status"] == "failed"
    assert info["error-desc"] == (
        "failed to receive packet via multifd channel 0: multifd: received uuid "
        "'11111111-2222-3333-4444-555555555555' and expected uuid '99999999-2222-3333-4444-555555555555' "
        "for channel 0")
    assert src.wait_migration({"completed", "failed"}, timeout=30)["status"] == "failed"
    assert src.status() == "running"


def test_cancel_and_a_vanishing_destination_never_hang(spawn, tmp_path):
    """Cancel while channels are blocked on a slow destination, then lose the destination mid-stream."""
    src, dst, uri = start_pair(spawn, tmp_path, **{"multifd-channels": 2})
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 * MIB, "downtime-limit": 1})
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.migrate_status().get("ram", {}).get("multifd-bytes", 0) > 2 * MIB, 20, "multifd traffic")
    src.cmd("migrate_cancel")
    assert src.wait_migration({"cancelled", "failed", "completed"}, timeout=20)["status"] == "cancelled"
    assert src.status() == "running"
    # The destination saw its channels close before a SYNC: a failed migration, not a stuck one.
    info = dst.wait_migration({"failed", "completed"}, timeout=20)
    assert info["status"] == "failed" and info["error-desc"]

    second = tmp_path / "second"
    second.mkdir()
    src2, dst2, uri2 = start_pair(spawn, second, **{"multifd-channels": 3})
    src2.cmd("migrate-set-parameters", **{"max-bandwidth": 4 * MIB, "downtime-limit": 1})
    src2.cmd("migrate", uri=uri2)
    wait_for(lambda: src2.migrate_status().get("ram", {}).get("multifd-bytes", 0) > 2 * MIB, 20, "multifd traffic")
    dst2.proc.kill()
    info = src2.wait_migration({"failed", "completed", "cancelled"}, timeout=30)
    assert info["status"] == "failed" and info["error-desc"]
    assert src2.status() == "running"


def test_destination_without_multifd_refuses_the_channels(spawn, tmp_path):
    """Its capabilities do not allow the extra connections, so it closes them at once (QEMU's
    "Extra incoming migration connection; ignoring"): the source fails on its channels, the
    destination's load fails with it, and no page is silently lost in a 'completed' migration.
    tests/conformance/test_migration_edges.py compares this with QEMU 7.2."""
    src, dst, uri = start_pair(spawn, tmp_path)
    dst.set_caps(multifd=False)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 * MIB})
    src.cmd("migrate", uri=uri)
    info = src.wait_migration({"completed", "failed"}, timeout=60)
    assert info["status"] == "failed", info
    assert info["error-desc"].startswith("Unable to write to socket: "), info
    assert dst.wait_migration({"completed", "failed"}, timeout=30)["status"] == "failed"
    assert "Extra incoming migration connection; ignoring" in dst.log()
    assert src.status() == "running"


def test_a_zstd_bomb_on_a_channel_fails_the_load_in_bounded_memory(spawn, tmp_path):
    """8 KiB of zstd declaring 256 MiB for a one-page packet: the channel fails at once, the load
    with it, the destination's memory stays put and its monitor answers."""
    dst = spawn("vmigrate", "--accel", "soft", "-m", "32M", "-S", "--incoming", "defer")
    dst.set_caps(multifd=True)
    dst.cmd("migrate-set-parameters", **{"multifd-channels": 1, "multifd-compression": "zstd"})
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = int(dst.migrate_status()["socket-address"][0]["port"])
    rss = peak_rss(dst)
    bomb = zstd_rle_frame(2046)
    with socket.create_connection(("127.0.0.1", port)) as main, \
            socket.create_connection(("127.0.0.1", port)) as channel:
        channel.sendall(M.initial_packet(bytes(16), 0))
        channel.sendall(M.packet_header(M.FLAG_ZSTD, 1, len(bomb), 1, "ram", [0]) + bomb)
        main.sendall(S.header() + S.configuration() + S.section_start(2, "ram", 0, 4)
                     + R.mem_size([("ram", 32 * MIB)]) + R.eos() + S.footer(2))
        info = dst.wait_migration({"failed", "completed"}, timeout=30)
    assert info == {"status": "failed", "error-desc": "load of migration failed: multifd 0: packet size "
                                                      "received more than 4096 size expected 4096"}
    assert dst.status() == "inmigrate"
    assert peak_rss(dst) - rss < 64 * MIB


def test_a_failed_channel_fails_the_load_while_the_main_channel_is_idle(spawn, tmp_path):
    """The main channel brings nothing after the section's start (a source waiting for an idle
    channel, say): the channel's error alone ends the load, with its text, at once."""
    dst = spawn("vmigrate", "--accel", "soft", "-m", "32M", "-S", "--incoming", "defer")
    dst.set_caps(multifd=True)
    dst.cmd("migrate-set-parameters", **{"multifd-channels": 1, "multifd-compression": "zstd"})
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = int(dst.migrate_status()["socket-address"][0]["port"])
    bomb = zstd_rle_frame(2046)
    with socket.create_connection(("127.0.0.1", port)) as main, \
            socket.create_connection(("127.0.0.1", port)) as channel:
        channel.sendall(M.initial_packet(bytes(16), 0))
        main.sendall(S.header() + S.configuration() + S.section_start(2, "ram", 0, 4)
                     + R.mem_size([("ram", 32 * MIB)]))
        wait_for(lambda: dst.migrate_status().get("status") == "active", 10, "the load to start")
        channel.sendall(M.packet_header(M.FLAG_ZSTD, 1, len(bomb), 1, "ram", [0]) + bomb)
        info = dst.wait_migration({"failed", "completed"}, timeout=10)
        assert main.recv(1) == b"", "the destination closed the main channel"
    assert info == {"status": "failed", "error-desc": "load of migration failed: multifd 0: packet size "
                                                      "received more than 4096 size expected 4096"}
    assert dst.status() == "inmigrate"
