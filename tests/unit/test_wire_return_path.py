"""Return-path messages (destination -> source)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from vmigrate.migration.wire import NEED_DATA, WireError
from vmigrate.migration.wire import return_path as RP

BLOCKS = {"ram0": 64 << 20}


def decode(data: bytes, chunk: int | None = None, **kw) -> list:
    dec = RP.ReturnPathDecoder(**kw)
    events = []
    step = chunk or len(data)
    for i in range(0, len(data), step):
        dec.feed(data[i:i + step])
        while (ev := dec.next_event()) is not NEED_DATA:
            events.append(ev)
    return events


def test_message_bytes():
    assert RP.shut(0) == bytes.fromhex("0001000400000000")          # docs/qemu/stream.md §10
    assert RP.pong(7) == bytes.fromhex("0002000400000007")
    assert RP.req_pages_id("ram0", 0x5000, 0x1000) == bytes.fromhex(
        "00030011" "0000000000005000" "00001000" "0472616D30")
    assert RP.req_pages(0x6000, 0x1000) == bytes.fromhex("0004000C" "0000000000006000" "00001000")
    assert RP.resume_ack() == bytes.fromhex("0006000400000001")


def test_recv_bitmap_blob_layout():
    received = np.zeros(20, bool)
    received[[0, 3, 8, 19]] = True
    wire = RP.recv_bitmap("ram0", received)
    assert wire[:9] == bytes.fromhex("000500050472616D30")
    assert wire[9:17] == struct.pack(">Q", 8)                      # ceil(20/8)=3 -> 8
    assert wire[17:25] == bytes([0b00001001, 0b00000001, 0b00001000, 0, 0, 0, 0, 0])
    assert wire[25:] == struct.pack(">Q", 0x0123456789ABCDEF)
    (ev,) = decode(wire, blocks={"ram0": 20 * 4096})
    assert ev.block == "ram0" and np.array_equal(ev.received(20), received)


def test_roundtrip_in_any_chunking():
    stream = (RP.pong(1) + RP.req_pages_id("ram0", 0x5000, 0x2000) + RP.req_pages(0x9000, 0x1000)
              + RP.recv_bitmap("ram0", np.ones(16384, bool)) + RP.resume_ack() + RP.shut(0))
    for chunk in (None, 1, 5):
        events = decode(stream, chunk, blocks=BLOCKS)
        assert events[:3] == [RP.RpPong(1), RP.RpReqPages("ram0", 0x5000, 0x2000, True),
                              RP.RpReqPages("ram0", 0x9000, 0x1000, False)]
        assert len(events[3].bitmap) == 2048 and events[3].received(16384).all()
        assert events[4:] == [RP.RpResumeAck(1), RP.RpShut(0)]


@pytest.mark.parametrize("wire,match", [
    (RP.message(0), "RP: Received invalid message 0x0000 length 0x0000"),
    (RP.message(7, b"ab"), "RP: Received invalid message 0x0007 length 0x0002"),
    (RP.message(1, b"abc"), "'SHUT' message \\(0x0001\\) with incorrect length 3 expecting 4"),
    (struct.pack(">HH", 3, 600), "'REQ_PAGES_ID' message .* incorrect length 600"),
    (RP.message(3, bytes(12) + b"\x05ram0"), "Req_Page_id with length 17 expecting 18"),
    (RP.req_pages(0, 4096), "no previous block"),
    (RP.req_pages_id("nope", 0, 4096), "ram_save_queue_pages no block 'nope'"),
    (RP.req_pages_id("ram0", 0x800, 4096), "Misaligned page request, start: 800 len: 4096"),
    (RP.req_pages_id("ram0", 64 << 20, 4096), "request overrun start=4000000"),
    (RP.resume_ack(2), "illegal resume_ack value 2"),
    (RP.message(5, b""), "missing block name"),
    (RP.message(5, b"\x04nope") + struct.pack(">Q", 8), "invalid block name 'nope'"),
    (RP.message(5, b"\x04ram0") + struct.pack(">Q", 8), "bitmap size mismatch \\(0x8 != 0x800\\)"),
    (RP.recv_bitmap("ram0", np.zeros(16384, bool))[:-8] + bytes(8), "end mark incorrect: 0x0"),
])
def test_errors_resemble_qemu(wire, match):
    with pytest.raises(WireError, match=match):
        decode(wire, blocks=BLOCKS)


def test_colo_checkpoint_ready_ends_the_return_path():
    """A QEMU secondary's CHECKPOINT_READY (be32 0) where an RP header is due: an event with
    ``colo`` (the reader hands the channel to COLO), QEMU's error without."""
    ready = struct.pack(">I", 0)
    assert decode(RP.pong(1) + ready, chunk=1, colo=True) == [RP.RpPong(1), RP.RpColoReady()]
    with pytest.raises(WireError, match="invalid message 0x0000 length 0x0000"):
        decode(ready)
    with pytest.raises(WireError, match="invalid message 0x0000 length 0x0002"):
        decode(RP.message(0, b"ab"), colo=True)


def test_unbounded_bitmap_rejected_without_block_table():
    with pytest.raises(WireError, match="too large"):
        decode(RP.message(5, b"\x04ram0") + struct.pack(">Q", 1 << 40))


def test_decoder_stays_failed():
    dec = RP.ReturnPathDecoder()
    dec.feed(RP.message(0))
    with pytest.raises(WireError):
        dec.next_event()
    dec.feed(RP.pong(1))
    with pytest.raises(WireError, match="invalid message"):
        dec.next_event()
