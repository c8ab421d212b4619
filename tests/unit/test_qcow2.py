"""qcow2 and raw drivers against images built byte by byte here, checked by an independent
reference count and COPIED-flag walk (the checks qemu-img check makes, docs/interop/qcow2.txt)."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from image_model import scribble
from vmigrate.block.driver import ImageError
from vmigrate.block.formats import open_image
from vmigrate.block.qcow2 import Qcow2Image
from vmigrate.block.qcow2_file import HostFile
from vmigrate.block.qcow2_format import parse_header
from vmigrate.block.qcow2_l2 import (
    COMPRESSED_KIND, NORMAL, UNALLOCATED, ZERO_ALLOC, ZERO_PLAIN, EntryFormat)
from vmigrate.block.qcow2_snapshot import SnapshotEntry, next_id, pack_table, parse_table
from vmigrate.block.raw import RawImage

MIB = 1 << 20
COPIED = 1 << 63
OFFSET_MASK = 0x00FFFFFFFFFFFE00


def make_qcow2(path: Path, size: int, cluster_bits: int = 16, *, version: int = 3,
               refcount_order: int = 4, incompatible: int = 0, autoclear: int = 0,
               backing: str | None = None, backing_format: str | None = None,
               extensions: tuple[tuple[int, bytes], ...] = ()) -> Path:
    """An empty image: header, refcount table, one refcount block, L1 table."""
    cs = 1 << cluster_bits
    l1_size = -(-size // (cs * (cs // 8)))
    l1_clusters = max(1, -(-l1_size * 8 // cs))
    reftable, refblock, l1 = cs, 2 * cs, 3 * cs
    used = 3 + l1_clusters
    header_length = 104 if version == 3 else 72
    exts = b""
    if backing_format:
        extensions = ((0xE2792ACA, backing_format.encode()),) + tuple(extensions)
    for kind, data in extensions:
        exts += struct.pack(">II", kind, len(data)) + data + bytes(-len(data) % 8)
    exts += bytes(8)
    backing_offset = header_length + len(exts) if backing else 0
    head = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", version, backing_offset,
                       len(backing or ""), cluster_bits, size, 0, l1_size, l1, reftable, 1, 0, 0)
    if version == 3:
        head += struct.pack(">QQQII", incompatible, 0, autoclear, refcount_order, header_length)
    head += exts + (backing or "").encode()
    width = max(1, (1 << refcount_order) // 8)
    block = bytearray(cs)
    for c in range(used):
        block[c * width:(c + 1) * width] = (1).to_bytes(width, "big")
    buf = bytearray(used * cs)
    buf[:len(head)] = head
    buf[reftable:reftable + 8] = struct.pack(">Q", refblock)
    buf[refblock:refblock + cs] = block
    path.write_bytes(bytes(buf))
    return path


def check_image(path: Path) -> list[str]:
    """Independent consistency walk: every refcount equals its references, COPIED exact."""
    data = path.read_bytes()
    (_, version, _, _, cb, _, _, l1_size, l1_off, rt_off, rt_clusters, nb_sn,
     sn_off) = struct.unpack_from(">4sIQIIQIIQQIIQ", data)
    order = struct.unpack_from(">I", data, 96)[0] if version == 3 else 4
    cs = 1 << cb
    nclusters = -(-len(data) // cs) + 1
    expect = np.zeros(nclusters, np.int64)

    def ref(offset: int, length: int) -> None:
        expect[offset // cs:(offset + length - 1) // cs + 1] += 1

    def u64s(offset: int, count: int) -> np.ndarray:
        return np.frombuffer(data, ">u8", count, offset).astype(np.uint64)

    ref(0, cs)
    ref(rt_off, rt_clusters * cs)
    table = u64s(rt_off, rt_clusters * cs // 8)
    dtype = {3: ">u1", 4: ">u2", 5: ">u4", 6: ">u8"}[order]
    per_block = cs * 8 >> order
    actual = np.zeros(len(table) * per_block, np.int64)
    for i, off in enumerate(table.tolist()):
        if off:
            ref(off, cs)
            actual[i * per_block:(i + 1) * per_block] = np.frombuffer(data, dtype, per_block, off)
    l1s = [(l1_off, l1_size)]
    pos = sn_off
    for _ in range(nb_sn):
        o, n, idl, nl, *_, extra = struct.unpack_from(">QIHHIIQII", data, pos)
        l1s.append((o, n))
        length = 40 + extra + idl + nl
        pos += (length + 7) & ~7
    if nb_sn:
        ref(sn_off, pos - sn_off)
    shift = 62 - (cb - 8)
    errors = []
    for index, (off, n) in enumerate(l1s):
        if n:
            ref(off, n * 8)
        for l1e in u64s(off, n).tolist():
            l2 = l1e & OFFSET_MASK
            if not l2:
                continue
            ref(l2, cs)
            for e in u64s(l2, cs // 8).tolist():
                if e & (1 << 62):
                    coff = e & ((1 << shift) - 1)
                    sectors = ((e >> shift) & ((1 << (cb - 8)) - 1)) + 1
                    ref(coff, sectors * 512 - (coff & 511))
                elif e & OFFSET_MASK:
                    ref(e & OFFSET_MASK, cs)
    counts = np.zeros(nclusters, np.int64)
    counts[:min(nclusters, len(actual))] = actual[:nclusters]
    for c in np.flatnonzero(counts != expect).tolist():
        errors.append(f"cluster {c}: refcount {counts[c]} references {expect[c]}")
    for l1e in u64s(l1_off, l1_size).tolist():
        l2 = l1e & OFFSET_MASK
        if not l2:
            continue
        if bool(l1e & COPIED) != (counts[l2 // cs] == 1):
            errors.append(f"L1 entry for 0x{l2:x}: COPIED wrong")
        for e in u64s(l2, cs // 8).tolist():
            if e & (1 << 62):
                if e & COPIED:
                    errors.append("compressed entry with COPIED")
            elif e & OFFSET_MASK and bool(e & COPIED) != (counts[(e & OFFSET_MASK) // cs] == 1):
                errors.append(f"L2 entry 0x{e:x}: COPIED wrong")
    return errors


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("cluster_bits,order", [(16, 4), (12, 4), (9, 4), (12, 3), (12, 5),
                                                (12, 6)])
def test_random_writes_read_back_and_stay_consistent(tmp_path, cluster_bits, order):
    path = make_qcow2(tmp_path / "a.qcow2", 8 * MIB, cluster_bits, refcount_order=order)
    model = bytearray(8 * MIB)
    rnd = random.Random(cluster_bits * 10 + order)
    with_img = open_image("qcow2", str(path))
    scribble(with_img, model, rnd, 60, 200_000)
    assert with_img.read(0, len(model)) == model
    with_img.close()
    assert check_image(path) == []
    reopened = open_image("qcow2", str(path), read_only=True)
    assert reopened.read(0, len(model)) == model
    assert reopened.format_specific()["data"]["refcount-bits"] == 1 << order
    reopened.close()


def test_refcount_table_grows_and_new_blocks_describe_themselves(tmp_path):
    """512-byte clusters: one refcount block covers 256 clusters, one table cluster 64
    blocks, so 12 MiB of data needs more blocks and a relocated, bigger table."""
    path = make_qcow2(tmp_path / "a.qcow2", 16 * MIB, 9)
    img = open_image("qcow2", str(path))
    table_before = img.refs.table_offset
    data = random.Random(1).randbytes(12 * MIB)
    for off in range(0, len(data), MIB):
        img.write(off, data[off:off + MIB])
    assert img.refs.table_offset != table_before and img.refs.table_clusters > 1
    assert img.read(0, len(data)) == data
    img.close()
    assert check_image(path) == []


def test_write_zeroes_sets_zero_flag_and_frees_clusters(tmp_path):
    path = make_qcow2(tmp_path / "a.qcow2", 4 * MIB)
    img = open_image("qcow2", str(path))
    img.write(0, b"\xaa" * (4 * MIB))
    img.write_zeroes(65536 + 100, 3 * 65536)
    expect = bytearray(b"\xaa" * (4 * MIB))
    expect[65536 + 100:65536 + 100 + 3 * 65536] = bytes(3 * 65536)
    assert img.read(0, 4 * MIB) == expect
    l2 = img._l2(int(img.l1[0]) & OFFSET_MASK)
    assert int(l2[2]) == 1 and int(l2[3]) == 1
    assert img.allocated(2 * 65536, 65536)
    freed = img.refs.get(np.arange(0, 200))
    img.close()
    assert (freed == 0).sum() >= 2
    assert check_image(path) == []


def test_zero_cluster_hides_backing(tmp_path):
    base = make_qcow2(tmp_path / "base.qcow2", MIB)
    b = open_image("qcow2", str(base))
    b.write(0, b"\x55" * MIB)
    b.close()
    top = make_qcow2(tmp_path / "top.qcow2", MIB, backing="base.qcow2", backing_format="qcow2")
    img = open_image("qcow2", str(top))
    assert img.read(0, 10) == b"\x55" * 10 and not img.allocated(0, MIB)
    img.write_zeroes(65536, 65536)
    assert img.read(65536, 65536) == bytes(65536)
    assert img.allocated(65536, 1) and not img.allocated(0, 65536)
    img.close()
    assert check_image(top) == []


def test_backing_copy_on_write_and_allocation(tmp_path):
    base = make_qcow2(tmp_path / "base.qcow2", 2 * MIB, 12)
    b = open_image("qcow2", str(base))
    content = bytearray(random.Random(3).randbytes(MIB)) + bytearray(MIB)
    b.write(0, content[:MIB])
    b.close()
    top = make_qcow2(tmp_path / "top.qcow2", 4 * MIB, 12, backing="base.qcow2")
    img = open_image("qcow2", str(top))
    assert img.backing is not None and img.backing.format_name == "qcow2"
    model = content + bytearray(2 * MIB)
    img.write(5000, b"\x01" * 3000)
    model[5000:8000] = b"\x01" * 3000
    img.write(3 * MIB - 10, b"\x02" * 20)
    model[3 * MIB - 10:3 * MIB + 10] = b"\x02" * 20
    assert img.read(0, 4 * MIB) == model
    assert img.allocated(4096, 4096) and not img.allocated(8192, 4096)
    assert img.allocated(0, MIB)
    img.close()
    assert check_image(top) == []
    assert open_image("qcow2", str(top), backing=None).read(0, 4096) == bytes(4096)


def test_backing_given_as_driver_and_missing_backing(tmp_path):
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"\x07" * MIB)
    top = make_qcow2(tmp_path / "top.qcow2", 2 * MIB, backing="base.raw")
    img = open_image("qcow2", str(top))
    assert img.backing.format_name == "raw"
    assert img.read(MIB - 2, 4) == b"\x07\x07\x00\x00"
    img.close()
    mine = RawImage(str(raw), read_only=True)
    img = open_image("qcow2", str(top), backing=mine)
    assert img.backing is mine
    img.close()
    raw.unlink()
    with pytest.raises(ImageError, match="Could not open backing file 'base.raw'"):
        open_image("qcow2", str(top))


def test_compressed_cluster_reads(tmp_path):
    path = make_qcow2(tmp_path / "a.qcow2", MIB, 16)
    img = open_image("qcow2", str(path))
    img.write(0, b"\x11" * 65536)
    img.close()
    data = bytearray(path.read_bytes())
    plain = bytes(range(256)) * 256
    comp = zlib.compressobj(6, zlib.DEFLATED, -12)
    packed = comp.compress(plain) + comp.flush()
    coff = len(data) + 100
    data += bytes(100) + packed + bytes(-(len(data) + 100 + len(packed)) % 512)
    sectors = (coff + len(packed) - 1) // 512 - coff // 512
    l1 = struct.unpack_from(">Q", data, struct.unpack_from(">Q", data, 40)[0])[0] & OFFSET_MASK
    entry = (1 << 62) | (sectors << (62 - 8)) | coff
    struct.pack_into(">Q", data, l1 + 8, entry)
    path.write_bytes(bytes(data))
    img = open_image("qcow2", str(path))
    assert img.read(65536, 65536) == plain
    img.write(65536 + 10, b"\xff")
    assert img.read(65536, 65536) == plain[:10] + b"\xff" + plain[11:]
    img.close()


def test_snapshots_create_goto_delete_with_vmstate(tmp_path):
    path = make_qcow2(tmp_path / "a.qcow2", 4 * MIB, 12)
    img = open_image("qcow2", str(path))
    rnd = random.Random(5)
    model = bytearray(4 * MIB)
    scribble(img, model, rnd, 30, 100_000)
    vm = rnd.randbytes(50_000)
    img.write_vmstate(0, vm)
    s1 = img.create_snapshot("one", 100, 2, 3_000_000_000, len(vm))
    assert s1.id == "1" and s1.vm_state_size == len(vm)
    assert img.read_vmstate(0, len(vm)) == bytes(len(vm))
    at_one = bytes(model)
    scribble(img, model, rnd, 30, 100_000)
    s2 = img.create_snapshot("two", 200, 0, 4_000_000_000, 0, icount=77)
    assert [s.id for s in img.snapshots()] == ["1", "2"] and img.snapshots()[1].icount == 77
    scribble(img, model, rnd, 10, 100_000)
    assert check_image(path) == []
    img.goto_snapshot("1")
    assert img.read(0, 4 * MIB) == at_one
    assert img.read_vmstate(0, len(vm)) == vm
    assert check_image(path) == []
    img.delete_snapshot(s2.id)
    img.delete_snapshot("one")
    assert img.snapshots() == []
    assert img.read(0, 4 * MIB) == at_one
    img.close()
    assert check_image(path) == []
    img = open_image("qcow2", str(path))
    assert img.read(0, 4 * MIB) == at_one
    assert img.create_snapshot("again", 0, 0, 0, 0).id == "1"
    with pytest.raises(ImageError, match="longer than 65535"):
        img.create_snapshot("n" * 70000, 0, 0, 0, 0)
    img.close()
    with pytest.raises(ImageError, match="not found"):
        open_image("qcow2", str(path)).goto_snapshot("9")


def test_vmstate_grows_l1_and_snapshot_records_it(tmp_path):
    """With 512-byte clusters one L1 entry maps 32 KiB: 100 KiB of VM state grows the L1."""
    path = make_qcow2(tmp_path / "a.qcow2", 64 * 1024, 9)
    img = open_image("qcow2", str(path))
    assert len(img.l1) == 2
    vm = random.Random(8).randbytes(100 * 1024)
    img.write_vmstate(0, vm)
    assert len(img.l1) == 2 + 4
    img.create_snapshot("s", 0, 0, 0, len(vm))
    raw = path.read_bytes()
    off = struct.unpack_from(">Q", raw, 64)[0]
    assert struct.unpack_from(">I", raw, off + 8)[0] == 6
    img.goto_snapshot("1")
    assert img.read_vmstate(0, len(vm)) == vm
    img.close()
    assert check_image(path) == []


def test_entry_kinds_references_runs_and_copied():
    fmt = EntryFormat(16, True)
    comp = (1 << 62) | (2 << (62 - 8)) | (0x2FF00)
    entries = np.array([0, 1, 0x10000 | 1, 0x20000 | COPIED, 0x30000, comp, 0x40000, 0x50000],
                       np.uint64)
    assert fmt.kinds(entries).tolist() == [UNALLOCATED, ZERO_PLAIN, ZERO_ALLOC, NORMAL, NORMAL,
                                           COMPRESSED_KIND, NORMAL, NORMAL]
    assert EntryFormat(16, False).kinds(entries[:3]).tolist() == [UNALLOCATED, UNALLOCATED,
                                                                  NORMAL]
    start, length = fmt.compressed_extent(entries[5:6])
    assert (int(start[0]), int(length[0])) == (0x2FF00, 3 * 512 - 0x100)
    assert sorted(fmt.referenced_clusters(entries).tolist()) == [1, 2, 2, 3, 3, 4, 5]
    kinds = fmt.kinds(entries)
    assert fmt.runs(kinds, entries & np.uint64(OFFSET_MASK)) == [
        (0, 1), (1, 2), (2, 3), (3, 5), (5, 6), (6, 8)]
    flagged = fmt.with_copied(entries, lambda c: np.where(c == 3, 2, 1))
    assert [bool(int(e) & COPIED) for e in flagged] == [False, False, True, True, False,
                                                        False, True, True]
    assert fmt.l2_problem(np.array([0x10000 | 2], np.uint64), 1 << 20) == \
        "entry 0 (0x10002) has reserved bits set"
    assert fmt.l2_problem(np.array([0x10200], np.uint64), 1 << 20) == \
        "data cluster offset 0x10200 not cluster aligned"
    assert fmt.l1_problem(np.array([0x200000 | COPIED], np.uint64), 1 << 20) == \
        "L2 table offset 0x200000 beyond the end of the file"


def test_header_parse_pure(tmp_path):
    raw = make_qcow2(tmp_path / "a.qcow2", 5 * MIB, 12, backing="../b.img",
                     backing_format="raw", autoclear=3).read_bytes()
    h = parse_header(raw[:4096], len(raw), "a")
    assert (h.version, h.cluster_size, h.size, h.l1_size, h.autoclear) == (3, 4096, 5 * MIB, 3, 3)
    assert (h.backing_file, h.backing_format, h.refcount_order) == ("../b.img", "raw", 4)
    assert h.l1_entries_for(5 * MIB) == 3
    with pytest.raises(ImageError, match="qcow2 image 'a': active L1 table at 0x3000"):
        parse_header(raw[:4096], 4096 * 3, "a")


def test_snapshot_table_round_trip_keeps_unknown_extra_data():
    entries = [SnapshotEntry(0x30000, 3, "1", "a", 1, 2, 3, 4, 5, -1, b"\x09" * 8),
               SnapshotEntry(0x40000, 3, "7", "név", 1, 2, 3, 1 << 33, 5, 12)]
    raw = pack_table(entries)
    assert len(raw) % 8 == 0
    parsed, length = parse_table(lambda pos, n: raw[pos:pos + n], 2, 5, "x")
    assert parsed == entries and length == len(raw)
    assert next_id(parsed) == "8"


def test_unknown_autoclear_bits_cleared_on_first_write_unknown_extension_kept(tmp_path):
    """Bit 0 (bitmaps) stays: vmigrate maintains the bitmaps extension."""
    path = make_qcow2(tmp_path / "a.qcow2", MIB, autoclear=0b110,
                      extensions=((0x12345678, b"keep me"),))
    img = open_image("qcow2", str(path))
    assert img.read(0, 4) == bytes(4)
    assert struct.unpack_from(">Q", path.read_bytes(), 88)[0] == 0b110
    assert img.header.extensions == [(0x12345678, b"keep me")]
    img.write(0, b"x")
    img.close()
    raw = path.read_bytes()
    assert struct.unpack_from(">Q", raw, 88)[0] == 0 and b"keep me" in raw
    path = make_qcow2(tmp_path / "b.qcow2", MIB, autoclear=0b11)
    img = open_image("qcow2", str(path))
    img.write(0, b"x")
    img.close()
    assert struct.unpack_from(">Q", path.read_bytes(), 88)[0] == 0b01


def test_version2_reads_and_writes(tmp_path):
    path = make_qcow2(tmp_path / "a.qcow2", MIB, version=2)
    img = open_image("qcow2", str(path))
    img.write(100, b"abc")
    img.write_zeroes(0, 65536)
    assert img.read(0, 65536) == bytes(65536)
    assert img.format_specific()["data"]["compat"] == "0.10"
    img.close()
    assert check_image(path) == []


@pytest.mark.parametrize("kwargs,text", [
    ({"incompatible": 1}, "qemu-img check -r all"),
    ({"incompatible": 4}, "external data file"),
    ({"incompatible": 16}, "extended L2"),
    ({"incompatible": 8}, "compression type"),
    ({"incompatible": 1 << 9, "extensions": ((0x6803F857, bytes([0, 9]) + b"frobnicate".ljust(46, b"\0")),)},
     "frobnicate"),
    ({"refcount_order": 1}, "refcount width of 2 bits"),
])
def test_unsupported_features_refused(tmp_path, kwargs, text):
    path = make_qcow2(tmp_path / "a.qcow2", MIB, **kwargs)
    with pytest.raises(ImageError, match=text):
        open_image("qcow2", str(path), read_only=True)


def test_corrupt_bit_allows_read_only(tmp_path):
    path = make_qcow2(tmp_path / "a.qcow2", MIB, incompatible=2)
    with pytest.raises(ImageError, match="marked corrupt"):
        open_image("qcow2", str(path))
    img = open_image("qcow2", str(path), read_only=True)
    assert img.format_specific()["data"]["corrupt"] is True
    with pytest.raises(ImageError, match="read-only"):
        img.write(0, b"x")
    img.close()


def _patch(path: Path, offset: int, fmt: str, *values) -> None:
    raw = bytearray(path.read_bytes())
    struct.pack_into(fmt, raw, offset, *values)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage,text", [
    (lambda p: p.write_bytes(p.read_bytes()[:50]), "not a qcow2 image"),
    (lambda p: p.write_bytes(p.read_bytes()[:65536 + 100]), "beyond the end of the file"),
    (lambda p: _patch(p, 40, ">Q", 1 << 40), "active L1 table at 0x10000000000"),
    (lambda p: _patch(p, 36, ">I", 1 << 30), "active L1 table too large"),
    (lambda p: _patch(p, 48, ">Q", 1 << 30), "refcount table at 0x40000000"),
    (lambda p: _patch(p, 56, ">I", 1 << 28), "refcount table too large"),
    (lambda p: _patch(p, 20, ">I", 30), "unsupported cluster size"),
    (lambda p: _patch(p, 60, ">IQ", 70000, 65536), "too many snapshots"),
    (lambda p: _patch(p, 0, ">4s", b"QFI\x00"), "not a qcow2 image"),
    (lambda p: _patch(p, 3 * 65536, ">Q", (1 << 40) | COPIED), "L2 table offset 0x10000000000 beyond"),
    (lambda p: _patch(p, 65536, ">Q", 1 << 40), "refcount block offset 0x10000000000 beyond"),
])
def test_hostile_headers_refused_without_writing(tmp_path, damage, text):
    path = make_qcow2(tmp_path / "a.qcow2", MIB)
    damage(path)
    before = sha(path)
    with pytest.raises(ImageError, match=text):
        open_image("qcow2", str(path))
    assert sha(path) == before


def test_hostile_extensions_and_backing_names_refused(tmp_path):
    path = make_qcow2(tmp_path / "a.qcow2", MIB, extensions=((0x12345678, b"x" * 16),))
    _patch(path, 104 + 4, ">I", 1 << 20)
    with pytest.raises(ImageError, match="overruns the header cluster"):
        open_image("qcow2", str(path))
    path = make_qcow2(tmp_path / "b.qcow2", MIB, backing="base")
    _patch(path, 16, ">I", 5000)
    with pytest.raises(ImageError, match="backing file name"):
        open_image("qcow2", str(path))
    path = make_qcow2(tmp_path / "c.qcow2", MIB)
    _patch(path, 100, ">I", 100)
    with pytest.raises(ImageError, match="invalid header length"):
        open_image("qcow2", str(path))


def test_backing_loop_refused(tmp_path):
    path = make_qcow2(tmp_path / "loop.qcow2", MIB, backing="loop.qcow2", backing_format="qcow2")
    with pytest.raises(ImageError, match="deeper than 64"):
        open_image("qcow2", str(path))


def test_l2_entry_on_the_header_refused_before_writing(tmp_path):
    """A mapping that points a guest cluster at the header (refcount 1, COPIED) would have
    the write land on metadata: refused, file untouched."""
    path = make_qcow2(tmp_path / "a.qcow2", 2 * MIB)
    img = open_image("qcow2", str(path))
    img.write(0, b"x" * 100)
    img.close()
    l2 = struct.unpack_from(">Q", path.read_bytes(), 3 * 65536)[0] & OFFSET_MASK
    _patch(path, l2 + 8, ">Q", 0 | COPIED | 3 * 65536)
    before = sha(path)
    img = open_image("qcow2", str(path))
    with pytest.raises(ImageError, match="refusing to write over the active L1 table"):
        img.write(65536, b"boom")
    img.close()
    assert sha(path) == before


def test_metadata_with_zero_refcount_not_reused(tmp_path):
    """The L1 table's refcount cleared: allocation would hand its cluster out; refused."""
    path = make_qcow2(tmp_path / "a.qcow2", MIB)
    _patch(path, 2 * 65536 + 2 * 3, ">H", 0)
    before = sha(path)
    img = open_image("qcow2", str(path))
    img.refs.free_hint = 0
    with pytest.raises(ImageError, match="refusing to write over the active L1 table"):
        img.write(0, b"x")
    img.close()
    assert sha(path) == before


def test_snapshot_table_garbage_refused(tmp_path):
    path = make_qcow2(tmp_path / "a.qcow2", MIB)
    img = open_image("qcow2", str(path))
    img.create_snapshot("s", 0, 0, 0, 0)
    img.close()
    off = struct.unpack_from(">Q", path.read_bytes(), 64)[0]
    _patch(path, off, ">QIHHIIQII", 12345, 1 << 28, 5, 5, 0, 0, 0, 0, 0xFFFF)
    before = sha(path)
    with pytest.raises(ImageError, match="snapshot"):
        open_image("qcow2", str(path))
    assert sha(path) == before


def test_damaged_snapshot_l1_refused_by_goto_and_delete_unchanged(tmp_path):
    path = make_qcow2(tmp_path / "a.qcow2", MIB)
    img = open_image("qcow2", str(path))
    img.write(0, b"x" * 1000)
    img.create_snapshot("s", 0, 0, 0, 0)
    sn_l1 = img._snapshots[0].l1_table_offset
    img.close()
    _patch(path, sn_l1, ">Q", 1 << 44)
    before = sha(path)
    for action in ("goto_snapshot", "delete_snapshot"):
        img = open_image("qcow2", str(path))
        with pytest.raises(ImageError, match="snapshot '1' L1 table: L2 table offset"):
            getattr(img, action)("1")
        img.close()
    assert sha(path) == before


def test_bad_l2_entry_found_late_blocks_all_writes(tmp_path):
    path = make_qcow2(tmp_path / "a.qcow2", 2 * MIB)
    img = open_image("qcow2", str(path))
    img.write(0, b"x" * 100)
    img.close()
    l2 = struct.unpack_from(">Q", path.read_bytes(), 3 * 65536)[0] & OFFSET_MASK
    _patch(path, l2 + 8, ">Q", (1 << 45) | COPIED)
    before = sha(path)
    img = open_image("qcow2", str(path))
    with pytest.raises(ImageError, match="beyond the end of the file"):
        img.read(65536, 10)
    with pytest.raises(ImageError, match="inconsistent"):
        img.write(MIB + 5, b"y")
    img.close()
    assert sha(path) == before


def test_refcount_underflow_is_inconsistency(tmp_path):
    path = make_qcow2(tmp_path / "a.qcow2", MIB)
    img = open_image("qcow2", str(path))
    img.write(0, b"x" * 65536)
    data_cluster = (int(img._l2(int(img.l1[0]) & OFFSET_MASK)[0]) & OFFSET_MASK) >> 16
    img.close()
    _patch(path, 2 * 65536 + 2 * data_cluster, ">H", 0)
    img = open_image("qcow2", str(path))
    with pytest.raises(ImageError, match="below zero"):
        img.write_zeroes(0, 65536)
    with pytest.raises(ImageError, match="inconsistent"):
        img.write(0, b"z")
    img.close()


def test_refcount_overflow_refused_before_writing(tmp_path):
    """8-bit refcounts: the 255th snapshot would push the data cluster's count to 256."""
    path = make_qcow2(tmp_path / "a.qcow2", MIB, 12, refcount_order=3)
    img = open_image("qcow2", str(path))
    img.write(0, b"x" * 4096)
    for n in range(254):
        img.create_snapshot(f"s{n}", 0, 0, 0, 0)
    before = sha(path)
    with pytest.raises(ImageError, match="exceed its maximum 255"):
        img.create_snapshot("one too many", 0, 0, 0, 0)
    assert sha(path) == before
    img.write(0, b"y")
    img.close()
    assert check_image(path) == []


def test_out_of_range_requests_refused(tmp_path):
    img = open_image("qcow2", str(make_qcow2(tmp_path / "a.qcow2", MIB)))
    with pytest.raises(ImageError, match="beyond the end"):
        img.write(MIB - 1, b"ab")
    with pytest.raises(ImageError, match="beyond the end"):
        img.read(-1, 2)
    img.close()
    with pytest.raises(ImageError, match="Unknown driver"):
        open_image("vmdk", "x")
    with pytest.raises(ImageError, match="Could not open"):
        open_image("qcow2", str(tmp_path / "missing"))


def test_sequential_writes_and_reads_are_few_syscalls(tmp_path, monkeypatch):
    path = make_qcow2(tmp_path / "a.qcow2", 256 * MIB)
    img = open_image("qcow2", str(path))
    calls = []
    original = HostFile.write
    monkeypatch.setattr(HostFile, "write", lambda self, *a: (calls.append(1), original(self, *a)))
    chunk = os.urandom(MIB)
    for off in range(0, 64 * MIB, MIB):
        img.write(off, chunk)
    assert len(calls) <= 64 * 4
    calls.clear()
    img.write(MIB, chunk)
    assert len(calls) == 1
    reads = []
    for name in ("read_into", "read_data"):
        method = getattr(HostFile, name)
        monkeypatch.setattr(HostFile, name, lambda self, *a, _m=method: (reads.append(1), _m(self, *a))[1])
    assert img.read(5 * MIB, MIB) == chunk and len(reads) == 1
    img.write_zeroes(6 * MIB + 65536, 65536)
    reads.clear()
    assert img.read(6 * MIB, 3 * 65536) == chunk[:65536] + bytes(65536) + chunk[2 * 65536:3 * 65536]
    assert len(reads) == 2
    img.close()
    assert check_image(path) == []


def test_raw_image(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\x01" * (3 * MIB))
    img = open_image("raw", str(path))
    assert img.size == 3 * MIB and img.allocated(0, 1) and img.format_specific() is None
    img.write(10, b"abc")
    img.write_zeroes(4096, 2 * MIB)
    assert img.read(0, 16) == b"\x01" * 10 + b"abc" + b"\x01" * 3
    assert img.read(4096, 2 * MIB) == bytes(2 * MIB)
    assert img.read(2 * MIB + 4096, 1) == b"\x01"
    with pytest.raises(ImageError, match="beyond the end"):
        img.write(3 * MIB, b"x")
    img.flush()
    img.close()
    with pytest.raises(ImageError, match="read-only"):
        open_image("raw", str(path), read_only=True).write(0, b"x")


def test_qcow2_driver_properties(tmp_path):
    img = Qcow2Image(str(make_qcow2(tmp_path / "a.qcow2", 3 * MIB, 12)))
    assert (img.size, img.cluster_size, img.supports_snapshots, img.dirty_flag) == \
        (3 * MIB, 4096, True, False)
    assert img.format_specific() == {"type": "qcow2", "data": {
        "compat": "1.1", "compression-type": "zlib", "lazy-refcounts": False,
        "refcount-bits": 16, "corrupt": False, "extended-l2": False}}
    assert img.actual_size() > 0
    img.close()
