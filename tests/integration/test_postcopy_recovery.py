"""Postcopy pause and recovery between two vmigrate processes (docs/qemu/postcopy.md §7).

A broken stream in postcopy-active does not fail the migration: both sides
go ``postcopy-paused`` (§7.1), the destination listens again on
``migrate-recover``, the source reconnects with ``migrate resume=true``, and
the RECV_BITMAP / POSTCOPY_RESUME / RESUME_ACK handshake (§7.2) resends
exactly what the destination lacks.  The destination guest (``ab``) runs
throughout, so its faults and the ab pattern show that no page was lost or
left stale across the pauses.  RAM files are on tmpfs (``/dev/shm``):
userfaultfd registers a shared mapping only when it is shmem.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from procs import FINAL, migration_statuses, wait_guest_passes, wait_status
from test_postcopy import guest_counter
from test_precopy import assert_ab_pattern
from vmigrate.harness.waiting import wait_for
from vmigrate.qmp.client import QMPClientError

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20
#: Most of the 64 MiB written every pass: zero pages cost the source next to nothing, so the
#: pages still to send after three pause cycles (about 6 MB each, background and requested
#: pages together) must be guest data, or a fast host finishes before the third pause.
AB = "ab:end=56M"
POSTCOPY = {"postcopy-ram": True}
#: Slow enough that the guest's window is still arriving after three pauses.
SLOW = {"max-bandwidth": 8 * MIB, "max-postcopy-bandwidth": 4 * MIB}
CYCLE = ["postcopy-paused", "postcopy-recover", "postcopy-active"]
#: The destination's ``setup`` comes from ``migrate-recover``: QEMU emits it unconditionally.
DST_CYCLE = ["postcopy-paused", "setup", "postcopy-recover", "postcopy-active"]







class Statuses:
    """MIGRATION event statuses per VM, accumulated (``events()`` drains what it returns)."""

    def __init__(self) -> None:
        self._seen: dict[int, list[str]] = {}

    def __call__(self, vm, until: str) -> list[str]:
        """Everything so far, once *until*'s event has come (it may trail ``query-migrate``)."""
        seen = self._seen.setdefault(id(vm), [])
        if until not in seen[-1:]:
            seen += migration_statuses(vm, until)
        return list(seen)


def port_of(vm) -> int:
    return vm.migrate_status()["socket-address"][0]["port"]


def start_pair(spawn, shm: Path, guest: str = AB):
    """(source running *guest*, destination running the same guest code and listening, uri)."""
    src = spawn("vmigrate", "-m", "64M", "--mem-path", str(shm / "src.ram"), "--guest", guest)
    dst = spawn("vmigrate", "-m", "64M", "--mem-path", str(shm / "dst.ram"), "--guest", guest,
                "--incoming", "tcp:127.0.0.1:0")
    for vm in (src, dst):
        vm.set_caps(events=True, **POSTCOPY)
    if guest != "idle":
        wait_guest_passes(shm / "src.ram")
    return src, dst, f"tcp:127.0.0.1:{port_of(dst)}"


def into_postcopy(src, dst, uri: str, after: float = 1.0, **caps: bool) -> None:
    """Migrate at :data:`SLOW`, switch to postcopy after *after* s, wait for postcopy-active on
    both sides: a destination that has not yet run the switch-over fails on a broken stream
    instead of pausing (§7.1: only while its postcopy state is RUNNING)."""
    if caps:
        src.set_caps(**caps)
    src.cmd("migrate-set-parameters", **SLOW)
    src.cmd("migrate", uri=uri)
    time.sleep(after)
    assert src.migrate_status()["status"] == "active", "precopy must still be running at the switch"
    src.cmd("migrate-start-postcopy")
    wait_for(lambda: src.migrate_status()["status"] == "postcopy-active", 10, "postcopy-active")
    wait_for(lambda: dst.migrate_status()["status"] == "postcopy-active", 10, "dst postcopy-active")


def pause(by, src, dst) -> None:
    """``migrate-pause`` on *by*; both sides end up ``postcopy-paused`` (§7.1)."""
    by.cmd("migrate-pause")
    for vm, name in ((src, "source"), (dst, "destination")):
        wait_status(vm, "postcopy-paused", 10, name)


def recover(src, dst) -> None:
    """``migrate-recover`` on a fresh port, then ``migrate resume=true`` to it (§7.2)."""
    dst.cmd("migrate-recover", uri="tcp:127.0.0.1:0")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port_of(dst)}", resume=True)


def free_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
def test_three_pause_recover_cycles(spawn_shm, preempt):
    """Three pauses in one postcopy migration, issued alternately on the source and the
    destination (§7.1), each followed by the §7.2 handshake; the states are QEMU's (§8), no page
    goes missing (ab pattern) and the destination guest runs on.

    The running ab guest touches its whole window every pass, so while paused it blocks on a
    missing page; it is checked alive after each recovery and advancing after completion.
    """
    spawn, shm = spawn_shm
    src, dst, uri = start_pair(spawn, shm)
    dst.set_caps(**{"postcopy-preempt": preempt})
    seen = Statuses()
    into_postcopy(src, dst, uri, **{"postcopy-preempt": preempt})

    remaining = []
    for i in range(3):
        wait_for(lambda: src.migrate_status()["status"] == "postcopy-active", 10, "postcopy-active")
        wait_for(lambda: dst.migrate_status()["status"] == "postcopy-active", 10, "dst postcopy-active")
        time.sleep(0.7)
        pause(src if i % 2 == 0 else dst, src, dst)
        assert dst.status() == "running", "a pause stops the stream, not the destination guest"
        remaining.append(src.migrate_status()["ram"]["remaining"])
        recover(src, dst)
        wait_for(lambda: src.migrate_status()["status"] in {"postcopy-active", "completed"}, 10, "resumed")
        assert dst.proc.poll() is None and dst.status() == "running"
    assert remaining[0] > remaining[1] > remaining[2] > 0, f"progress between the pauses: {remaining}"

    info = src.wait_migration(FINAL, timeout=40)
    assert info["status"] == "completed", info
    dinfo = dst.wait_migration(FINAL, timeout=10)
    assert dinfo["status"] == "completed", dinfo
    assert info["ram"]["postcopy-requests"] > 0, info["ram"]
    assert seen(src, "completed") == ["setup", "active", "postcopy-active", *CYCLE * 3, "completed"]
    assert seen(dst, "completed") == ["active", "postcopy-active", *DST_CYCLE * 3, "completed"]
    assert src.status() == "postmigrate"
    frozen = guest_counter(shm / "src.ram")

    start = guest_counter(shm / "dst.ram")
    wait_for(lambda: guest_counter(shm / "dst.ram") > start + 20, 15, "guest progress after completion")
    dst.cmd("stop")
    passes = assert_ab_pattern(shm / "dst.ram")
    assert passes > frozen
    dst.cmd("cont")
    wait_for(lambda: guest_counter(shm / "dst.ram") > passes + 10, 15, "guest progress after cont")
    assert guest_counter(shm / "src.ram") == frozen, "the source guest must stay frozen"


def expect_error(vm, desc: str, name: str, **args) -> None:
    with pytest.raises(QMPClientError) as err:
        vm.cmd(name, **args)
    assert (err.value.cls, err.value.desc) == ("GenericError", desc)


def test_recovery_qmp_errors_match_qemu(spawn_shm):
    """The refusals of migrate-pause, migrate-recover and migrate resume=true outside a paused
    postcopy are QEMU 7.2's texts (migration.c qmp_migrate_pause, qmp_migrate_recover,
    migrate_prepare), before, during and after a migration."""
    spawn, shm = spawn_shm
    src, dst, uri = start_pair(spawn, shm)
    port = free_port()
    pause_err = "migrate-pause is currently only supported during postcopy-active state"
    recover_err = "Migrate recover can only be run when postcopy is paused."
    resume_err = "Cannot resume if there is no paused migration"

    # Before anything: nothing in postcopy on either side.
    for vm in (src, dst):
        expect_error(vm, pause_err, "migrate-pause")
    expect_error(dst, recover_err, "migrate-recover", uri="tcp:127.0.0.1:0")
    expect_error(src, resume_err, "migrate", uri=f"tcp:127.0.0.1:{port}", resume=True)

    # Precopy: still not postcopy, not paused.
    src.cmd("migrate-set-parameters", **SLOW)
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.migrate_status()["status"] == "active", 10, "precopy")
    for vm in (src, dst):
        expect_error(vm, pause_err, "migrate-pause")
    expect_error(dst, recover_err, "migrate-recover", uri="tcp:127.0.0.1:0")
    expect_error(src, resume_err, "migrate", uri=f"tcp:127.0.0.1:{port}", resume=True)

    # Postcopy-active: paused is what recover and resume need.
    src.cmd("migrate-start-postcopy")
    wait_for(lambda: dst.migrate_status()["status"] == "postcopy-active", 10, "postcopy-active")
    expect_error(dst, recover_err, "migrate-recover", uri="tcp:127.0.0.1:0")
    expect_error(src, resume_err, "migrate", uri=f"tcp:127.0.0.1:{port}", resume=True)

    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    assert src.wait_migration(FINAL, timeout=30)["status"] == "completed"
    assert dst.wait_migration(FINAL, timeout=10)["status"] == "completed"
    for vm in (src, dst):
        expect_error(vm, pause_err, "migrate-pause")
    expect_error(dst, recover_err, "migrate-recover", uri="tcp:127.0.0.1:0")
    expect_error(src, resume_err, "migrate", uri=f"tcp:127.0.0.1:{port}", resume=True)


def test_resume_refused_with_release_ram(spawn_shm):
    """A paused source whose migration has ``release-ram`` refuses ``resume`` (§7.2 step 2:
    pages already sent would be gone) and stays paused.

    Capabilities cannot change while a migration runs (paused included, as in QEMU), so
    release-ram is set before ``migrate``.
    """
    spawn, shm = spawn_shm
    src, dst, uri = start_pair(spawn, shm)
    into_postcopy(src, dst, uri, **{"release-ram": True})
    pause(src, src, dst)
    dst.cmd("migrate-recover", uri="tcp:127.0.0.1:0")
    expect_error(src, "Postcopy recovery cannot work when release-ram capability is set",
                 "migrate", uri=f"tcp:127.0.0.1:{port_of(dst)}", resume=True)
    assert src.migrate_status()["status"] == "postcopy-paused"
    src.cmd("migrate_cancel")
    assert src.wait_migration(FINAL, timeout=10)["status"] == "cancelled"


def test_cancel_paused_source(spawn_shm):
    """``migrate_cancel`` on a paused source ends it ``cancelled`` with its guest stopped in
    ``postmigrate``: the destination guest has run since the switch-over, so restarting the
    source's would run the guest in two places."""
    spawn, shm = spawn_shm
    src, dst, uri = start_pair(spawn, shm)
    seen = Statuses()
    into_postcopy(src, dst, uri)
    time.sleep(0.5)
    pause(dst, src, dst)
    frozen = guest_counter(shm / "src.ram")

    src.cmd("migrate_cancel")
    assert src.wait_migration(FINAL, timeout=10)["status"] == "cancelled"
    assert seen(src, "cancelled") == ["setup", "active", "postcopy-active", "postcopy-paused", "cancelling", "cancelled"]
    assert src.status() == "postmigrate"
    time.sleep(0.5)
    assert guest_counter(shm / "src.ram") == frozen, "the source guest must not run again"
    assert dst.migrate_status()["status"] == "postcopy-paused", "the destination waits for a recovery"


def test_resume_to_dead_port_stays_paused(spawn_shm):
    """A ``resume`` whose connection fails leaves the source ``postcopy-paused`` (QEMU's
    migrate_fd_error cannot move it out of PAUSED), and a later resume to the destination's
    ``migrate-recover`` port completes (§7.2)."""
    spawn, shm = spawn_shm
    src, dst, uri = start_pair(spawn, shm)
    seen = Statuses()
    into_postcopy(src, dst, uri)
    time.sleep(0.5)
    pause(src, src, dst)
    dst.cmd("migrate-recover", uri="tcp:127.0.0.1:0")

    src.cmd("migrate", uri=f"tcp:127.0.0.1:{free_port()}", resume=True)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert src.migrate_status()["status"] == "postcopy-paused"
        time.sleep(0.05)
    assert seen(src, "postcopy-paused") == ["setup", "active", "postcopy-active", "postcopy-paused"]

    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port_of(dst)}", resume=True)
    assert src.wait_migration(FINAL, timeout=30)["status"] == "completed"
    assert dst.wait_migration(FINAL, timeout=10)["status"] == "completed"
    assert seen(src, "completed") == ["setup", "active", "postcopy-active", *CYCLE, "completed"]
    assert seen(dst, "completed") == ["active", "postcopy-active", *DST_CYCLE, "completed"]
    dst.cmd("stop")
    assert_ab_pattern(shm / "dst.ram")
