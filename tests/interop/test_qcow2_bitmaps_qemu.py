"""Persistent dirty bitmaps in qcow2 between vmigrate and the real QEMU 7.2: bitmaps one makes
the other loads with the same count, granularity and bits, removal reaches the image, and a
writer killed with the image open leaves its bitmaps inconsistent for both (docs/snapshots.md,
"Persistent dirty bitmaps").  ``qemu-img check`` must stay clean throughout."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vmigrate.block.formats import open_image
from vmigrate.block.node import BlockNode
from vmigrate.qmp.client import QMPClientError

MIB = 1 << 20


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60)


def create(path: Path, size: int = 64 * MIB) -> Path:
    assert qemu_img("create", "-q", "-f", "qcow2", str(path), str(size)).returncode == 0
    return path


def assert_clean(path: Path) -> None:
    result = qemu_img("check", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found" in result.stdout and "leaked" not in result.stdout


def image_bitmaps(path: Path) -> list[dict]:
    """``qemu-img info``'s bitmaps (-U: a vmigrate VM may hold the image; it takes no lock)."""
    info = json.loads(qemu_img("info", "-U", "--output=json", str(path)).stdout)
    return info["format-specific"]["data"].get("bitmaps", [])


def qemu(spawn, path: Path):
    return spawn("qemu", "-blockdev", f"driver=qcow2,node-name=d0,file.driver=file,"
                                      f"file.filename={path}")


def vmigrate(spawn, path: Path):
    return spawn("vmigrate", "--blockdev", f"driver=qcow2,node-name=d0,file={path}")


def execute(vm, command: str, **args):
    return vm.qmp.execute(command, args)


def qemu_io(vm, line: str) -> None:
    assert execute(vm, "human-monitor-command", **{"command-line": f'qemu-io d0 "{line}"'}) == ""


def bitmaps(vm) -> list[dict]:
    node = next(n for n in execute(vm, "query-named-block-nodes") if n["node-name"] == "d0")
    return [{k: v for k, v in b.items() if k != "busy"} for b in node.get("dirty-bitmaps", [])]


def qemu_sha256(bits: np.ndarray) -> str:
    """x-debug-block-dirty-bitmap-sha256: QEMU hashes its HBitmap's last level, 64-bit
    little-endian words (at least one) with bit n at position n % 64 of word n // 64."""
    words = max(1, -(-len(bits) // 64))
    packed = np.zeros(words * 8, np.uint8)
    packed[:-(-len(bits) // 8)] = np.packbits(bits, bitorder="little")
    return hashlib.sha256(packed.tobytes()).hexdigest()


def test_qemu_bitmap_loads_in_vmigrate_and_survives(spawn, tmp_path):
    path = create(tmp_path / "a.qcow2")
    vm = qemu(spawn, path)
    execute(vm, "block-dirty-bitmap-add", node="d0", name="b0", persistent=True,
            granularity=65536)
    qemu_io(vm, "write -P 1 0 1M")
    qemu_io(vm, "write -P 1 5M 100k")
    expected = bitmaps(vm)
    sha = execute(vm, "x-debug-block-dirty-bitmap-sha256", node="d0", name="b0")["sha256"]
    vm.close()
    assert expected == [{"name": "b0", "recording": True, "persistent": True,
                         "granularity": 65536, "count": 18 * 65536}]
    vm = vmigrate(spawn, path)
    assert bitmaps(vm) == expected
    assert image_bitmaps(path)[0]["flags"] == ["in-use", "auto"]
    vm.close()
    assert_clean(path)
    assert image_bitmaps(path) == [{"flags": ["auto"], "name": "b0", "granularity": 65536}]
    img = open_image("qcow2", str(path), read_only=True)
    assert qemu_sha256(img.stored_bitmaps()[0].bits) == sha
    img.close()


def test_vmigrate_bitmap_loads_in_qemu_with_the_same_bits(spawn, tmp_path):
    path = create(tmp_path / "a.qcow2")
    node = BlockNode("d0", open_image("qcow2", str(path)))
    node.add_bitmap("on", 65536, persistent=True, disabled=False)
    node.add_bitmap("fine", 4096, persistent=True, disabled=False)
    node.write(0, b"x" * (3 * MIB))               # all-ones clusters for "fine"
    node.write(40 * MIB + 5, b"y" * 70_000)
    node.add_bitmap("off", 65536, persistent=True, disabled=True)
    ours = {b.name: b for b in node.bitmaps.values()}
    node.close()
    assert_clean(path)
    vm = qemu(spawn, path)
    theirs = {b["name"]: b for b in bitmaps(vm)}
    assert {n: (b["count"], b["granularity"], b["recording"]) for n, b in theirs.items()} == {
        n: (b.count(), b.granularity, b.enabled) for n, b in ours.items()}
    for name, bitmap in ours.items():
        assert execute(vm, "x-debug-block-dirty-bitmap-sha256", node="d0",
                       name=name)["sha256"] == qemu_sha256(bitmap.bits)
    vm.close()
    assert_clean(path)


def test_remove_reaches_the_image(spawn, tmp_path):
    path = create(tmp_path / "a.qcow2")
    vm = vmigrate(spawn, path)
    execute(vm, "block-dirty-bitmap-add", node="d0", name="keep", persistent=True)
    execute(vm, "block-dirty-bitmap-add", node="d0", name="gone", persistent=True)
    vm.close()
    assert [b["name"] for b in image_bitmaps(path)] == ["keep", "gone"]
    vm = vmigrate(spawn, path)
    execute(vm, "block-dirty-bitmap-remove", node="d0", name="gone")
    assert [(b["name"], b["flags"]) for b in image_bitmaps(path)] == [("keep", ["in-use", "auto"])]
    execute(vm, "block-dirty-bitmap-remove", node="d0", name="keep")
    assert image_bitmaps(path) == []
    vm.close()
    assert_clean(path)
    assert image_bitmaps(path) == []


def test_killed_writer_leaves_bitmaps_inconsistent_for_both(spawn, tmp_path):
    path = create(tmp_path / "a.qcow2")
    vm = qemu(spawn, path)
    execute(vm, "block-dirty-bitmap-add", node="d0", name="b0", persistent=True,
            granularity=65536)
    qemu_io(vm, "write -P 1 0 64k")
    vm.close()
    vm = vmigrate(spawn, path)
    vm.proc.kill()
    vm.proc.wait(10)
    vm.close()
    seen = {}
    for kind, start in (("qemu", qemu), ("vmigrate", vmigrate)):
        vm = start(spawn, path)
        seen[kind] = bitmaps(vm)
        with pytest.raises(QMPClientError) as err:
            execute(vm, "block-dirty-bitmap-clear", node="d0", name="b0")
        seen[kind + " clear"] = err.value.desc
        vm.close()
    assert seen["qemu"] == seen["vmigrate"] == [
        {"name": "b0", "recording": False, "persistent": True, "granularity": 65536,
         "count": 0, "inconsistent": True}]
    assert seen["qemu clear"] == seen["vmigrate clear"] == (
        "Bitmap 'b0' is inconsistent and cannot be used")
    vm = vmigrate(spawn, path)
    execute(vm, "block-dirty-bitmap-remove", node="d0", name="b0")
    vm.close()
    assert_clean(path)
    assert image_bitmaps(path) == []
