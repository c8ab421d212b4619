"""``wait-unplug`` and ``UNPLUG_PRIMARY`` with a failover primary (docs/failover.md).

QEMU 7.2 (migration/migration.c qemu_savevm_wait_unplug, hw/net/virtio-net.c):
the unplug request and its event come before the migration thread, so the
source's sequence is MIGRATION setup, UNPLUG_PRIMARY, MIGRATION wait-unplug,
MIGRATION active; ``query-migrate`` shows only the status while waiting.
"""

from __future__ import annotations

import time

from vmigrate.cli.main import main

PRIMARY = "hostdev0"


def sequence(vm, until: str, seen: list, timeout: float = 20.0) -> list:
    """(event, data) pairs of MIGRATION and UNPLUG_PRIMARY, collected until MIGRATION *until*."""
    deadline = time.monotonic() + timeout
    while not any(name == "MIGRATION" and data["status"] == until for name, data in seen):
        assert time.monotonic() < deadline, f"no MIGRATION {until!r} within {timeout}s: {seen}"
        seen += [(e["event"], e.get("data")) for e in vm.events(0.2)
                 if e["event"] in ("MIGRATION", "UNPLUG_PRIMARY")]
    return seen


def test_primary_unplugged_before_active(spawn, tmp_path):
    src = spawn("vmigrate", "-m", "16M", "--device", f"failover-primary,id={PRIMARY},unplug-delay=600")
    dst = spawn("vmigrate", "-m", "16M", "-S", "-v", "--device", f"failover-primary,id={PRIMARY}",
                "--incoming", "tcp:127.0.0.1:0")
    port = dst.migrate_status()["socket-address"][0]["port"]
    src.set_caps(events=True)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration({"wait-unplug", "active", "completed", "failed"}, timeout=10)
    assert info == {"status": "wait-unplug"}
    assert src.wait_migration({"completed", "failed", "cancelled"}, timeout=30)["status"] == "completed"
    assert dst.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    seen = sequence(src, "completed", [])
    assert seen == [("MIGRATION", {"status": "setup"}), ("UNPLUG_PRIMARY", {"device-id": PRIMARY}),
                    ("MIGRATION", {"status": "wait-unplug"}), ("MIGRATION", {"status": "active"}),
                    ("MIGRATION", {"status": "completed"})]
    # setup-time runs until the thread leaves wait-unplug (QEMU's s->setup_time).
    assert src.migrate_status()["setup-time"] >= 500
    # The destination shows its hidden primary once the standby's state is loaded.
    assert f"failover primary {PRIMARY}: plugged" in dst.log()


def test_cancel_during_wait_unplug_plugs_back(spawn, tmp_path):
    src = spawn("vmigrate", "-m", "16M", "--device", f"failover-primary,id={PRIMARY},unplug-delay=2000")
    src.set_caps(events=True)
    sink = f"exec:cat > {tmp_path / 'stream'}"
    src.cmd("migrate", uri=sink)
    seen = sequence(src, "wait-unplug", [])
    started = time.monotonic()
    src.cmd("migrate_cancel")
    # QEMU waits (up to 30 s) for the guest to finish the unplug it began before it cancels.
    assert src.migrate_status()["status"] == "cancelling"
    assert src.wait_migration({"cancelled", "active", "completed"}, timeout=10)["status"] == "cancelled"
    assert time.monotonic() - started >= 1.0
    seen = sequence(src, "cancelled", seen)
    assert [(n, d.get("status", d.get("device-id"))) for n, d in seen] == [
        ("MIGRATION", "setup"), ("UNPLUG_PRIMARY", PRIMARY), ("MIGRATION", "wait-unplug"),
        ("MIGRATION", "cancelling"), ("MIGRATION", "cancelled")]
    assert src.status() == "running"
    # Plugged back: the next migration asks for the unplug again.
    src.cmd("migrate", uri=sink)
    seen = sequence(src, "wait-unplug", [])
    assert ("UNPLUG_PRIMARY", {"device-id": PRIMARY}) in seen
    src.cmd("migrate_cancel")
    src.wait_migration({"cancelled"}, timeout=10)


def test_no_primary_no_wait_unplug(spawn, tmp_path):
    src = spawn("vmigrate", "-m", "16M")
    src.set_caps(events=True)
    src.cmd("migrate", uri=f"exec:cat > {tmp_path / 'stream'}")
    assert src.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    seen = sequence(src, "completed", [])
    assert seen == [("MIGRATION", {"status": s}) for s in ("setup", "active", "completed")]


def test_bad_device_option(capsys):
    for text in ("failover-primary", "e1000,id=x", "failover-primary,id=x,unplug-delay=z"):
        assert main(["run", "--device", text]) == 1
    assert "unplug-delay" in capsys.readouterr().err


def test_background_snapshot_waits_too(spawn_shm):
    """bg_migration_thread calls qemu_savevm_wait_unplug after its setup as well."""
    spawn, shm = spawn_shm
    src = spawn("vmigrate", "-m", "16M", "--mem-path", str(shm / "src.ram"),
                "--device", f"failover-primary,id={PRIMARY},unplug-delay=300")
    src.set_caps(events=True, **{"background-snapshot": True})
    src.cmd("migrate", uri=f"exec:cat > {shm / 'snapshot.bin'}")
    assert src.wait_migration({"completed", "failed", "cancelled"}, timeout=30)["status"] == "completed"
    assert sequence(src, "completed", []) == [
        ("MIGRATION", {"status": "setup"}), ("UNPLUG_PRIMARY", {"device-id": PRIMARY}),
        ("MIGRATION", {"status": "wait-unplug"}), ("MIGRATION", {"status": "active"}),
        ("MIGRATION", {"status": "completed"})]
