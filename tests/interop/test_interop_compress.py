"""Compressed pages (the ``compress`` capability) between vmigrate and real QEMU 7.2.

QEMU → vmigrate: QEMU's compression threads send out-of-order records (each
an independent zlib stream) and zero pages found in the threads; vmigrate's
decompression threads must place every page.  vmigrate → QEMU: a dirtying
vmigrate guest, several passes; with ``xbzrle`` also on, compression serves
the first round and XBZRLE the rest, which QEMU must both decode.  vmigrate's zlib work runs in its threads and,
forced, in worker processes (vmigrate/migration/compress_worker.py): the
wire must be QEMU's either way.
"""

from __future__ import annotations

import numpy as np
import pytest

from machines import Machine, Machines, converge_after_passes
from ramfile import fill_garbage, fill_pattern, first_difference, pages
from transport import Transport, migrate
from vmigrate.harness.waiting import wait_for
from vmigrate.migration.worker_process import ENV

pytestmark = pytest.mark.timeout(90)

SIZE = "64M"
WORKERS = {"threads": "0", "workers": "1"}


@pytest.fixture(params=sorted(WORKERS))
def compress_loops(request, monkeypatch) -> str:
    monkeypatch.setenv(ENV, WORKERS[request.param])
    return request.param


def assert_compress_loops(vm: Machine, compress_loops: str, side: str) -> None:
    """The vmigrate side (run with ``-v``) did its zlib work where the test asked."""
    said = f"compress: {side} workers (processes)" in vm.vm.log()
    assert said == (compress_loops == "workers"), vm.vm.log()[-2000:]


@pytest.mark.parametrize("threads", [1, 4])
def test_qemu_to_vmigrate(machines: Machines, threads, compress_loops) -> None:
    src = machines.qemu(SIZE)
    fill_pattern(src.ram, src.size, seed=threads, random_pages=3072)
    src.vm.set_caps(compress=True)
    src.vm.cmd("migrate-set-parameters", **{"compress-threads": threads, "max-bandwidth": 10 << 30})

    def start_dst() -> Machine:
        ram = machines.ram_path("vmigrate")
        fill_garbage(ram, src.size)
        dst = machines.vmigrate(SIZE, "-v", "-S", "--incoming", "defer", ram=ram)
        dst.vm.set_caps(compress=True)
        dst.vm.cmd("migrate-set-parameters", **{"decompress-threads": 3})
        return dst

    dst = migrate(Transport("tcp", machines.ramdir), src, start_dst)
    info = src.vm.migrate_status()
    assert info["status"] == "completed", info
    assert info["compression"]["pages"] > 3072
    assert dst.vm.migrate_status() == {"status": "completed"}
    assert_compress_loops(dst, compress_loops, "3 decompression")
    assert first_difference(src.ram, dst.ram, src.size) is None


@pytest.mark.parametrize("with_xbzrle", [False, True])
def test_vmigrate_to_qemu(machines: Machines, with_xbzrle, compress_loops) -> None:
    src = machines.vmigrate(SIZE, "-v", "--guest", "stress:rate=150,wss=16M")
    wait_for(lambda: bytes(pages(src.ram, src.size)[0, :8]) == b"VMIGRATE", 10, "the guest to start")
    # 8 MiB of random pages beyond the guest's working set: most of what the threads compress.
    ram = pages(src.ram, src.size, writable=True)
    ram[6144:8192] = np.random.default_rng(5).integers(0, 256, size=(2048, 4096), dtype=np.uint8)
    ram.flush()
    src.vm.set_caps(compress=True, xbzrle=with_xbzrle)
    src.vm.cmd("migrate-set-parameters", **{"compress-threads": 2, "max-bandwidth": 8 << 20, "downtime-limit": 1})

    def start_dst() -> Machine:
        ram = machines.ram_path("qemu")
        fill_garbage(ram, src.size)
        dst = machines.qemu(SIZE, "-incoming", "defer", "-S", ram=ram)
        dst.vm.set_caps(compress=True)
        return dst

    dst = migrate(Transport("tcp", machines.ramdir), src, start_dst, drive=lambda src: converge_after_passes(src, 4, still_active=False))
    info = src.vm.migrate_status()
    assert info["status"] == "completed", info
    assert info["compression"]["pages"] > 2048
    assert_compress_loops(src, compress_loops, "2 compression")
    if with_xbzrle:
        assert info["xbzrle-cache"]["pages"] > 0
    assert dst.vm.migrate_status() == {"status": "completed"}
    assert first_difference(src.ram, dst.ram, src.size) is None
