"""qcow2 persistent bitmaps: the codecs against byte vectors written from docs/interop/qcow2.txt,
hostile directories, and the driver and node storing, loading and removing bitmaps with
exact refcounts (checked by the independent walk of tests/unit/test_qcow2.py)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from test_qcow2 import check_image, make_qcow2
from vmigrate.block.driver import ImageError, StoredBitmap
from vmigrate.block.formats import open_image
from vmigrate.block.node import BlockNode
from vmigrate.block.qcow2_bitmap import (
    FLAG_AUTO, FLAG_IN_USE, BitmapEntry, BitmapsExtension, check_entry, decode_bits, encode_bits,
    entry_bytes, pack_directory, pack_extension, parse_bitmap_table, parse_directory,
    parse_extension, table_size)
from vmigrate.block.qcow2_format import EXT_BITMAPS
from vmigrate.errors import VMError

MIB = 1 << 20
CS = 65536


def test_extension_vector_and_checks():
    ext = BitmapsExtension(2, 64, 0x50000)
    raw = pack_extension(ext)
    assert raw == bytes.fromhex("00000002 00000000 0000000000000040 0000000000050000")
    assert parse_extension(raw, CS, "i") == ext
    for bad, text in [(raw[:-1], "invalid extension length"),
                      (raw[:4] + b"\0\0\0\1" + raw[8:], "reserved field"),
                      (struct.pack(">IIQQ", 0, 0, 64, 0x50000), "zero bitmaps"),
                      (struct.pack(">IIQQ", 65536, 0, 64, 0x50000), "exceeding"),
                      (struct.pack(">IIQQ", 1, 0, 64, 0x50200), "directory offset"),
                      (struct.pack(">IIQQ", 1, 0, 1 << 40, 0x50000), "directory size")]:
        with pytest.raises(ImageError, match=text):
            parse_extension(bad, CS, "i")


def test_directory_entry_vector_and_round_trip():
    entry = BitmapEntry("b0", 0x40000, 1, FLAG_AUTO | FLAG_IN_USE, 16)
    raw = pack_directory([entry])
    # table offset, table size, flags, type 1, granularity bits, name size, extra size, name, pad
    assert raw == bytes.fromhex("0000000000040000 00000001 00000003 01 10 0002 00000000"
                                "6230 000000000000")
    assert len(raw) == entry_bytes(2) == 32
    entries = [entry, BitmapEntry("ü" * 9, 0x70000, 3, 0, 9)]
    raw = pack_directory(entries)
    assert parse_directory(raw, 2, "i") == entries
    assert entries[0].in_use and entries[0].auto and not entries[1].auto
    assert entries[1].granularity == 512


@pytest.mark.parametrize("mutate,count,text", [
    (lambda r: r[:30], 1, "broken bitmap directory"),
    (lambda r: r[:20], 1, "broken bitmap directory"),
    (lambda r: r, 0, "more bitmaps"),
    (lambda r: r, 2, "fewer bitmaps"),
    (lambda r: r[:20] + b"\0\0\0\x08" + r[24:] + bytes(8), 1, "extra data"),
    (lambda r: r[:18] + b"\0\0" + r[20:], 1, "name of 0 bytes"),
    (lambda r: r[:18] + b"\x04\x00" + r[20:] + bytes(1024), 1, "name of 1024 bytes"),
    (lambda r: r + r, 2, "duplicate bitmap name"),
])
def test_hostile_directory_refused(mutate, count, text):
    raw = pack_directory([BitmapEntry("b0", 0x40000, 1, 0, 16)])
    with pytest.raises(ImageError, match=text):
        parse_directory(mutate(raw), count, "i")


@pytest.mark.parametrize("change,text", [
    ({"table_size": 0}, "constraints"), ({"table_offset": 0}, "constraints"),
    ({"table_offset": 0x40200}, "constraints"), ({"granularity_bits": 8}, "constraints"),
    ({"granularity_bits": 32}, "constraints"), ({"flags": 4}, "constraints"),
    ({"type": 2}, "constraints"), ({"table_size": 2}, "constraints"),
    ({"table_offset": 0x100000}, "beyond the end of the file"),
])
def test_entry_checked_against_the_image(change, text):
    fields = dict(name="b", table_offset=0x40000, table_size=1, flags=0, granularity_bits=16)
    check_entry(BitmapEntry(**fields), CS, 64 * MIB, 0x80000, "i")
    with pytest.raises(ImageError, match=text):
        check_entry(BitmapEntry(**{**fields, **change}), CS, 64 * MIB, 0x80000, "i")
    # An in-use bitmap may have a stale table size (never read).
    check_entry(BitmapEntry(**{**fields, "table_size": 2, "flags": FLAG_IN_USE}), CS, 64 * MIB,
                0x100000, "i")


def test_table_entries_checked():
    good = np.array([0, 1, 0x50000], ">u8").tobytes()
    assert parse_bitmap_table(good, CS, 0x60000, "i", "b").tolist() == [0, 1, 0x50000]
    for entry in (0x50001, 0x50200, 0x2, 1 << 56, 0x60000):
        with pytest.raises(ImageError, match="invalid table entry 0"):
            parse_bitmap_table(struct.pack(">Q", entry), CS, 0x60000, "i", "b")


def test_bit_order_is_least_significant_first():
    """Bit n of the bitmap is bit n % 8 of data byte n // 8 (qcow2.txt "Bitmap data")."""
    bits = np.zeros(20, bool)
    bits[[0, 9, 19]] = True
    kinds, clusters = encode_bits(bits, 512)
    assert kinds.tolist() == [-1] and clusters.shape == (1, 512)
    assert clusters[0, :3].tolist() == [0x01, 0x02, 0x08] and not clusters[0, 3:].any()
    back = decode_bits(np.array([0x50000], np.uint64), lambda off: clusters[0].tobytes(), 20, 512)
    assert (back == bits).all()


def test_zero_and_one_clusters_become_table_entries():
    nbits = 3 * 512 * 8 + 10          # three whole clusters and a partial one
    bits = np.zeros(nbits, bool)
    bits[4096:8192] = True            # cluster 1 all ones
    bits[8192 + 5] = True             # cluster 2 data
    bits[3 * 4096:] = True            # the partial last cluster: data (tail bits must be 0)
    kinds, clusters = encode_bits(bits, 512)
    assert kinds.tolist() == [0, 1, -1, -1]
    assert clusters[3, :2].tolist() == [0xFF, 0x03] and not clusters[3, 2:].any()
    table = np.array([0, 1, 0x1000, 0x2000], np.uint64)
    data = {0x1000: clusters[2].tobytes(), 0x2000: clusters[3].tobytes()}
    assert (decode_bits(table, data.__getitem__, nbits, 512) == bits).all()


def test_table_size_counts_bytes_of_bits():
    assert table_size(64 * MIB, 65536, CS) == 1
    assert table_size(32 << 30, 65536, CS) == 1          # 512 Ki bits = 64 KiB
    assert table_size((32 << 30) + 1, 65536, CS) == 2
    assert table_size(1, 512, 512) == 1


# -- the driver and the node, against the independent refcount walk -------------------------

def assert_refcounts(path: Path) -> None:
    """The independent walk knows no bitmaps: its only complaints must be exactly the
    clusters of the bitmap directory, tables and data, each with refcount 1."""
    raw = path.read_bytes()
    img = open_image("qcow2", str(path), read_only=True)
    held = set()
    d = img._bitmap_dir
    held.update(range(d.directory_offset // CS, -(-(d.directory_offset + d.directory_size) // CS)))
    for entry, table in img._bitmaps:
        held.update(range(entry.table_offset // CS, -(-(entry.table_offset + 8 * entry.table_size) // CS)))
        held.update((int(t) // CS for t in table.tolist() if t > 1))
    img.close()
    assert struct.unpack_from(">I", raw, 20)[0] == 16
    assert sorted(check_image(path)) == sorted(f"cluster {c}: refcount 1 references 0" for c in held)


def _stored(name: str, size: int, granularity: int, dirty: list[int], enabled: bool = True):
    bits = np.zeros(-(-size // granularity), bool)
    bits[dirty] = True
    return StoredBitmap(name, granularity, enabled, False, bits)


def test_store_load_remove_round_trip(tmp_path):
    path = make_qcow2(tmp_path / "a.qcow2", 64 * MIB)
    img = open_image("qcow2", str(path))
    assert img.supports_persistent_bitmaps and img.stored_bitmaps() == []
    a = _stored("a", 64 * MIB, 65536, [0, 1, 1023])
    b = _stored("b", 64 * MIB, 512, list(range(4096 * 8)), enabled=False)   # one all-ones cluster
    img.store_bitmaps([a, b])
    img.close()
    assert struct.unpack_from(">Q", path.read_bytes(), 88)[0] == 1
    assert_refcounts(path)
    img = open_image("qcow2", str(path), read_only=True)
    loaded = img.stored_bitmaps()
    img.close()
    assert [(s.name, s.granularity, s.enabled, s.inconsistent) for s in loaded] == [
        ("a", 65536, True, False), ("b", 512, False, False)]
    assert (loaded[0].bits == a.bits).all() and (loaded[1].bits == b.bits).all()
    img = open_image("qcow2", str(path))
    assert [e.in_use for e, _ in img._bitmaps] == [True, True]
    img.remove_stored_bitmap("a")
    img.close()
    assert_refcounts(path)
    img = open_image("qcow2", str(path))
    assert [(s.name, s.inconsistent) for s in img.stored_bitmaps()] == [("b", True)]
    img.store_bitmaps([])
    img.close()
    raw = path.read_bytes()
    assert struct.unpack_from(">Q", raw, 88)[0] == 0
    assert struct.pack(">I", EXT_BITMAPS) not in raw[:CS]
    assert check_image(path) == []


def test_node_loads_stores_and_keeps_inconsistent(tmp_path):
    path = make_qcow2(tmp_path / "a.qcow2", 8 * MIB)
    node = BlockNode("d0", open_image("qcow2", str(path)))
    node.add_bitmap("p", 65536, persistent=True, disabled=False)
    node.add_bitmap("t", 65536, persistent=False, disabled=False)
    node.write(3 * 65536, b"x")
    node.close()
    node = BlockNode("d0", open_image("qcow2", str(path)))
    assert list(node.bitmaps) == ["p"] and node.bitmaps["p"].info() == {
        "name": "p", "recording": True, "persistent": True, "busy": False,
        "granularity": 65536, "count": 65536}
    node.driver.close()                      # a crash: "p" stays in use
    node = BlockNode("d0", open_image("qcow2", str(path)))
    p = node.bitmaps["p"]
    assert p.inconsistent and not p.enabled and p.info()["inconsistent"] is True
    node.write(0, b"y")
    node.close()
    assert_refcounts(path)
    node = BlockNode("d0", open_image("qcow2", str(path), read_only=True))
    assert node.bitmaps["p"].inconsistent and node.bitmaps["p"].readonly
    node.close()


def test_persistent_add_rules(tmp_path):
    node = BlockNode("d0", open_image("qcow2", str(make_qcow2(tmp_path / "v2.qcow2", MIB,
                                                               version=2))))
    with pytest.raises(VMError, match="^Can't make bitmap 'b' persistent in 'd0': "
                                      "Cannot store dirty bitmaps in qcow2 v2 files$"):
        node.add_bitmap("b", None, True, False)
    node.close()
    node = BlockNode("d0", open_image("qcow2", str(make_qcow2(tmp_path / "v3.qcow2", MIB))))
    with pytest.raises(VMError, match=r"Granularity exceeds maximum \(2147483648 bytes\)"):
        node.add_bitmap("b", 1 << 32, True, False)
    with pytest.raises(VMError, match=r"Name length exceeds maximum \(1023 characters\)"):
        node.add_bitmap("n" * 1024, None, True, False)
    node.add_bitmap("b", 512, True, False)
    with pytest.raises(VMError, match="Bitmap already exists: b"):
        node.add_bitmap("b", None, True, False)
    node.close()


def test_no_room_in_header_cluster(tmp_path):
    """A 512-byte cluster whose header area is nearly full refuses the extension, unchanged."""
    filler = (0x12345678, bytes(512 - 104 - 8 - 8 - 16))
    path = make_qcow2(tmp_path / "a.qcow2", MIB, cluster_bits=9, extensions=(filler,))
    before = path.read_bytes()
    img = open_image("qcow2", str(path))
    with pytest.raises(ImageError, match="no room in the header cluster"):
        img.store_bitmaps([_stored("a", MIB, 65536, [0])])
    img.close()
    assert path.read_bytes()[:512] == before[:512]
    assert check_image(path) == []


def test_commands_follow_qemus_bitmap_checks(tmp_path):
    """clear refuses inconsistent and read-only bitmaps, enable/disable inconsistent ones,
    remove read-only ones only (block/monitor/bitmap-qmp-cmds.c)."""
    from types import SimpleNamespace

    from vmigrate.block.node import BlockGraph
    from vmigrate.commands import block as commands

    path = make_qcow2(tmp_path / "a.qcow2", MIB)
    img = open_image("qcow2", str(path))
    img.store_bitmaps([_stored("b", MIB, 65536, [0])])
    img.close()
    img = open_image("qcow2", str(path))
    img.close()                                  # left in use: inconsistent from now on
    for read_only, refused in ((True, {"clear", "enable", "disable", "remove"}),
                               (False, {"clear", "enable", "disable"})):
        graph = BlockGraph()
        graph.add(BlockNode("d0", open_image("qcow2", str(path), read_only=read_only)))
        vm = SimpleNamespace(block=graph)
        for name in ("clear", "enable", "disable", "remove"):
            handler = getattr(commands, f"block_dirty_bitmap_{name}")
            if name in refused:
                with pytest.raises(VMError, match="^Bitmap 'b' is (inconsistent and cannot be "
                                                  "used|readonly and cannot be modified)$"):
                    handler(vm, {"node": "d0", "name": "b"}, None)
            else:
                handler(vm, {"node": "d0", "name": "b"}, None)
        graph.close()
    img = open_image("qcow2", str(path), read_only=True)
    assert img.stored_bitmaps() == []
    img.close()
    assert check_image(path) == []
