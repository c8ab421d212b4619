"""vmigrate's qcow2 driver against Debian's qemu-img 7.2 as the oracle: images qemu-img makes
are written by us and must pass ``qemu-img check``, convert to the data we wrote, and show our
snapshots, zero clusters and allocation the way QEMU reads them."""

from __future__ import annotations

import hashlib
import json
import random
import re
import struct
import subprocess
from pathlib import Path

import pytest

from image_model import scribble
from vmigrate.block.driver import ImageError
from vmigrate.block.formats import open_image
from vmigrate.block.node import BlockNode

QEMU_IMG = "/usr/bin/qemu-img"
MIB = 1 << 20


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IMG, *args], capture_output=True, text=True, check=check,
                          timeout=60)


def create(path: Path, size: int, *options: str) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *options, str(path), str(size))
    return path


def assert_clean(path: Path) -> None:
    result = qemu_img("check", str(path), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found on the image." in result.stdout


def converted(path: Path, *options: str) -> bytes:
    out = path.with_suffix(".converted")
    qemu_img("convert", "-O", "raw", *options, str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_map(path: Path) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", str(path)).stdout)


def snapshot_rows(path: Path) -> list[list[str]]:
    lines = qemu_img("snapshot", "-l", str(path)).stdout.splitlines()
    return [line.split() for line in lines[2:]]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("options,size,count", [((), 32 * MIB, 80),
                                                (("-o", "cluster_size=4096"), 16 * MIB, 80),
                                                (("-o", "cluster_size=512"), 16 * MIB, 120),
                                                (("-o", "compat=0.10"), 8 * MIB, 40),
                                                (("-o", "refcount_bits=64"), 8 * MIB, 40),
                                                (("-o", "refcount_bits=8"), 8 * MIB, 40)])
def test_random_writes_pass_check_and_convert(tmp_path, options, size, count):
    """With 512-byte clusters ~11 MiB of data needs many refcount blocks and a bigger table."""
    path = create(tmp_path / "a.qcow2", size, *options)
    reftable_before = struct.unpack_from(">QI", path.read_bytes(), 48)
    img = open_image("qcow2", str(path))
    model = bytearray(size)
    rnd = random.Random(len(options) + count)
    scribble(img, model, rnd, count, 300_000)
    for off in range(0, size, 4 * MIB):
        img.write_zeroes(off + 12345, 70_000)
        model[off + 12345:off + 82345] = bytes(70_000)
    img.close()
    assert_clean(path)
    assert converted(path) == model
    if "cluster_size=512" in options:
        assert struct.unpack_from(">QI", path.read_bytes(), 48)[1] > reftable_before[1]


def test_backing_chain_copy_on_write_and_allocation_map(tmp_path):
    raw = tmp_path / "base.raw"
    base_data = random.Random(1).randbytes(4 * MIB)
    raw.write_bytes(base_data)
    base = tmp_path / "base.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", str(raw),
             str(base))
    top = create(tmp_path / "top.qcow2", 6 * MIB, "-b", "base.qcow2", "-F", "qcow2",
                 "-o", "cluster_size=4096")
    img = open_image("qcow2", str(top))
    assert img.backing is not None and img.backing.format_name == "qcow2"
    model = bytearray(base_data) + bytearray(2 * MIB)
    for off, n in [(100, 10), (8192 + 4000, 200), (MIB - 5, 10), (4 * MIB - 100, 300),
                   (5 * MIB + 1, 1)]:
        data = bytes([n % 251 + 1]) * n
        img.write(off, data)
        model[off:off + n] = data
    img.write_zeroes(2 * MIB, 8192)
    model[2 * MIB:2 * MIB + 8192] = bytes(8192)
    assert img.read(0, len(model)) == model
    ours = [img.allocated(c, 4096) for c in range(0, 6 * MIB, 4096)]
    img.close()
    assert_clean(top)
    assert converted(top) == model
    theirs = [False] * len(ours)
    for extent in qemu_map(top):
        if extent["depth"] == 0 and extent["present"]:
            for c in range(extent["start"] // 4096, (extent["start"] + extent["length"]) // 4096):
                theirs[c] = True
    assert ours == theirs and sum(ours) == 10


def test_our_snapshots_seen_applied_and_deleted_by_qemu_img(tmp_path):
    path = create(tmp_path / "a.qcow2", 8 * MIB, "-o", "cluster_size=4096")
    img = open_image("qcow2", str(path))
    rnd = random.Random(7)
    model = bytearray(8 * MIB)
    scribble(img, model, rnd, 30, 200_000)
    vm = rnd.randbytes(145 * 1024)
    img.write_vmstate(0, vm)
    img.create_snapshot("first", 1_700_000_000, 0, 64_000_000, len(vm))
    at_first = bytes(model)
    scribble(img, model, rnd, 20, 200_000)
    img.write_vmstate(0, vm[:3000])
    img.create_snapshot("second", 1_700_000_100, 0, 2_479_000_000, 3000)
    at_second = bytes(model)
    scribble(img, model, rnd, 20, 200_000)
    img.close()
    assert_clean(path)
    rows = snapshot_rows(path)
    assert [(r[0], r[1], " ".join(r[2:4])) for r in rows] == [
        ("1", "first", "145 KiB"), ("2", "second", "2.93 KiB")]
    assert [r[6] for r in rows] == ["00:00:00.064", "00:00:02.479"]
    assert converted(path) == model
    assert converted(path, "-l", "snapshot.id=2") == at_second
    qemu_img("snapshot", "-a", "first", str(path))
    assert_clean(path)
    assert converted(path) == at_first
    img = open_image("qcow2", str(path))
    assert img.read_vmstate(0, len(vm)) == vm
    img.delete_snapshot("1")
    img.close()
    assert_clean(path)
    assert [r[:2] for r in snapshot_rows(path)] == [["2", "second"]]
    qemu_img("snapshot", "-d", "second", str(path))
    assert_clean(path)
    assert qemu_img("snapshot", "-l", str(path)).stdout == ""
    assert converted(path) == at_first


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_mixed_operations_against_a_model(tmp_path, cluster_size):
    """Writes, zeroes, snapshots with VM state, reverts and deletes in random order over a
    raw backing file; every snapshot converts to the data it was taken of."""
    rnd = random.Random(cluster_size)
    size = 3 * MIB
    base = bytearray(rnd.randbytes(size // 2))
    (tmp_path / "b.raw").write_bytes(base)
    path = create(tmp_path / "m.qcow2", size, "-o", f"cluster_size={cluster_size}",
                  "-b", "b.raw", "-F", "raw")
    model = base + bytearray(size - len(base))
    img = open_image("qcow2", str(path))
    snaps: dict[str, tuple[bytes, bytes]] = {}
    for step in range(60):
        r = rnd.random()
        if r < 0.45:
            scribble(img, model, rnd, 1, 100_000)
        elif r < 0.6:
            n = rnd.randrange(1, 200_000)
            off = rnd.randrange(0, size - n)
            img.write_zeroes(off, n)
            model[off:off + n] = bytes(n)
        elif r < 0.72:
            vm = rnd.randbytes(rnd.randrange(0, 50_000))
            img.write_vmstate(0, vm)
            sid = img.create_snapshot(f"s{step}", step, 0, 0, len(vm)).id
            snaps[sid] = (bytes(model), vm)
        elif r < 0.85 and snaps:
            sid = rnd.choice(sorted(snaps))
            img.goto_snapshot(sid)
            model = bytearray(snaps[sid][0])
            assert img.read_vmstate(0, len(snaps[sid][1])) == snaps[sid][1]
        elif snaps:
            sid = rnd.choice(sorted(snaps))
            img.delete_snapshot(sid)
            del snaps[sid]
    assert img.read(0, size) == model
    img.close()
    assert snaps
    assert_clean(path)
    assert converted(path) == model
    for sid, (data, _) in snaps.items():
        assert converted(path, "-l", f"snapshot.id={sid}") == data


def test_qemu_made_snapshot_goto(tmp_path):
    path = create(tmp_path / "a.qcow2", 4 * MIB)
    img = open_image("qcow2", str(path))
    rnd = random.Random(9)
    model = bytearray(4 * MIB)
    scribble(img, model, rnd, 20, 300_000)
    img.close()
    qemu_img("snapshot", "-c", "theirs", str(path))
    img = open_image("qcow2", str(path))
    assert [s.name for s in img.snapshots()] == ["theirs"]
    scribble(img, bytearray(4 * MIB), rnd, 20, 300_000)
    img.goto_snapshot("theirs")
    assert img.read(0, 4 * MIB) == model
    img.write(0, b"after")
    model[:5] = b"after"
    img.create_snapshot("ours", 0, 0, 0, 0)
    img.close()
    assert_clean(path)
    assert converted(path) == model
    assert [r[:2] for r in snapshot_rows(path)] == [["1", "theirs"], ["2", "ours"]]


def test_zero_clusters_shown_by_map(tmp_path):
    path = create(tmp_path / "a.qcow2", 2 * MIB)
    img = open_image("qcow2", str(path))
    img.write(0, b"\x33" * (2 * MIB))
    img.write_zeroes(65536, 3 * 65536)
    img.close()
    assert_clean(path)
    zero = [e for e in qemu_map(path) if e["start"] == 65536]
    assert zero and zero[0]["zero"] and not zero[0]["data"] and zero[0]["length"] == 3 * 65536
    assert converted(path) == b"\x33" * 65536 + bytes(3 * 65536) + b"\x33" * (2 * MIB - 4 * 65536)


def test_compressed_image_reads_and_cow(tmp_path):
    raw = tmp_path / "src.raw"
    rnd = random.Random(4)
    data = bytearray(b"".join(bytes([rnd.randrange(4)]) * 512 for _ in range(4 * 2048)))
    raw.write_bytes(data)
    path = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    img = open_image("qcow2", str(path))
    assert img.read(0, len(data)) == data
    img.write(70_000, b"new")
    data[70_000:70_003] = b"new"
    img.close()
    assert_clean(path)
    assert converted(path) == data


def test_bitmaps_survive_our_writes(tmp_path):
    """vmigrate maintains the bitmaps extension: autoclear bit 0 stays set.  Writes through a
    node are recorded and the bitmap is stored consistent at close; writes through the bare
    driver are not, so the bitmap stays marked in use (inconsistent) as the driver left it
    at open, and qemu-img check is clean either way."""
    path = create(tmp_path / "a.qcow2", 4 * MIB)
    qemu_img("bitmap", "--add", str(path), "b0")
    node = BlockNode("d0", open_image("qcow2", str(path)))
    assert node.bitmaps["b0"].persistent and node.bitmaps["b0"].count() == 0
    node.write(0, b"x" * 100)
    node.close()
    assert struct.unpack_from(">Q", path.read_bytes(), 88)[0] == 1
    assert_clean(path)
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    assert info["format-specific"]["data"]["bitmaps"] == [
        {"flags": ["auto"], "name": "b0", "granularity": 65536}]
    img = open_image("qcow2", str(path))
    img.write(0, b"y")
    img.close()
    assert struct.unpack_from(">Q", path.read_bytes(), 88)[0] == 1
    assert_clean(path)
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    assert info["format-specific"]["data"]["bitmaps"][0]["flags"] == ["in-use", "auto"]
    assert converted(path)[:101] == b"y" + b"x" * 99 + b"\0"


def _hostile(path: Path, offset: int, fmt: str, *values) -> None:
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, offset, *values)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name,damage,text", [
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:200_000]), "beyond the end of the file"),
    ("l1 beyond eof", lambda p: _hostile(p, 40, ">Q", 1 << 40), "active L1 table at"),
    ("huge l1", lambda p: _hostile(p, 36, ">I", 0xFFFFFFFF), "active L1 table too large"),
    ("reftable beyond eof", lambda p: _hostile(p, 48, ">Q", 1 << 36), "refcount table at"),
    ("snapshot table on data", lambda p: _hostile(p, 60, ">IQ", 3, 0x50000), "snapshot"),
    ("snapshot table on L1", lambda p: _hostile(p, 60, ">IQ", 3, 0x30000), "snapshot '' L1"),
    ("corrupt bit", lambda p: _hostile(p, 72, ">Q", 2), "marked corrupt"),
    ("dirty bit", lambda p: _hostile(p, 72, ">Q", 1), "qemu-img check -r all"),
])
def test_hostile_images_refused_unchanged(tmp_path, name, damage, text):
    path = create(tmp_path / "a.qcow2", 4 * MIB)
    img = open_image("qcow2", str(path))
    img.write(0, random.Random(2).randbytes(MIB))
    img.close()
    damage(path)
    before = sha(path)
    check_before = qemu_img("check", str(path), check=False)
    with pytest.raises(ImageError, match=text):
        open_image("qcow2", str(path))
    assert sha(path) == before
    check_after = qemu_img("check", str(path), check=False)
    assert (check_after.returncode, check_after.stdout) == (check_before.returncode,
                                                            check_before.stdout)
    assert re.sub(r"\s+", " ", check_after.stderr) == re.sub(r"\s+", " ", check_before.stderr)
