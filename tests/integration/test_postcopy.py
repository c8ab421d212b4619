"""Postcopy (``postcopy-ram``, ``migrate-start-postcopy``) between two vmigrate processes.

The scenarios follow docs/qemu/postcopy.md: the switch-over of §3, the
destination's userfaultfd placement and page requests of §4, the source's
service of requests of §5, the states of §8, blocktime of §10 and the
statistics of §11.  Guest RAM lives in files on tmpfs (``/dev/shm``):
userfaultfd registers a shared mapping only when it is shmem (or anonymous),
so a RAM file on disk could not take part in postcopy at all.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from checksum_ref import checksum_reference
from procs import FINAL, migration_statuses, wait_guest_passes, wait_passes
from test_precopy import assert_ab_pattern, ram
from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import MAGIC
from vmigrate.qmp.client import QMPClientError

MIB = 1 << 20
AB = "ab:end=24M"
POSTCOPY = {"postcopy-ram": True}



def header(path: Path) -> np.ndarray:
    """The guest's header words (guest.py: magic, counter, flags, result)."""
    head = path.read_bytes()[:32]
    assert head[:8] == MAGIC, "the guest never initialised its header"
    return np.frombuffer(head, dtype=np.uint64)


def guest_counter(path: Path) -> int:
    return int(header(path)[1])


def start_pair(spawn, shm: Path, guest: str = AB, *dst_args: str, dst_caps: dict | None = None):
    """(source running *guest*, destination listening on tcp port 0, uri), postcopy-ram on both.

    The destination runs the same ``--guest``, as a QEMU destination has the
    same devices: the workload's code is the process's, its state the RAM's.
    """
    src = spawn("vmigrate", "-m", "64M", "--mem-path", str(shm / "src.ram"), "--guest", guest)
    dst = spawn("vmigrate", "-m", "64M", "--mem-path", str(shm / "dst.ram"), "--guest", guest, *dst_args,
                "--incoming", "tcp:127.0.0.1:0")
    port = dst.migrate_status()["socket-address"][0]["port"]
    src.set_caps(events=True, **POSTCOPY)
    dst.set_caps(events=True, **(POSTCOPY if dst_caps is None else dst_caps))
    if guest != "idle":  # the idle guest writes no header
        wait_guest_passes(shm / "src.ram")
    return src, dst, f"tcp:127.0.0.1:{port}"


def postcopy(src, dst, uri: str, after: float = 1.0, **params: int) -> tuple[dict, dict]:
    """Migrate under *params* (bandwidths precopy cannot finish under), switch to postcopy
    after *after* s; (source's, destination's) final ``query-migrate``."""
    src.cmd("migrate-set-parameters", **params)
    src.cmd("migrate", uri=uri)
    time.sleep(after)
    assert src.migrate_status()["status"] == "active", "precopy must still be running at the switch"
    src.cmd("migrate-start-postcopy")
    info = src.wait_migration(FINAL, timeout=20)
    assert info["status"] == "completed", info
    return info, dst.wait_migration(FINAL, timeout=10)


def test_postcopy_to_paused_destination(spawn_shm):
    """The §3 switch-over with a ``-S`` destination: nothing faults, every page arrives by the
    background scan, both files hold the switch-over state, the guest resumes intact."""
    spawn, shm = spawn_shm
    src, dst, uri = start_pair(spawn, shm, AB, "-S")
    info, dinfo = postcopy(src, dst, uri, **{"max-bandwidth": 8 * MIB})

    assert dinfo["status"] == "completed", dinfo
    assert migration_statuses(src, "completed") == ["setup", "active", "postcopy-active", "completed"]
    assert migration_statuses(dst, "completed") == ["active", "postcopy-active", "completed"]
    assert src.status() == "postmigrate"
    assert dst.status() == "paused"
    assert np.array_equal(ram(shm / "src.ram"), ram(shm / "dst.ram"))
    passes = assert_ab_pattern(shm / "dst.ram")

    stats = info["ram"]
    assert stats["postcopy-bytes"] > 0, stats
    assert stats["precopy-bytes"] + stats["downtime-bytes"] + stats["postcopy-bytes"] == stats["transferred"]
    assert stats["remaining"] == 0

    dst.cmd("cont")
    wait_for(lambda: guest_counter(shm / "dst.ram") > passes + 20, 15, "guest progress on the destination")
    dst.cmd("stop")
    assert_ab_pattern(shm / "dst.ram")
    assert guest_counter(shm / "src.ram") == passes, "the source guest must stay frozen"


@pytest.mark.parametrize("preempt", [False, True], ids=["main-channel", "preempt"])
def test_running_destination_faults_pages_from_source(spawn_shm, preempt):
    """Without ``-S`` the destination guest runs from POSTCOPY_RUN on while the background scan is
    held to 8 MiB/s: its accesses to missing pages fault and become page requests (§4.3, §5),
    answered on the main channel or, with ``postcopy-preempt``, on the second one (§6)."""
    spawn, shm = spawn_shm
    src, dst, uri = start_pair(spawn, shm)
    if preempt:
        for vm in (src, dst):
            vm.set_caps(**{"postcopy-preempt": True})
    info, dinfo = postcopy(src, dst, uri, **{"max-bandwidth": 8 * MIB, "max-postcopy-bandwidth": 8 * MIB})

    assert dinfo["status"] == "completed", dinfo
    assert info["ram"]["postcopy-requests"] > 0, info["ram"]
    latency = dinfo["x-vmigrate-page-latency"]
    assert 0 < latency["requests"] <= info["ram"]["postcopy-requests"], (latency, info["ram"])
    assert 0 < latency["p50-ms"] <= latency["p99-ms"] <= latency["max-ms"], latency
    assert migration_statuses(src, "completed") == ["setup", "active", "postcopy-active", "completed"]
    assert src.status() == "postmigrate"
    frozen = guest_counter(shm / "src.ram")

    assert dst.status() == "running"
    start = guest_counter(shm / "dst.ram")
    wait_for(lambda: guest_counter(shm / "dst.ram") > start + 20, 15, "guest progress on the destination")
    dst.cmd("stop")
    passes = assert_ab_pattern(shm / "dst.ram")
    assert passes > frozen
    assert guest_counter(shm / "src.ram") == frozen, "the source guest must stay frozen"


@pytest.mark.parametrize("smp", [1, 2])
def test_blocktime_reported_per_vcpu(spawn_shm, smp):
    """``postcopy-blocktime`` on the destination (§10): after completion its ``query-migrate``
    reports the total and one value per vCPU."""
    spawn, shm = spawn_shm
    src, dst, uri = start_pair(spawn, shm, AB, "--smp", str(smp),
                               dst_caps={**POSTCOPY, "postcopy-blocktime": True})
    _, dinfo = postcopy(src, dst, uri, **{"max-bandwidth": 8 * MIB, "max-postcopy-bandwidth": 8 * MIB})

    assert dinfo["status"] == "completed", dinfo
    assert isinstance(dinfo["postcopy-blocktime"], int) and dinfo["postcopy-blocktime"] >= 0
    per_vcpu = dinfo["postcopy-vcpu-blocktime"]
    assert len(per_vcpu) == smp and all(isinstance(ms, int) and ms >= 0 for ms in per_vcpu), per_vcpu


def test_checksum_guest_finishes_on_destination(spawn_shm):
    """A computation interrupted by the switch-over finishes on the running destination with the
    result of tests/checksum_ref.py: every page it reads was either sent or faulted in intact."""
    spawn, shm = spawn_shm
    words, rounds = 8 * MIB // 8, 2000
    guest = f"checksum:size=8M,rounds={rounds}"
    src, dst, uri = start_pair(spawn, shm, guest)
    wait_for(lambda: guest_counter(shm / "src.ram") > 10, 10, "the computation to be under way")
    info, dinfo = postcopy(src, dst, uri, after=0.5,
                           **{"max-bandwidth": 8 * MIB, "max-postcopy-bandwidth": 8 * MIB})

    assert dinfo["status"] == "completed", dinfo
    assert info["ram"]["postcopy-requests"] > 0, info["ram"]
    interrupted = guest_counter(shm / "src.ram")
    assert interrupted < rounds, "the source must not have finished by itself"
    assert guest_counter(shm / "dst.ram") >= interrupted, "the destination continues, not restarts"
    wait_for(lambda: guest_counter(shm / "dst.ram") == rounds + 1, 15, "the result on the destination")
    assert int(header(shm / "dst.ram")[3]) == checksum_reference(words, rounds)


def test_start_postcopy_errors_match_qemu(spawn_shm):
    """``migrate-start-postcopy``'s refusals are QEMU's (migration.c qmp_migrate_start_postcopy),
    and after a completed migration with the capability it is accepted and does nothing."""
    spawn, shm = spawn_shm
    src, dst, uri = start_pair(spawn, shm, "idle", "-S")

    with pytest.raises(QMPClientError) as err:
        src.cmd("migrate-start-postcopy")
    assert (err.value.cls, err.value.desc) == \
        ("GenericError", "Postcopy must be started after migration has been started")

    src.set_caps(**{"postcopy-ram": False})
    with pytest.raises(QMPClientError) as err:
        src.cmd("migrate-start-postcopy")
    assert (err.value.cls, err.value.desc) == \
        ("GenericError", "Enable postcopy with migrate_set_capability before the start of migration")

    src.set_caps(**POSTCOPY)
    src.cmd("migrate", uri=uri)
    assert src.wait_migration(FINAL, timeout=15)["status"] == "completed"
    assert src.cmd("migrate-start-postcopy") == {}
    assert dst.wait_migration(FINAL, timeout=10)["status"] == "completed"


def test_destination_without_postcopy_rejects_advise(spawn_shm):
    """A source with ``postcopy-ram`` sends a 16-byte POSTCOPY_ADVISE (§2); a destination without
    the capability fails the load with QEMU's message, and the source, still in precopy, fails
    and restarts its guest."""
    spawn, shm = spawn_shm
    src, dst, uri = start_pair(spawn, shm, AB, "-S", dst_caps={})
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 * MIB})
    src.cmd("migrate", uri=uri)

    info = src.wait_migration(FINAL, timeout=15)
    assert info["status"] == "failed", info
    # vmigrate's destination, unlike QEMU's, stays up in ``failed`` (incoming.py).
    dinfo = dst.wait_migration(FINAL, timeout=10)
    assert dinfo["status"] == "failed"
    assert "RAM postcopy is disabled but have 16 byte advise" in dinfo["error-desc"], dinfo
    assert src.status() == "running"
    start = guest_counter(shm / "src.ram")
    wait_for(lambda: guest_counter(shm / "src.ram") > start + 5, 10, "the source guest to keep running")



def test_release_ram_frees_the_source_as_pages_go(spawn_shm):
    """``release-ram`` (§9): once in postcopy a sent page is freed on the source, so its RAM file
    ends up mostly holes, while the destination has every page."""
    spawn, shm = spawn_shm
    src, dst, uri = start_pair(spawn, shm, AB, "-S")
    src.set_caps(**{"release-ram": True})
    before = (shm / "src.ram").stat().st_blocks * 512
    info, dinfo = postcopy(src, dst, uri, **{"max-bandwidth": 8 * MIB})

    assert dinfo["status"] == "completed", dinfo
    assert info["ram"]["postcopy-bytes"] > 0
    after = (shm / "src.ram").stat().st_blocks * 512
    assert after < before // 4, (before, after)
    assert_ab_pattern(shm / "dst.ram")


def test_query_migrate_forecasts_that_precopy_cannot_converge(spawn_shm):
    """Beyond QEMU: ``x-vmigrate-forecast`` in ``query-migrate`` says, from the measured rates,
    that a guest dirtying faster than the link carries will never converge; postcopy then does."""
    spawn, shm = spawn_shm
    src, dst, uri = start_pair(spawn, shm, "stress:rate=64,wss=32M,tick=5")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 * MIB})
    src.cmd("migrate", uri=uri)
    wait_passes(src, 3, timeout=30)
    # The rates are averaged over the windows: the first pass's estimate gives way within seconds.
    wait_for(lambda: not src.migrate_status()["x-vmigrate-forecast"]["converges"], 15, "the forecast to settle")
    forecast = src.migrate_status()["x-vmigrate-forecast"]
    assert forecast["converges"] is False and "seconds" not in forecast, forecast
    assert forecast["dirty-rate"] >= forecast["bandwidth"] > 0, forecast
    src.cmd("migrate-start-postcopy")
    assert src.wait_migration(FINAL, timeout=30)["status"] == "completed"
    assert "x-vmigrate-forecast" not in src.migrate_status()


def test_max_postcopy_bandwidth_applies_at_once(spawn_shm):
    """Like QEMU, a new ``max-postcopy-bandwidth`` re-arms the limiter of a migration already in
    postcopy: at 1 MiB/s the rest would take half a minute, unlimited it takes moments."""
    spawn, shm = spawn_shm
    src, dst, uri = start_pair(spawn, shm, AB, "-S")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 * MIB, "max-postcopy-bandwidth": 1 * MIB})
    src.cmd("migrate", uri=uri)
    time.sleep(0.5)
    src.cmd("migrate-start-postcopy")
    wait_for(lambda: src.migrate_status()["status"] == "postcopy-active", 10, "postcopy")
    time.sleep(0.5)
    assert src.migrate_status()["ram"]["remaining"] > 16 * MIB
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    assert src.wait_migration(FINAL, timeout=5)["status"] == "completed"
    assert_ab_pattern(shm / "dst.ram")


def test_anonymous_destination_ram_faults_too(spawn_shm):
    """A destination without ``--mem-path`` (private anonymous RAM, the other memory type
    userfaultfd serves) runs its guest through postcopy; a second, precopy hop to a file-backed
    VM then shows its RAM: the ab pattern unbroken, the guest further than the first source."""
    spawn, shm = spawn_shm
    src = spawn("vmigrate", "-m", "64M", "--mem-path", str(shm / "src.ram"), "--guest", AB)
    mid = spawn("vmigrate", "-m", "64M", "--guest", AB, "--incoming", "tcp:127.0.0.1:0")
    port = mid.migrate_status()["socket-address"][0]["port"]
    for vm in (src, mid):
        vm.set_caps(**POSTCOPY)
    wait_for(lambda: (shm / "src.ram").read_bytes()[:8] == MAGIC, 10, "guest start")
    info, minfo = postcopy(src, mid, f"tcp:127.0.0.1:{port}",
                           **{"max-bandwidth": 8 * MIB, "max-postcopy-bandwidth": 8 * MIB})
    assert minfo["status"] == "completed" and info["ram"]["postcopy-requests"] > 0, (minfo, info["ram"])
    frozen = guest_counter(shm / "src.ram")

    last = spawn("vmigrate", "-m", "64M", "--mem-path", str(shm / "last.ram"), "--guest", AB, "-S",
                 "--incoming", "tcp:127.0.0.1:0")
    port = last.migrate_status()["socket-address"][0]["port"]
    last.set_caps(**POSTCOPY)
    mid.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert mid.wait_migration(FINAL, timeout=30)["status"] == "completed"
    assert last.wait_migration(FINAL, timeout=10)["status"] == "completed"
    assert assert_ab_pattern(shm / "last.ram") > frozen
