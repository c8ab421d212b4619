"""XBZRLE between vmigrate and real QEMU 7.2.

vmigrate → QEMU is the direction that exercises deltas: a vmigrate guest
re-dirties its working set under a low bandwidth, so after the first round
pages go out as XBZRLE records that QEMU applies onto its current page
contents.  A QEMU ``-M none`` source has no vCPU to re-dirty its RAM, so
QEMU → vmigrate only shows the first-round rule (no XBZRLE before the scan
wrapped) and the shape of QEMU's ``xbzrle-cache`` report, compared with
vmigrate's.
"""

from __future__ import annotations

import pytest

from machines import Machine, Machines, converge_after_passes
from ramfile import fill_garbage, fill_pattern, first_difference, pages
from transport import Transport, migrate
from vmigrate.harness.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

SIZE = "64M"
MIB = 1 << 20


@pytest.mark.parametrize("guest,cache", [
    # 8 bytes rewritten per page: small deltas; the cache holds half the working set.
    ("stress:rate=150,wss=16M", 8 * MIB),
    # Every word rewritten each step: every hit overflows and goes out as a page from the cache.
    ("checksum:size=4M,rounds=1000000", 16 * MIB),
])
def test_vmigrate_to_qemu(machines: Machines, guest, cache) -> None:
    src = machines.vmigrate(SIZE, "--guest", guest)
    wait_for(lambda: bytes(pages(src.ram, src.size)[0, :8]) == b"VMIGRATE", 10, "the guest to start")
    src.vm.set_caps(xbzrle=True)
    src.vm.cmd("migrate-set-parameters", **{"xbzrle-cache-size": cache, "max-bandwidth": 24 * MIB,
                                            "downtime-limit": 1})

    def start_dst() -> Machine:
        ram = machines.ram_path("qemu")
        fill_garbage(ram, src.size)
        return machines.qemu(SIZE, "-incoming", "defer", "-S", ram=ram)

    dst = migrate(Transport("tcp", machines.ramdir), src, start_dst, drive=lambda src: converge_after_passes(src, 5))
    info = src.vm.migrate_status()
    assert info["status"] == "completed", info
    assert dst.vm.migrate_status() == {"status": "completed"}
    assert first_difference(src.ram, dst.ram, src.size) is None
    xb = info["xbzrle-cache"]
    assert xb["cache-size"] == cache and xb["pages"] > 0 and xb["cache-miss"] > 0
    if guest.startswith("stress"):
        assert xb["overflow"] == 0 and xb["bytes"] < xb["pages"] * 64
    else:
        assert xb["overflow"] > 0 and xb["bytes"] >= xb["overflow"] * 4096


@pytest.mark.parametrize("src_kind", ["qemu", "vmigrate"])
def test_one_round_uses_no_xbzrle(machines: Machines, src_kind) -> None:
    """The same report from both: XBZRLE on, nothing re-sent, so every counter stays 0."""
    src = machines.start(src_kind, SIZE)
    fill_pattern(src.ram, src.size, seed=3, random_pages=2048)
    src.vm.set_caps(xbzrle=True)
    src.vm.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30, "xbzrle-cache-size": 4 * MIB})
    src.vm.cmd("stop")
    dst_kind = "vmigrate" if src_kind == "qemu" else "qemu"
    dst = migrate(Transport("tcp", machines.ramdir), src,
                  lambda: machines.start(dst_kind, SIZE, "-incoming", "defer"))
    info = src.vm.migrate_status()
    assert info["status"] == "completed", info
    assert info["xbzrle-cache"] == {"cache-size": 4 * MIB, "bytes": 0, "pages": 0, "cache-miss": 0,
                                    "cache-miss-rate": 0, "encoding-rate": 0, "overflow": 0}
    assert dst.vm.migrate_status() == {"status": "completed"}
    assert first_difference(src.ram, dst.ram, src.size) is None
