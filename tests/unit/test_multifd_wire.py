"""Multifd packets and payload streams, against bytes recorded from a real QEMU 7.2 source."""

from __future__ import annotations

import json
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from hostile import zstd_rle_frame
from vmigrate.migration.wire import WireError
from vmigrate.migration.wire import multifd as M

VECTORS = Path(__file__).parent / "vectors"
PAGE = 4096
BLOCKS = {"ram": 1 << 20}


def qemu_ram() -> np.ndarray:
    """The RAM of the recorded source (vectors/multifd72.json)."""
    ram = np.zeros((256, PAGE), np.uint8)
    for i in range(256):
        if i % 4:
            ram[i] = (np.arange(PAGE) * (i % 13 + 1) + i).astype(np.uint8)
    return ram


def packets(raw: bytes):
    """(header, payload) of each packet after the initial packet."""
    pos = M.INITIAL_PACKET_SIZE
    while pos < len(raw):
        head = M.decode_packet_header(raw[pos:pos + M.HEADER_SIZE], BLOCKS)
        pos += M.HEADER_SIZE
        size = head.next_packet_size if head.normal_pages else 0
        yield head, raw[pos:pos + size]
        pos += size


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_recorded_qemu_channels_decode_to_its_ram(method):
    meta = json.loads((VECTORS / "multifd72.json").read_text())
    ram = qemu_ram()
    got = np.zeros_like(ram)
    seen = np.zeros(256, bool)
    total_packets = total_pages = 0
    for cid in (0, 1):
        raw = (VECTORS / f"multifd72-{method}-ch{cid}.bin").read_bytes()
        assert M.decode_initial_packet(raw[:64], bytes(16), 2) == cid
        dec = M.PayloadDecoder(method, cid)
        syncs = 0
        for head, payload in packets(raw):
            total_packets += 1
            syncs += head.sync
            if not head.normal_pages:
                continue
            dec.check_flags(head)
            data = np.frombuffer(dec.decode(head, payload), np.uint8).reshape(-1, PAGE)
            idx = head.offsets // PAGE
            got[idx] = data
            seen[idx] = True
            total_pages += head.normal_pages
        assert syncs == 3          # START, one PART, END
    nonzero = ram.any(axis=1)
    assert np.array_equal(seen, nonzero) and np.array_equal(got[nonzero], ram[nonzero])
    stats = meta["query-migrate"]
    assert total_pages == stats["normal"]
    assert total_pages * PAGE + total_packets * M.HEADER_SIZE == stats["multifd-bytes"]


def test_recorded_streams_have_one_header_per_channel():
    """zlib: '78 01' only in the first data packet, each packet ends with the sync-flush marker;
    zstd: one frame for the channel, the magic only at its start."""
    for cid in (0, 1):
        z = [p for h, p in packets((VECTORS / f"multifd72-zlib-ch{cid}.bin").read_bytes()) if h.normal_pages]
        assert z[0][:2] == b"\x78\x01" and all(p[-4:] == b"\x00\x00\xff\xff" for p in z)
        assert all(p[:2] != b"\x78\x01" for p in z[1:])
        s = [p for h, p in packets((VECTORS / f"multifd72-zstd-ch{cid}.bin").read_bytes()) if h.normal_pages]
        assert s[0][:4] == b"\x28\xb5\x2f\xfd" and all(b"\x28\xb5\x2f\xfd" not in p for p in s[1:])


def test_initial_packet_layout_and_checks():
    uuid = bytes(range(16))
    pkt = M.initial_packet(uuid, 1)
    assert pkt == bytes.fromhex("11223344 00000001") + uuid + b"\x01" + bytes(39)
    assert M.decode_initial_packet(pkt, uuid, 2) == 1
    with pytest.raises(WireError, match="received uuid '00010203-0405-0607-0809-0a0b0c0d0e0f' and "
                                        "expected uuid '00000000-0000-0000-0000-000000000000' for channel 1"):
        M.decode_initial_packet(pkt, bytes(16), 2)
    with pytest.raises(WireError, match="magic"):
        M.decode_initial_packet(b"\0" + pkt[1:], uuid, 2)
    with pytest.raises(WireError, match="version"):
        M.decode_initial_packet(pkt[:7] + b"\x02" + pkt[8:], uuid, 2)
    with pytest.raises(WireError, match="channel id 1"):
        M.decode_initial_packet(pkt, uuid, 1)


def test_header_layout_round_trip_and_stale_fields_of_empty_packets():
    head = M.packet_header(M.FLAG_SYNC | M.FLAG_ZLIB, 2, 777, 9, "ram", [0x3000, 0x1000])
    assert len(head) == 1344
    assert struct.unpack_from(">IIIIIIQ", head) == (0x11223344, 1, 3, 128, 2, 777, 9)
    assert head[64:68] == b"ram\0" and struct.unpack_from(">QQ", head, 320) == (0x3000, 0x1000)
    info = M.decode_packet_header(head, BLOCKS)
    assert (info.sync, info.ramblock, info.offsets.tolist()) == (True, "ram", [0x3000, 0x1000])
    # An empty packet may carry a stale block name and size: both are ignored.
    stale = bytearray(M.packet_header(0, 0, 0, 4, None, ()))
    stale[20:24] = struct.pack(">I", 286720)
    stale[64:72] = b"nosuchbk"
    empty = M.decode_packet_header(bytes(stale), BLOCKS)
    assert (empty.normal_pages, empty.ramblock, empty.sync) == (0, None, False)


@pytest.mark.parametrize("patch,match", [
    ((0, b"\0\0\0\0"), "magic"),
    ((4, b"\0\0\0\2"), "version"),
    ((12, struct.pack(">I", 129)), "with size 129"),
    ((16, struct.pack(">I", 129)), "with 129 pages"),
    ((64, b"rom\0"), "unknown ram block rom"),
    ((320, struct.pack(">Q", 1 << 20)), "offset too long"),
    ((320, struct.pack(">Q", 0x10)), "not page aligned"),
])
def test_header_checks(patch, match):
    head = bytearray(M.packet_header(0, 1, 4096, 0, "ram", [0]))
    at, data = patch
    head[at:at + len(data)] = data
    with pytest.raises(WireError, match=match):
        M.decode_packet_header(bytes(head), BLOCKS)


@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
def test_payload_streams_continue_across_packets(method):
    ram = qemu_ram()
    enc = M.PayloadEncoder(method, 3)
    dec = M.PayloadDecoder(method, 0)
    for start in range(0, 256, 64):
        pages = ram[start:start + 64]
        # Runs of one packet go into the stream one by one (the sender's page runs of guest RAM).
        payload = b"".join(enc.encode([pages[:5], pages[5:6], pages[6:]] if start % 128 else [pages]))
        head = M.decode_packet_header(M.packet_header(enc.flag, 64, len(payload), 0, "ram",
                                                      np.arange(start, start + 64) * PAGE), BLOCKS)
        dec.check_flags(head)
        assert bytes(dec.decode(head, payload)) == pages.tobytes()
    if method == "zlib":
        # The whole channel is one deflate stream: a fresh decoder cannot start mid-way.
        with pytest.raises(zlib.error):
            zlib.decompressobj().decompress(payload)


def test_payload_decoder_checks():
    dec = M.PayloadDecoder("zlib", 1)
    head = M.decode_packet_header(M.packet_header(M.FLAG_ZSTD, 1, 10, 0, "ram", [0]), BLOCKS)
    with pytest.raises(WireError, match="multifd 1: flags received 4 flags expected 2"):
        dec.check_flags(head)
    head = M.decode_packet_header(M.packet_header(M.FLAG_ZLIB, 1, 10, 0, "ram", [0]), BLOCKS)
    c = zlib.compressobj(1)
    # More output than the packet's pages is an error (inflating stops one byte past them).
    with pytest.raises(WireError, match="packet size received 4097 size expected 4096"):
        dec.decode(head, c.compress(bytes(2 * PAGE)) + c.flush(zlib.Z_SYNC_FLUSH))
    big = M.decode_packet_header(M.packet_header(M.FLAG_ZSTD, 1, M.MAX_COMPRESSED_PAYLOAD + 1, 0, "ram", [0]),
                                 BLOCKS)
    with pytest.raises(WireError, match="exceeds"):
        M.PayloadDecoder("zstd", 0).payload_size(big)
    with pytest.raises(WireError, match="zstd stream error"):
        M.PayloadDecoder("zstd", 0).decode(big, b"not zstd at all")


def test_zstd_payload_never_expands_past_the_packet_pages():
    """8 KiB of zstd declaring 256 MiB: refused after one packet's worth, without allocating the rest."""
    bomb = zstd_rle_frame(2046)
    assert len(bomb) <= 8192
    head = M.decode_packet_header(M.packet_header(M.FLAG_ZSTD, 1, len(bomb), 0, "ram", [0]), BLOCKS)
    dec = M.PayloadDecoder("zstd", 3)
    assert dec.payload_size(head) == len(bomb)
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="multifd 3: packet size received more than 4096 size expected 4096"):
            dec.decode(head, bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * M.PACKET_BYTES
    # One block of exactly the packet's page is accepted.
    assert bytes(M.PayloadDecoder("zstd", 0).decode(head, zstd_rle_frame(1, PAGE))) == b"\xaa" * PAGE


def test_initial_packet_channel_id_must_be_below_the_channel_count():
    """QEMU 7.2 also accepts id == channels (an off-by-one past its array); vmigrate refuses it."""
    uuid = bytes(range(16))
    assert M.decode_initial_packet(M.initial_packet(uuid, 1), uuid, 2) == 1
    with pytest.raises(WireError, match="received channel id 2 expected below 2"):
        M.decode_initial_packet(M.initial_packet(uuid, 2), uuid, 2)
