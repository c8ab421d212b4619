"""``wait-unplug`` against QEMU 7.2: the events and ``query-migrate`` of a migration whose failover
primary the guest must unplug first (docs/failover.md, docs/qemu/states.md "wait-unplug").

QEMU's guest is played over qtest (qtest_guest.py) and ejects the primary
when the test says so; vmigrate's software guest ejects it after its
``unplug-delay``.  Both run long enough in ``wait-unplug`` for the test to
look at it, and to cancel there.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from qtest_guest import PRIMARY, QtestFailoverQemu  # noqa: E402

WATCHED = ("MIGRATION", "UNPLUG_PRIMARY", "MIGRATION_PASS")
#: How long each side stays in wait-unplug (QEMU: until the test ejects; vmigrate: unplug-delay).
UNPLUG_S = 1.5
DEVICE = f"failover-primary,id={PRIMARY},unplug-delay={int(UNPLUG_S * 1000)}"


@pytest.fixture
def qemu(tmp_path):
    vm = QtestFailoverQemu(tmp_path)
    yield vm
    vm.close()


def start(vm, tmp_path: Path) -> dict:
    """Events on, ``migrate`` to a file; ``query-migrate`` once in wait-unplug."""
    vm.set_caps(events=True)
    vm.events()
    vm.cmd("migrate", uri=f"exec:cat > {tmp_path / 'stream'}")
    return vm.wait_migration({"wait-unplug", "active", "completed", "failed", "cancelled"}, timeout=10)


def watched(vm, until: str, timeout: float = 20.0) -> list[tuple[str, object]]:
    """MIGRATION (status), UNPLUG_PRIMARY (device) and the first MIGRATION_PASS, until MIGRATION *until*."""
    seen: list[tuple[str, object]] = []
    deadline = time.monotonic() + timeout
    while ("MIGRATION", until) not in seen:
        assert time.monotonic() < deadline, f"no MIGRATION {until!r}: {seen}"
        for e in vm.events(0.2):
            data = e.get("data") or {}
            if e["event"] in WATCHED and data.get("pass", 1) == 1:
                seen.append((e["event"], data.get("status", data.get("device-id", data.get("pass")))))
    return seen


def test_wait_unplug_then_active(qemu, spawn, tmp_path):
    ours = spawn("vmigrate", "-m", "16M", "--device", DEVICE)
    answers = {}
    for side, vm in (("qemu", qemu), ("vmigrate", ours)):
        started = time.monotonic()
        answers[side] = [start(vm, tmp_path)]
        if vm is qemu:
            time.sleep(UNPLUG_S)
            qemu.eject()
        info = vm.wait_migration({"completed", "failed", "cancelled"}, timeout=30)
        assert info["status"] == "completed", (side, info)
        answers[side].append(watched(vm, "completed"))
        answers[side].append(info["setup-time"] >= UNPLUG_S * 1000 * 0.9)
        assert time.monotonic() - started >= UNPLUG_S
    assert answers["qemu"][0] == {"status": "wait-unplug"}
    assert answers["qemu"] == answers["vmigrate"]
    assert answers["qemu"][1] == [("MIGRATION", "setup"), ("UNPLUG_PRIMARY", PRIMARY), ("MIGRATION_PASS", 1),
                                  ("MIGRATION", "wait-unplug"), ("MIGRATION", "active"),
                                  ("MIGRATION", "completed")]


def test_cancel_in_wait_unplug_waits_for_the_guest(qemu, spawn, tmp_path):
    ours = spawn("vmigrate", "-m", "16M", "--device", DEVICE)
    answers = {}
    for side, vm in (("qemu", qemu), ("vmigrate", ours)):
        assert start(vm, tmp_path)["status"] == "wait-unplug"
        vm.cmd("migrate_cancel")
        cancelling = vm.migrate_status()
        time.sleep(UNPLUG_S / 3)
        still = vm.migrate_status()["status"]
        if vm is qemu:
            qemu.eject()
        final = vm.wait_migration({"completed", "failed", "cancelled"}, timeout=10)["status"]
        answers[side] = [cancelling["status"], sorted(cancelling), cancelling["setup-time"], still, final,
                         watched(vm, "cancelled")]
    assert answers["qemu"][:5] == ["cancelling",
                                   ["expected-downtime", "ram", "setup-time", "status", "total-time"], 0,
                                   "cancelling", "cancelled"]
    assert answers["qemu"] == answers["vmigrate"]
