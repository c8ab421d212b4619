"""Postcopy between real QEMU 7.2 and vmigrate, in both directions and through a QEMU in the middle.

docs/qemu/postcopy.md has the protocol these tests hold vmigrate to: the
ADVISE/DISCARD/PACKAGED switch-over (§3), the destination's placement and
page requests (§4), the source's service of them (§5).  The RAM files are
on tmpfs (the ``ramdir`` fixture): userfaultfd registers shared memory only
when it is shmem, on either implementation.
"""

from __future__ import annotations

import time

import pytest

from checksum_ref import checksum_reference
from procs import migration_statuses
from machines import FINAL, Machine, Machines
from ramfile import fill_pattern, first_difference, pages
from vmigrate.harness.waiting import wait_for

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
POSTCOPY = {"postcopy-ram": True}


def port_uri(dst: Machine) -> str:
    return f"tcp:127.0.0.1:{dst.vm.migrate_status()['socket-address'][0]['port']}"


def statuses(machine: Machine, until: str = "completed") -> list[str]:
    return migration_statuses(machine.vm, until)


def postcopy(src: Machine, dst: Machine, after: float = 1.0, **params: int) -> dict:
    """Migrate *src* to the listening *dst* under *params*, switch to postcopy after *after* s;
    the source's final ``query-migrate`` once both sides completed."""
    src.vm.cmd("migrate-set-parameters", **params)
    src.vm.cmd("migrate", uri=port_uri(dst))
    time.sleep(after)
    assert src.vm.migrate_status()["status"] == "active", "precopy must still be running at the switch"
    src.vm.cmd("migrate-start-postcopy")
    info = src.vm.wait_migration(FINAL, timeout=20)
    assert info["status"] == "completed", info
    dst.require_alive()
    dinfo = dst.vm.wait_migration(FINAL, timeout=10)
    assert dinfo["status"] == "completed", dinfo
    return info


def header(machine: Machine) -> list[int]:
    """The vmigrate guest header words (magic, counter, flags, result) from the RAM file."""
    return [int(w) for w in pages(machine.ram, machine.size)[0, :32].view("<u8")]


@pytest.mark.parametrize("caps", [{}, {"postcopy-preempt": True}, {"compress": True}],
                         ids=["plain", "preempt", "compress"])
@pytest.mark.parametrize("src_kind,dst_kind", [("qemu", "vmigrate"), ("vmigrate", "qemu")])
def test_plain_postcopy(machines: Machines, src_kind: str, dst_kind: str, caps: dict) -> None:
    """A random RAM pattern precopy cannot finish at 8 MiB/s in 1 s: the rest goes in postcopy
    (with the preempt channel, or compressed pages placed whole, §1, §6), to a destination
    that runs (QEMU ``-M none`` and the idle guest touch no RAM, so the files must end
    byte-equal)."""
    src = machines.start(src_kind, "64M", *(("--guest", "idle") if src_kind == "vmigrate" else ()))
    fill_pattern(src.ram, src.size, seed=21, random_pages=8000)
    dst = machines.start(dst_kind, "64M", "-incoming", "tcp:127.0.0.1:0",
                         *(("--guest", "idle") if dst_kind == "vmigrate" else ()))
    for m in (src, dst):
        m.vm.set_caps(**POSTCOPY, **caps)

    info = postcopy(src, dst, **{"max-bandwidth": 8 * MIB, "max-postcopy-bandwidth": 8 * MIB})

    assert statuses(src) == ["setup", "active", "postcopy-active", "completed"]
    assert statuses(dst) == ["active", "postcopy-active", "completed"]
    assert info["ram"]["postcopy-bytes"] > 0, info["ram"]
    assert src.vm.status() == "postmigrate"
    assert dst.vm.status() == "running"
    assert first_difference(src.ram, dst.ram, src.size) is None


@pytest.mark.parametrize("preempt", [False, True], ids=["main-channel", "preempt"])
def test_vmigrate_destination_faults_from_qemu_source(machines: Machines, preempt: bool) -> None:
    """vmigrate -> QEMU -> vmigrate, postcopy both times: the last hop's running ``checksum`` guest
    faults on pages the QEMU source (which holds the RAM but runs nothing) must serve (§4.3, §5);
    with ``postcopy-preempt`` they come on the second channel (§6).

    QEMU ``-M none`` has no vCPU, so only the vmigrate guest can raise page
    requests; the result equal to tests/checksum_ref.py proves each served
    page arrived intact, including the header and the guest's progress in it.
    """
    rounds = 2000
    guest = ("--guest", f"checksum:size=8M,rounds={rounds}")
    first = machines.vmigrate("64M", *guest)
    wait_for(lambda: first.ram.read_bytes()[:8] == b"VMIGRATE" and header(first)[1] > 10, 10,
             "the computation to be under way")
    middle = machines.qemu("64M", "-incoming", "tcp:127.0.0.1:0")
    caps = {**POSTCOPY, "postcopy-preempt": preempt}
    for m in (first, middle):
        m.vm.set_caps(**caps)
    postcopy(first, middle, after=0.5, **{"max-bandwidth": 8 * MIB})
    interrupted = header(first)[1]
    assert interrupted < rounds, "the first source must not have finished by itself"
    assert middle.vm.status() == "running"
    assert first_difference(first.ram, middle.ram, first.size) is None, "QEMU holds the frozen state"

    last = machines.vmigrate("64M", *guest, "--incoming", "tcp:127.0.0.1:0")
    last.vm.set_caps(**caps)
    info = postcopy(middle, last, after=0.3, **{"max-bandwidth": 8 * MIB, "max-postcopy-bandwidth": 4 * MIB})

    assert header(last)[1] >= interrupted, "the last guest continues the computation, not restarts it"
    assert info["ram"]["postcopy-requests"] > 0, info["ram"]
    assert migration_statuses(middle.vm, "completed", times=2)[-3:] == ["active", "postcopy-active", "completed"]
    wait_for(lambda: header(last)[1] == rounds + 1, 15, "the result on the last destination")
    assert header(last)[3] == checksum_reference(8 * MIB // 8, rounds)
