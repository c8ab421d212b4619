"""The block and dirty-bitmap wire codecs: byte vectors (QEMU 7.2's own for the bitmaps), hostile input,
and the destination halves that apply the records."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from vmigrate.block.node import BlockGraph, BlockNode
from vmigrate.block.raw import RawImage
from vmigrate.migration.block import BlockLoader
from vmigrate.migration.block_dirty_bitmap import DirtyBitmapLoader
from vmigrate.migration.savevm import LoadError
from vmigrate.migration.wire import WireError
from vmigrate.migration.wire import block as B
from vmigrate.migration.wire import dirty_bitmap as D
from vmigrate.migration.wire.buffer import Reader, Short
from vmigrate.migration.wire.stream import Section

VECTORS = Path(__file__).parent / "vectors"
MIB = 1 << 20


def decode_all(decoder, data: bytes) -> list:
    r = Reader(data, 0, len(data))
    events = []
    while True:
        ev, done = decoder.decode(r)
        events.append(ev)
        if done:
            assert r.pos == len(data)
            return events


# -- block ---------------------------------------------------------------------------------

def test_block_records_bytes():
    data = bytes(range(256)) * 4096
    assert B.device_block("drive0", 2048, data) == struct.pack(">Q", (2048 << 9) | 0x01) + b"\x06drive0"
    assert B.device_block("drive0", 4096, None) == struct.pack(">Q", (4096 << 9) | 0x09) + b"\x06drive0"
    assert B.progress(100) == struct.pack(">Q", (100 << 9) | 0x04)
    assert B.eos() == b"\x00" * 7 + b"\x02"


def test_block_decoder_events():
    data = bytes(range(256)) * 4096
    body = (B.progress(0) + B.device_block("d", 0, data) + data + B.device_block("d", 2048, None)
            + B.progress(100) + B.eos())
    events = decode_all(B.BlockBodyDecoder(), body)
    assert events == [B.BlkProgress(0), B.BlkChunk("d", 0, data), B.BlkChunk("d", 2048, None),
                      B.BlkProgress(100), B.BlkEOS()]
    assert events[2].offset == MIB


def test_block_decoder_hostile():
    with pytest.raises(WireError, match="Unknown block migration flags: 0x10"):
        decode_all(B.BlockBodyDecoder(), struct.pack(">Q", 0x10))
    with pytest.raises(WireError, match="unsupported version 2 for 'block' v1"):
        B.BlockBodyDecoder().begin(1, Section(1, "block", 0, 2))
    truncated = B.device_block("d", 0, bytes(MIB)) + bytes(100)
    with pytest.raises(Short):
        B.BlockBodyDecoder().decode(Reader(truncated, 0, len(truncated)))
    with pytest.raises(ValueError):
        B.device_block("x" * 256, 0, None)
    with pytest.raises(ValueError):
        B.device_block("d", 0, bytes(4096))


def raw_node(tmp_path: Path, size: int, device: str = "drive0", fill: int = 0x77) -> BlockNode:
    path = tmp_path / f"{device}.img"
    path.write_bytes(bytes([fill]) * size)
    return BlockNode(f"node-{device}", RawImage(str(path)), device=device)


def test_block_loader_writes_and_zeroes(tmp_path):
    graph = BlockGraph()
    node = graph.add(raw_node(tmp_path, 2 * MIB + 4096))
    chunk = bytearray(MIB)
    chunk[5] = 1
    loader = BlockLoader(graph)
    loader.load(B.BlkChunk("drive0", 0, bytes(chunk)))
    loader.load(B.BlkChunk("drive0", 2048, None))
    last = bytes([9]) * MIB
    loader.load(B.BlkChunk("drive0", 4096, last))  # 4 KiB of it fit before the end of the disk
    disk = node.read(0, node.size)
    assert disk[:MIB] == bytes(chunk) and disk[MIB:2 * MIB] == bytes(MIB)
    assert disk[2 * MIB:] == bytes([9]) * 4096 and node.size == 2 * MIB + 4096
    with pytest.raises(LoadError, match="Error unknown block device other"):
        loader.load(B.BlkChunk("other", 0, None))
    with pytest.raises(LoadError, match="beyond the end of device drive0"):
        loader.load(B.BlkChunk("drive0", 6144, None))


# -- dirty bitmaps ---------------------------------------------------------------------------

SETUP = (VECTORS / "dirty-bitmap-qemu72-setup.bin").read_bytes()
COMPLETE = (VECTORS / "dirty-bitmap-qemu72-complete.bin").read_bytes()


def qemu_bitmaps() -> dict[str, np.ndarray]:
    """The bits of the vectors' bitmaps on an 8 MiB disk (QEMU 7.2, qemu-io writes):
    b1 (512 B) saw ``write 4300k 1k``, b0 (64 KiB) ``write 1M 200k`` and that one."""
    b1 = np.zeros(8 * MIB // 512, bool)
    b1[4300 * 1024 // 512:(4300 + 1) * 1024 // 512] = True
    b0 = np.zeros(8 * MIB // 65536, bool)
    b0[MIB // 65536:-(-(MIB + 200 * 1024) // 65536)] = True
    b0[4300 * 1024 // 65536] = True
    return {"b1": b1, "b0": b0}


def test_qemu_dirty_bitmap_vectors_decode():
    events = decode_all(D.DirtyBitmapBodyDecoder(), SETUP)
    assert events == [D.BitmapStart(0x1C, "drive0", "b1", 512, 0), D.BitmapStart(0x14, None, "b0", 65536, 1),
                      D.BitmapEOS()]
    events = decode_all(D.DirtyBitmapBodyDecoder(), COMPLETE)
    kinds = [(type(e).__name__, getattr(e, "bitmap", None), getattr(e, "start_sector", None)) for e in events]
    assert kinds == [("BitmapBits", "b1", 0), ("BitmapBits", None, 8192), ("BitmapBits", "b0", 0),
                     ("BitmapComplete", "b1", None), ("BitmapComplete", "b0", None), ("BitmapEOS", None, None)]
    bits = qemu_bitmaps()
    b1 = np.zeros_like(bits["b1"])
    D.deserialize_zeroes(b1, 512, 0, 8192 * 512)
    D.deserialize_part(b1, 512, events[1].offset, events[1].length, events[1].data)
    assert np.array_equal(b1, bits["b1"])
    b0 = np.zeros_like(bits["b0"])
    D.deserialize_part(b0, 65536, 0, events[2].length, events[2].data)
    assert np.array_equal(b0, bits["b0"])


def test_dirty_bitmap_encoder_reproduces_qemu():
    """Same bitmaps, same order: the encoder's bytes are QEMU's, names only when changed,
    ZEROES for an empty chunk, buffers rounded to 32 bytes."""
    bits = qemu_bitmaps()
    state = D.HeaderState()
    setup = (D.start(state, "drive0", "b1", 512, 0) + D.start(state, "drive0", "b0", 65536, D.START_ENABLED)
             + D.eos())
    assert setup == SETUP
    body = b""
    for name, gran in (("b1", 512), ("b0", 65536)):
        total, per_chunk = 8 * MIB >> 9, D.CHUNK_BYTES * 8 * (gran >> 9)
        for sector in range(0, total, per_chunk):
            nr = min(per_chunk, total - sector)
            data = D.serialize_part(bits[name], gran, sector << 9, nr << 9)
            body += D.bits(state, "drive0", name, sector, nr, data)
    body += D.complete(state, "drive0", "b1") + D.complete(state, "drive0", "b0") + D.eos()
    assert body == COMPLETE


def test_dirty_bitmap_flags_extension_and_hostile():
    # 0x80: a second flag byte follows (a 7.2 sender never needs one, a reader takes it).
    ev, done = D.DirtyBitmapBodyDecoder().decode(Reader(b"\x80\x01", 0, 2))
    assert isinstance(ev, D.BitmapChunk) and ev.flags == 0x8001 and done  # EOS in the second byte
    with pytest.raises(WireError, match="Unknown flags"):
        D.DirtyBitmapBodyDecoder().decode(Reader(b"\x80\x80\x01\x00", 0, 4))
    big = b"\x40" + struct.pack(">QIQ", 0, 8, 10 * 1024 + 1)
    with pytest.raises(WireError, match="buffer allocation request is too large"):
        D.DirtyBitmapBodyDecoder().decode(Reader(big, 0, len(big)))
    with pytest.raises(Short):
        D.DirtyBitmapBodyDecoder().decode(Reader(b"\x48\x05dri", 0, 5))
    with pytest.raises(ValueError):
        D.start(D.HeaderState(), "n" * 256, "b", 512, 0)
    with pytest.raises(WireError, match="unsupported version 2"):
        D.DirtyBitmapBodyDecoder().begin(1, Section(3, "dirty-bitmap", 0, 2))


def bitmap_loader(tmp_path: Path) -> tuple[DirtyBitmapLoader, BlockNode]:
    graph = BlockGraph()
    node = graph.add(raw_node(tmp_path, 8 * MIB))
    return DirtyBitmapLoader(graph, None), node


def test_dirty_bitmap_loader_applies_the_qemu_stream(tmp_path):
    loader, node = bitmap_loader(tmp_path)
    for body in (SETUP, COMPLETE):
        for ev in decode_all(D.DirtyBitmapBodyDecoder(), body):
            if isinstance(ev, D.BitmapChunk):
                loader.header(ev)
                if isinstance(ev, D.BitmapStart):
                    loader.start(ev)
                elif isinstance(ev, D.BitmapBits):
                    loader.bits(ev)
                elif isinstance(ev, D.BitmapComplete):
                    loader.complete()
    bits = qemu_bitmaps()
    for name in ("b0", "b1"):
        assert np.array_equal(node.bitmaps[name].bits, bits[name]) and not node.bitmaps[name].busy
    assert not node.bitmaps["b0"].enabled
    loader.before_vm_start()
    assert node.bitmaps["b0"].enabled and not node.bitmaps["b1"].enabled


def test_dirty_bitmap_loader_hostile(tmp_path):
    loader, node = bitmap_loader(tmp_path)
    start = D.BitmapStart(0x1C, "drive0", "b0", 512, 0)
    loader.header(start)
    loader.start(start)
    beyond = D.BitmapBits(0x40, None, None, 8 * MIB >> 9, 8192, bytes(1024))
    loader.header(beyond)
    with pytest.raises(LoadError, match="beyond the bitmap"):
        loader.bits(beyond)
    # A buffer larger than the range needs (past the 32-byte rounding) cancels the bitmaps.
    oversized = D.BitmapBits(0x40, None, None, 0, 8, bytes(64))
    loader.bits(oversized)
    assert loader.cancelled and "b0" not in node.bitmaps
    loader, node = bitmap_loader(tmp_path)
    node.add_bitmap("b0", None, False, False)
    loader.header(start)
    with pytest.raises(LoadError, match=r"Bitmap with the same name \('b0'\) already exists on destination"):
        loader.start(start)
    loader, node = bitmap_loader(tmp_path)
    reserved = D.BitmapStart(0x1C, "drive0", "b0", 512, 0x08)
    loader.header(reserved)
    with pytest.raises(LoadError, match="Unknown flags in migrated dirty bitmap header: 8"):
        loader.start(reserved)
    loader, node = bitmap_loader(tmp_path)
    loader.header(D.BitmapStart(0x1C, "nosuch", "b0", 512, 0))
    assert loader.cancelled
