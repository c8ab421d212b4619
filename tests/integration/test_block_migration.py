"""Block migration and dirty-bitmap migration between two vmigrate processes over real sockets.

Disks are raw ``--drive`` images; after each migration the images are
compared with ``qemu-img compare`` (docs/block-migration.md).  The source
guest writes its disk during the migration (``stress:disk=``), so the dirty
phase has work; the destination guest must continue the same sequence.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import DISK_BLOCK, DISK_CURSOR_WORD, DISK_STEP_WORD, MAGIC, disk_blocks
from vmigrate.qmp.client import QMPClientError

MIB = 1 << 20
QEMU_IMG = "qemu-img"

def image(path: Path, size: int, seed: int | None = 1, zero_from: int | None = None) -> Path:
    """A raw image of random bytes (zero from *zero_from* on), or all zero without a seed."""
    data = np.zeros(size, np.uint8)
    if seed is not None:
        data[:] = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    if zero_from is not None:
        data[zero_from:] = 0
    data.tofile(path)
    return path


def compare(a: Path, b: Path, fmt: str = "raw") -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IMG, "compare", "-f", fmt, "-F", fmt, str(a), str(b)],
                          capture_output=True, text=True, timeout=60)


def header_words(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype="<u8", count=8)


def drive(path: Path, **extra: str) -> list[str]:
    opts = ",".join(f"{k.replace('_', '-')}={v}" for k, v in {"id": "drive0", **extra}.items())
    return ["--drive", f"file={path},format=raw,{opts}"]


def destination(spawn, tmp_path: Path, *args: str, memory: str = "16M") -> tuple[object, str]:
    dst = spawn("vmigrate", "-m", memory, "-S", "--incoming", "tcp:127.0.0.1:0", *args)
    port = dst.migrate_status()["socket-address"][0]["port"]
    return dst, f"tcp:127.0.0.1:{port}"


def test_blk_with_guest_writing_its_disk(spawn, tmp_path):
    size = 24 * MIB
    src_img, dst_img = image(tmp_path / "src.img", size), image(tmp_path / "dst.img", size, seed=None)
    guest = "stress:rate=1,wss=1M,disk=drive0,disk-rate=4"
    src = spawn("vmigrate", "-m", "32M", "--mem-path", str(tmp_path / "src.ram"), "--guest", guest,
                *drive(src_img))
    dst, uri = destination(spawn, tmp_path, "--mem-path", str(tmp_path / "dst.ram"), "--guest", guest,
                           *drive(dst_img), memory="32M")
    wait_for(lambda: header_words(tmp_path / "src.ram")[DISK_STEP_WORD] > 3, 10, "guest writing its disk")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 * MIB})
    src.cmd("migrate", uri=uri, blk=True)
    caps = {c["capability"]: c["state"] for c in src.cmd("query-migrate-capabilities")}
    assert caps["block"] is True
    wait_for(lambda: "disk" in src.migrate_status(), 10, "disk statistics")
    disk = src.migrate_status()["disk"]
    assert disk["total"] == size and disk["transferred"] + disk["remaining"] == size
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    info = src.wait_migration({"completed", "failed", "cancelled"}, timeout=60)
    assert info["status"] == "completed", info
    assert "disk" not in info  # QEMU drops its block devices at completion
    assert dst.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    result = compare(src_img, dst_img)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: not {c["capability"]: c["state"] for c in src.cmd("query-migrate-capabilities")}["block"],
             5, "blk's capability undone")
    # The destination guest goes on from the migrated cursor, writing the same sequence.
    words = header_words(tmp_path / "dst.ram")
    assert bytes(words[:1].tobytes()) == MAGIC
    step, cursor = int(words[DISK_STEP_WORD]), int(words[DISK_CURSOR_WORD])
    dst.cmd("cont")
    wait_for(lambda: header_words(tmp_path / "dst.ram")[DISK_STEP_WORD] > step + 2, 10, "destination guest")
    with open(dst_img, "rb") as f:
        f.seek(cursor * DISK_BLOCK)
        first = np.frombuffer(f.read(DISK_BLOCK), "<u8")
    assert int(first[0]) == step + 1 and int(first[1]) == cursor
    assert first.tobytes() == disk_blocks(cursor, 1, step + 1)


def test_zero_blocks_stream_and_load(spawn, tmp_path):
    """With zero-blocks the zero chunks travel as flags: the stream is smaller than the data."""
    size = 32 * MIB
    src_img = image(tmp_path / "src.img", size, zero_from=4 * MIB)
    dst_img = image(tmp_path / "dst.img", size, seed=7)
    stream = tmp_path / "stream.bin"
    src = spawn("vmigrate", "-m", "16M", *drive(src_img))
    src.set_caps(**{"zero-blocks": True})
    src.cmd("migrate", uri=f"exec:cat > {stream}", blk=True)
    assert src.wait_migration({"completed", "failed"}, timeout=60)["status"] == "completed"
    assert stream.stat().st_size < 16 * MIB + 4 * MIB + MIB  # RAM + 4 MiB of data, no zero chunks
    dst = spawn("vmigrate", "-m", "16M", "-S", "--incoming", f"exec:cat {stream}", *drive(dst_img))
    assert dst.wait_migration({"completed", "failed"}, timeout=60)["status"] == "completed"
    result = compare(src_img, dst_img)
    assert result.returncode == 0, result.stdout + result.stderr


def test_blk_without_disks_completes(spawn, tmp_path):
    src = spawn("vmigrate", "-m", "16M")
    dst, uri = destination(spawn, tmp_path)
    src.cmd("migrate", uri=uri, blk=True)
    info = src.wait_migration({"completed", "failed"}, timeout=30)
    assert info["status"] == "completed" and "disk" not in info
    assert dst.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"


def test_unknown_device_fails_the_load(spawn, tmp_path):
    src_img, dst_img = image(tmp_path / "src.img", 2 * MIB), image(tmp_path / "dst.img", 2 * MIB, seed=None)
    src = spawn("vmigrate", "-m", "16M", *drive(src_img))
    dst, uri = destination(spawn, tmp_path, "--drive", f"file={dst_img},format=raw,id=other")
    src.cmd("migrate", uri=uri, blk=True)
    assert src.wait_migration({"completed", "failed"}, timeout=30)["status"] == "failed"
    info = dst.wait_migration({"completed", "failed"}, timeout=30)
    assert info["status"] == "failed" and "Error unknown block device drive0" in info["error-desc"]


def test_inc_over_a_shared_backing_file(spawn, tmp_path):
    """inc=true sends only what the top image allocates; both sides share the backing file."""
    base = image(tmp_path / "base.img", 16 * MIB)
    for name in ("src.qcow2", "dst.qcow2"):
        subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                        str(tmp_path / name)], check=True, timeout=30)
    src_top, dst_top = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(src_top)], capture_output=True,
                   check=True, timeout=30)
    src = spawn("vmigrate", "-m", "16M", "--drive", f"file={src_top},format=qcow2,id=drive0")
    dst, uri = destination(spawn, tmp_path, "--drive", f"file={dst_top},format=qcow2,id=drive0")
    src.cmd("migrate", uri=uri, inc=True)
    assert src.wait_migration({"completed", "failed"}, timeout=60)["status"] == "completed"
    assert dst.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    src.close()
    dst.close()
    result = compare(src_top, dst_top, "qcow2")
    assert result.returncode == 0, result.stdout + result.stderr
    # Only the written chunks came: the destination's top image holds 2 MiB, not the 16 MiB disk.
    assert dst_top.stat().st_size < 4 * MIB


def bitmaps(vm, node: str) -> dict[str, dict]:
    for entry in vm.cmd("query-named-block-nodes"):
        if entry["node-name"] == node:
            return {b["name"]: b for b in entry.get("dirty-bitmaps", [])}
    raise AssertionError(f"no node {node}")


def sha256(vm, node: str, name: str) -> str:
    return vm.qmp.execute("x-debug-block-dirty-bitmap-sha256", {"node": node, "name": name})["sha256"]


def test_dirty_bitmaps_over_shared_storage(spawn, tmp_path):
    """Shared storage plus dirty-bitmaps: the bitmaps arrive with the same bits, granularity, state."""
    disk = image(tmp_path / "shared.img", 8 * MIB)
    guest = "stress:rate=1,wss=1M,disk=disk0,disk-rate=2"
    src = spawn("vmigrate", "-m", "16M", "--guest", guest, *drive(disk, node_name="disk0"))
    dst, uri = destination(spawn, tmp_path, "--guest", guest, *drive(disk, node_name="disk0"))
    src.qmp.execute("block-dirty-bitmap-add", {"node": "drive0", "name": "b0", "granularity": 65536})
    src.qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b1", "granularity": 4096, "disabled": True})
    for vm in (src, dst):
        vm.set_caps(**{"dirty-bitmaps": True})
    wait_for(lambda: bitmaps(src, "disk0")["b0"]["count"] > 0, 10, "guest writes recorded")
    src.cmd("migrate", uri=uri)
    assert src.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    assert dst.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    before, after = bitmaps(src, "disk0"), bitmaps(dst, "disk0")
    assert set(after) == {"b0", "b1"}
    for name in ("b0", "b1"):
        for key in ("granularity", "count", "persistent"):
            assert after[name][key] == before[name][key], (name, key)
        assert not after[name]["busy"] and not before[name]["busy"]
        assert sha256(dst, "disk0", name) == sha256(src, "disk0", name)
    assert before["b0"]["count"] > 0 and after["b1"]["count"] == 0
    assert after["b0"]["recording"] and not after["b1"]["recording"]
    dst.cmd("cont")
    count = after["b0"]["count"]
    wait_for(lambda: bitmaps(dst, "disk0")["b0"]["count"] > count, 10, "destination bitmap recording")


def test_existing_bitmap_on_destination_fails_the_load(spawn, tmp_path):
    disk = image(tmp_path / "shared.img", 2 * MIB)
    src = spawn("vmigrate", "-m", "16M", *drive(disk, node_name="disk0"))
    dst, uri = destination(spawn, tmp_path, *drive(disk, node_name="disk0"))
    for vm in (src, dst):
        vm.qmp.execute("block-dirty-bitmap-add", {"node": "drive0", "name": "b0"})
        vm.set_caps(**{"dirty-bitmaps": True})
    src.cmd("migrate", uri=uri)
    info = dst.wait_migration({"completed", "failed"}, timeout=30)
    assert info["status"] == "failed"
    assert "Bitmap with the same name ('b0') already exists on destination" in info["error-desc"]


def test_blk_and_bitmaps_together(spawn, tmp_path):
    size = 8 * MIB
    src_img, dst_img = image(tmp_path / "src.img", size), image(tmp_path / "dst.img", size, seed=None)
    src = spawn("vmigrate", "-m", "16M", *drive(src_img, node_name="disk0"))
    dst, uri = destination(spawn, tmp_path, *drive(dst_img, node_name="disk0"))
    src.qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b0", "granularity": 512})
    for vm in (src, dst):
        vm.set_caps(**{"dirty-bitmaps": True})
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 * MIB})
    src.cmd("migrate", uri=uri, blk=True)
    # The bitmap is the migration's until it completes.
    wait_for(lambda: bitmaps(src, "disk0")["b0"]["busy"], 5, "bitmap busy")
    with pytest.raises(QMPClientError, match="Bitmap 'b0' is currently in use by another operation"):
        src.qmp.execute("block-dirty-bitmap-remove", {"node": "disk0", "name": "b0"})
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    assert src.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    assert not bitmaps(src, "disk0")["b0"]["busy"]
    assert dst.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    assert compare(src_img, dst_img).returncode == 0
    after = bitmaps(dst, "disk0")["b0"]
    assert after["granularity"] == 512 and after["count"] == 0
    assert sha256(dst, "drive0", "b0") == sha256(src, "drive0", "b0")


def test_dirty_bitmaps_with_postcopy(spawn_shm, tmp_path):
    """After a switch to postcopy the bits go in the iterations while the destination guest runs
    and writes: its enabled bitmap gets the source's bits plus its own writes (the successor),
    the disabled one exactly the source's."""
    spawn, shm = spawn_shm
    disk = image(tmp_path / "shared.img", 8 * MIB)
    guest = "stress:rate=16,wss=16M,disk=drive0,disk-rate=2"
    src = spawn("vmigrate", "-m", "64M", "--mem-path", str(shm / "src.ram"), "--guest", guest,
                *drive(disk, node_name="disk0"))
    dst = spawn("vmigrate", "-m", "64M", "--mem-path", str(shm / "dst.ram"), "--guest", guest,
                "--incoming", "tcp:127.0.0.1:0", *drive(disk, node_name="disk0"))
    uri = f"tcp:127.0.0.1:{dst.migrate_status()['socket-address'][0]['port']}"
    src.qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b0", "granularity": 4096})
    src.qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b1", "granularity": 4096})
    for vm in (src, dst):
        vm.set_caps(**{"dirty-bitmaps": True, "postcopy-ram": True})
    wait_for(lambda: bitmaps(src, "disk0")["b0"]["count"] > 0, 10, "guest writes recorded")
    src.qmp.execute("block-dirty-bitmap-disable", {"node": "disk0", "name": "b1"})
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 * MIB})
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.migrate_status()["status"] == "active", 10, "precopy")
    src.cmd("migrate-start-postcopy")
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    assert src.wait_migration({"completed", "failed", "cancelled"}, timeout=30)["status"] == "completed"
    assert dst.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    before, after = bitmaps(src, "disk0"), bitmaps(dst, "disk0")
    assert sha256(dst, "disk0", "b1") == sha256(src, "disk0", "b1")
    assert not after["b1"]["recording"] and not after["b0"]["busy"]
    assert after["b0"]["recording"]
    wait_for(lambda: bitmaps(dst, "disk0")["b0"]["count"] > before["b0"]["count"], 10,
             "destination writes on top of the migrated bits")


def test_bitmap_mapping_aliases_both_ways(spawn, tmp_path):
    """block-bitmap-mapping: the source sends aliases, the destination maps them back to its own names."""
    disk = image(tmp_path / "shared.img", 4 * MIB)
    src = spawn("vmigrate", "-m", "16M", *drive(disk, node_name="disk0"))
    dst, uri = destination(spawn, tmp_path, *drive(disk, node_name="node1"))
    src.qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b0", "granularity": 65536})
    src.qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "unmapped"})
    src.cmd("migrate-set-parameters", **{"block-bitmap-mapping": [
        {"node-name": "disk0", "alias": "a0", "bitmaps": [{"name": "b0", "alias": "x"}]}]})
    dst.cmd("migrate-set-parameters", **{"block-bitmap-mapping": [
        {"node-name": "node1", "alias": "a0",
         "bitmaps": [{"name": "c0", "alias": "x", "transform": {"persistent": True}}]}]})
    for vm in (src, dst):
        vm.set_caps(**{"dirty-bitmaps": True})
    src.cmd("migrate", uri=uri)
    assert src.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    assert dst.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    after = bitmaps(dst, "node1")
    assert set(after) == {"c0"}
    assert after["c0"]["granularity"] == 65536 and after["c0"]["persistent"] is True


def test_bitmap_name_over_255_bytes_fails_the_source(spawn, tmp_path):
    disk = image(tmp_path / "disk.img", 2 * MIB)
    src = spawn("vmigrate", "-m", "16M", *drive(disk, node_name="disk0"))
    src.qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "n" * 300})
    src.set_caps(**{"dirty-bitmaps": True})
    src.cmd("migrate", uri=f"exec:cat > {tmp_path / 'stream'}")
    info = src.wait_migration({"completed", "failed"}, timeout=30)
    assert info["status"] == "failed"
    assert info["error-desc"] == (f"Cannot migrate bitmap '{'n' * 300}' on node 'drive0': "
                                  "Name is longer than 255 bytes")
    assert not bitmaps(src, "disk0")["n" * 300]["busy"]


def test_persistent_bitmap_over_shared_qcow2(spawn, tmp_path):
    """A persistent bitmap in a shared qcow2 image migrates with dirty-bitmaps and lands in the
    image once, when the destination lets it go; the source, inactive, writes nothing more."""
    disk = tmp_path / "shared.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True, timeout=30)
    guest = "stress:rate=1,wss=1M,disk=disk0,disk-rate=2"
    args = ("--blockdev", f"driver=qcow2,node-name=disk0,file={disk}")
    src = spawn("vmigrate", "-m", "16M", "--guest", guest, *args)
    src.qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "p0", "persistent": True})
    dst, uri = destination(spawn, tmp_path, "--guest", guest, *args)
    for vm in (src, dst):
        vm.set_caps(**{"dirty-bitmaps": True})
    wait_for(lambda: bitmaps(src, "disk0")["p0"]["count"] > 0, 10, "guest writes recorded")
    src.cmd("migrate", uri=uri)
    assert src.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    assert dst.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    assert sha256(dst, "disk0", "p0") == sha256(src, "disk0", "p0")
    assert bitmaps(dst, "disk0")["p0"]["persistent"] and "inconsistent" not in bitmaps(dst, "disk0")["p0"]
    src.close()
    dst.cmd("cont")
    dst.close()
    check = subprocess.run([QEMU_IMG, "check", str(disk)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout
    info = subprocess.run([QEMU_IMG, "info", "--output=json", str(disk)], capture_output=True, text=True,
                          check=True, timeout=30).stdout
    assert [b["name"] for b in json.loads(info)["format-specific"]["data"]["bitmaps"]] == ["p0"]
    assert "in-use" not in json.loads(info)["format-specific"]["data"]["bitmaps"][0]["flags"]
