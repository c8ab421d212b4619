"""Block migration and dirty-bitmap migration between real QEMU 7.2 and vmigrate, both ways.

QEMU runs ``-M none`` with ``-drive if=none,id=drive0``; block migration
names devices, so both sides use the device name ``drive0``.  Images are
compared with ``qemu-img compare``.  Bitmaps are compared through
``x-debug-block-dirty-bitmap-sha256``, which both sides answer with the
hash of the same serialised words.  QEMU writes its disk through HMP's
``qemu-io`` (its ``-M none`` has no guest), vmigrate through the
``stress:disk=`` guest.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from vmigrate.harness.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20
#: Lift QEMU's default 32 MiB/s limit: these tests are about content.
FAST = 10 << 30
FINAL = {"completed", "failed", "cancelled"}


def image(path: Path, size: int, seed: int | None) -> Path:
    data = np.zeros(size, np.uint8)
    if seed is not None:
        data[:] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
        data[size // 2: size // 2 + 2 * MIB] = 0
    data.tofile(path)
    return path


def compare(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                          capture_output=True, text=True, timeout=60)


def qemu_drive(path: Path) -> list[str]:
    return ["-drive", f"if=none,id=drive0,node-name=disk0,file={path},format=raw,file.locking=off"]


def vm_drive(path: Path) -> list[str]:
    return ["--drive", f"file={path},format=raw,id=drive0,node-name=disk0"]


def listen(vm) -> str:
    vm.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = vm.migrate_status()["socket-address"][0]["port"]
    return f"tcp:127.0.0.1:{port}"


def finish(src, dst) -> None:
    info = src.wait_migration(FINAL, timeout=60)
    assert info["status"] == "completed", (info, src.log())
    wait_for(lambda: dst.migrate_status().get("status") in FINAL, 30, "destination done")
    assert dst.migrate_status()["status"] == "completed", dst.log()


def bitmap_info(vm, node: str = "disk0") -> dict[str, dict]:
    for entry in vm.cmd("query-named-block-nodes"):
        if entry["node-name"] == node:
            return {b["name"]: b for b in entry.get("dirty-bitmaps", [])}
    raise AssertionError(f"no node {node}")


def sha256(vm, name: str) -> str:
    return vm.qmp.execute("x-debug-block-dirty-bitmap-sha256", {"node": "disk0", "name": name})["sha256"]


def assert_bitmaps_arrived(src, dst) -> None:
    """b0 (recording, written to) and b1 (disabled) equal on both sides: bits, granularity, state."""
    before, after = bitmap_info(src), bitmap_info(dst)
    assert set(after) == {"b0", "b1"}
    for name in ("b0", "b1"):
        assert after[name]["granularity"] == before[name]["granularity"]
        assert after[name]["count"] == before[name]["count"]
        assert sha256(dst, name) == sha256(src, name)
    assert before["b0"]["count"] > 0
    assert after["b0"]["recording"] and not after["b1"]["recording"]


@pytest.mark.parametrize("zero_blocks", [False, True], ids=["plain", "zero-blocks"])
def test_qemu_to_vmigrate_blk(spawn, tmp_path, zero_blocks):
    size = 16 * MIB
    src_img, dst_img = image(tmp_path / "src.img", size, 3), image(tmp_path / "dst.img", size, None)
    src = spawn("qemu", *qemu_drive(src_img), memory="64M")
    dst = spawn("vmigrate", "-m", "64M", "--incoming", "defer", *vm_drive(dst_img))
    # QEMU's block pending leaves out the bulk phase's unread chunks: with the default downtime-limit
    # it could complete before the disk is sent (docs/block-migration.md).
    src.cmd("migrate-set-parameters", **{"max-bandwidth": FAST, "downtime-limit": 1})
    if zero_blocks:
        src.set_caps(**{"zero-blocks": True})
    src.cmd("migrate", uri=listen(dst), blk=True)
    finish(src, dst)
    result = compare(src_img, dst_img)
    assert result.returncode == 0, result.stdout + result.stderr


#: Checked by hand: QEMU 7.2 -> QEMU 7.2 with the same command lines aborts the same way, so the
#: destination side is QEMU's, not something in vmigrate's stream (docs/block-migration.md).
QEMU_DESTINATION_ABORTS = ("QEMU 7.2's block migration destination (-M none, -drive if=none) aborts on its "
                           "first write: Assertion 'child->perm & BLK_PERM_WRITE' failed (block/io.c)")


@pytest.mark.xfail(reason=QEMU_DESTINATION_ABORTS, strict=True)
def test_vmigrate_to_qemu_blk_guest_writing(spawn, tmp_path):
    size = 16 * MIB
    src_img, dst_img = image(tmp_path / "src.img", size, 4), image(tmp_path / "dst.img", size, None)
    src = spawn("vmigrate", "-m", "64M", "--guest", "stress:rate=1,wss=1M,disk=drive0,disk-rate=4",
                *vm_drive(src_img))
    dst = spawn("qemu", "-incoming", "defer", *qemu_drive(dst_img), memory="64M")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 32 * MIB})
    src.cmd("migrate", uri=listen(dst), blk=True)
    finish(src, dst)
    result = compare(src_img, dst_img)
    assert result.returncode == 0, result.stdout + result.stderr


def test_qemu_to_vmigrate_dirty_bitmaps(spawn, tmp_path):
    """Shared storage: QEMU's bitmaps (bits written through qemu-io) arrive equal in vmigrate."""
    disk = image(tmp_path / "shared.img", 8 * MIB, 5)
    src = spawn("qemu", *qemu_drive(disk), memory="64M")
    dst = spawn("vmigrate", "-m", "64M", "--incoming", "defer", *vm_drive(disk))
    src.qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b0", "granularity": 65536})
    src.qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b1", "granularity": 512})
    src.cmd("human-monitor-command", **{"command-line": 'qemu-io drive0 "write 1M 200k"'})
    src.cmd("human-monitor-command", **{"command-line": 'qemu-io drive0 "write 7M 4k"'})
    src.qmp.execute("block-dirty-bitmap-disable", {"node": "disk0", "name": "b1"})
    for vm in (src, dst):
        vm.set_caps(**{"dirty-bitmaps": True})
    src.cmd("migrate", uri=listen(dst))
    finish(src, dst)
    assert_bitmaps_arrived(src, dst)


def test_vmigrate_to_qemu_dirty_bitmaps(spawn, tmp_path):
    disk = image(tmp_path / "shared.img", 8 * MIB, 6)
    src = spawn("vmigrate", "-m", "64M", "--guest", "stress:rate=1,wss=1M,disk=disk0,disk-rate=2",
                *vm_drive(disk))
    dst = spawn("qemu", "-incoming", "defer", *qemu_drive(disk), memory="64M")
    src.qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b0", "granularity": 4096})
    src.qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b1", "disabled": True})
    for vm in (src, dst):
        vm.set_caps(**{"dirty-bitmaps": True})
    wait_for(lambda: bitmap_info(src)["b0"]["count"] > 64 * 1024, 10, "guest writes recorded")
    src.cmd("migrate", uri=listen(dst))
    finish(src, dst)
    assert_bitmaps_arrived(src, dst)
