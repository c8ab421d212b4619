"""RAM section records: the vectorized page encoder and decoder."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from vmigrate.migration.wire import NEED_DATA, WireError
from vmigrate.migration.wire import ram as R
from vmigrate.migration.wire.buffer import Reader, Short
from vmigrate.migration.wire.stream import Section

PAGE = 4096


def image(npages: int, seed: int = 1, zero_every: int | None = 3) -> np.ndarray:
    """Random pages; every ``zero_every``-th page (from page 0) all zero."""
    rng = np.random.default_rng(seed)
    ram = rng.integers(1, 256, size=(npages, PAGE), dtype=np.uint8)
    if zero_every:
        ram[::zero_every] = 0
    return ram


def body_events(data: bytes, blocks: dict, chunk: int | None = None, **kw) -> list:
    """Decode bare records (as on the preempt channel) with a RecordStream."""
    dec = R.RamBodyDecoder(blocks, **kw)
    rs = R.RecordStream(dec)
    events = []
    step = chunk or len(data)
    for i in range(0, len(data), step):
        rs.feed(data[i:i + step])
        while (ev := rs.next_event()) is not NEED_DATA:
            events.append(ev)
    return events


def apply(events: list, blocks: dict) -> dict[str, np.ndarray]:
    mem = {b: np.full((n // PAGE, PAGE), 0xEE, np.uint8) for b, n in blocks.items()}
    for ev in events:
        if isinstance(ev, R.RamPages):
            mem[ev.block][ev.pages] = ev.data
        elif isinstance(ev, R.RamZeroPages):
            mem[ev.block][ev.pages] = ev.fill[:, None]
    return mem


# -- encoder ---------------------------------------------------------------------

def test_encode_layout_and_counts():
    ram = image(10)
    ch = R.ChannelState()
    wire, counts = R.encode_pages("ram0", ram, [1, 0, 3, 4, 9], ch)
    wire = bytes(wire)
    # zero pages 0, 3, 9 first (first record names the block), then pages 1, 4.
    assert wire[:8] == struct.pack(">Q", 0x0 | 0x02) and wire[8:14] == b"\x04ram0\x00"
    assert wire[14:23] == struct.pack(">Q", 0x3000 | 0x22) + b"\x00"
    assert wire[23:32] == struct.pack(">Q", 0x9000 | 0x22) + b"\x00"
    assert wire[32:40] == struct.pack(">Q", 0x1000 | 0x28)
    assert wire[40:40 + PAGE] == ram[1].tobytes()
    assert wire[40 + PAGE:48 + PAGE] == struct.pack(">Q", 0x4000 | 0x28)
    assert wire[48 + PAGE:] == ram[4].tobytes()
    assert counts == R.RamSendCounts(3, 2, 3 * 9 + 5, 2 * 4104)
    assert len(wire) == counts.bytes
    assert ch.last_block == "ram0"


def test_continue_iff_same_block_as_last_on_channel():
    ram = image(4, zero_every=None)
    ch = R.ChannelState()
    first, c1 = R.encode_pages("a", ram, [0], ch)
    again, c2 = R.encode_pages("a", ram, [1], ch)
    other, c3 = R.encode_pages("bb", ram, [2], ch)
    assert bytes(first)[:10] == struct.pack(">Q", 0x08) + b"\x01a"
    assert bytes(again)[:8] == struct.pack(">Q", 0x1028) and len(again) == 4104
    assert bytes(other)[:11] == struct.pack(">Q", 0x2008) + b"\x02bb"
    assert (c1.normal_bytes, c2.normal_bytes, c3.normal_bytes) == (4106, 4104, 4107)
    ch.reset()
    assert bytes(R.encode_pages("bb", ram, [3], ch)[0])[8:11] == b"\x02bb"


def test_encode_non_contiguous_ram_and_empty_batch():
    big = image(6, seed=4)
    wide = np.zeros((6, 2 * PAGE), np.uint8)
    wide[:, :PAGE] = big
    view = wide[:, :PAGE]
    assert not view.flags.c_contiguous
    a, ca = R.encode_pages("r", view, np.arange(6), R.ChannelState())
    b, cb = R.encode_pages("r", big, np.arange(6), R.ChannelState())
    assert bytes(a) == bytes(b) and ca == cb
    empty, counts = R.encode_pages("r", big, [], R.ChannelState())
    assert len(empty) == 0 and counts.bytes == 0
    with pytest.raises(ValueError):
        R.encode_pages("r", big, [6], R.ChannelState())


def test_mem_size_record():
    assert R.mem_size([("ram", 64 << 20)]) == bytes.fromhex(
        "0000000004000004" "0372616D" "0000000004000000")
    two = R.mem_size([R.RamBlockInfo("a", 0x2000, page_size=0x200000, gpa=0x1000), ("b", 0x1000)])
    assert two == (struct.pack(">Q", 0x3004) + b"\x01a" + struct.pack(">QQQ", 0x2000, 0x200000, 0x1000)
                   + b"\x01b" + struct.pack(">Q", 0x1000))
    assert R.eos() == bytes.fromhex("0000000000000010")


# -- decoder ---------------------------------------------------------------------

def test_roundtrip_random_batches_any_chunking():
    blocks = {"ram0": 64 * PAGE, "pc.rom": 8 * PAGE}
    mems = {"ram0": image(64, seed=2), "pc.rom": image(8, seed=3, zero_every=2)}
    ch = R.ChannelState()
    rng = random.Random(5)
    wire = b""
    sent = {b: set() for b in blocks}
    for _ in range(12):
        name = rng.choice(sorted(blocks))
        n = blocks[name] // PAGE
        pages = np.array(sorted(rng.sample(range(n), rng.randrange(1, n))))
        sent[name] |= set(pages.tolist())
        wire += bytes(R.encode_pages(name, mems[name], pages, ch)[0])
    wire += R.eos()
    for chunk in (None, 1, 7, 4104, 5000):
        events = body_events(wire, blocks, chunk)
        assert isinstance(events[-1], R.RamEOS)
        got = apply(events, blocks)
        for name in blocks:
            idx = sorted(sent[name])
            assert np.array_equal(got[name][idx], mems[name][idx])


def test_long_runs_decode_as_one_event():
    """Vectorization: 16384 pages of one kind arrive as (lead record + one run)."""
    n = 16384
    ram = np.ones((n, PAGE), np.uint8)
    ram[: n // 2] = 0
    wire = bytes(R.encode_pages("ram", ram, np.arange(n), R.ChannelState())[0]) + R.eos()
    events = body_events(wire, {"ram": n * PAGE})
    assert [type(e).__name__ for e in events] == [
        "RamZeroPages", "RamZeroPages", "RamPages", "RamEOS"]
    assert [len(e) for e in events[:3]] == [1, n // 2 - 1, n // 2]
    pages = events[2]
    assert pages.data.shape == (n // 2, PAGE) and not pages.data.flags.writeable
    assert np.array_equal(pages.pages, np.arange(n // 2, n))
    assert np.array_equal(apply(events, {"ram": n * PAGE})["ram"], ram)


@pytest.mark.parametrize("n", [2, 8, 9, 10, 17, 100])
def test_runs_around_the_struct_numpy_threshold(n):
    ram = image(n, zero_every=None)
    wire = bytes(R.encode_pages("r", ram, np.arange(n), R.ChannelState())[0])
    tail = R.zero_page("r", 0, R.ChannelState()) + R.eos()   # ends the run, names "r" again
    events = body_events(wire + tail, {"r": n * PAGE})
    assert [len(e) for e in events[:2]] == [1, n - 1]
    assert np.array_equal(np.concatenate([events[0].data, events[1].data]), ram)
    bad = wire[:-PAGE - 8] + struct.pack(">Q", (n << 12) | 0x28) + wire[-PAGE:]
    with pytest.raises(WireError, match=f"Illegal RAM offset {n << 12:x}"):
        body_events(bad + tail, {"r": n * PAGE})


def test_preempt_channel_capture_from_spec():
    """docs/qemu/postcopy.md §6: bare records on the preempt channel, 8221 bytes."""
    p1, p2 = bytes([1]) * PAGE, bytes([2]) * PAGE
    wire = (bytes.fromhex("0000000003000008") + b"\x04ram0" + p1
            + bytes.fromhex("0000000003001028") + p2 + bytes.fromhex("0000000000000010"))
    assert len(wire) == 8221
    events = body_events(wire, {"ram0": 64 << 20})
    assert [e.offsets.tolist() for e in events[:2]] == [[0x3000000], [0x3001000]]
    assert bytes(events[1].data[0]) == p2 and isinstance(events[2], R.RamEOS)


def test_views_survive_further_feeding():
    ram = image(8, zero_every=None)
    wire = bytes(R.encode_pages("r", ram, np.arange(8), R.ChannelState())[0]) + R.eos()
    rs = R.RecordStream(R.RamBodyDecoder({"r": 8 * PAGE}))
    rs.feed(wire[:3 * 4104 + 100])
    kept = [rs.next_event(), rs.next_event()]
    assert rs.next_event() is NEED_DATA
    rs.feed(memoryview(bytearray(wire[3 * 4104 + 100:])))
    rest = []
    while (ev := rs.next_event()) is not NEED_DATA:
        rest.append(ev)
    assert np.array_equal(np.concatenate([e.data for e in kept + rest[:-1]]), ram)
    with pytest.raises(WireError, match="after the end"):
        rs.feed(b"x")
        rs.next_event()


def test_xbzrle_and_compressed_records():
    ch = R.ChannelState()
    page = bytes(range(256)) * 16
    z = zlib.compress(page, 1)
    wire = (R.normal_page("r", 0, page, ch) + R.xbzrle_page("r", 0x1000, b"\x00\x01\x76", ch)
            + R.compressed_page("r", 0x2000, z, ch) + R.zero_page("r", 0x3000, ch, fill=7) + R.eos())
    events = body_events(wire, {"r": 4 * PAGE}, accept_compressed=True)
    assert events[1] == R.RamXbzrlePage("r", 0x1000, b"\x00\x01\x76")
    assert events[2] == R.RamCompressedPage("r", 0x2000, z)
    assert events[3].fill.tolist() == [7]
    with pytest.raises(WireError, match="Received an unexpected compressed page"):
        body_events(wire, {"r": 4 * PAGE})


def decode_fails(wire: bytes, match: str, blocks=None, **kw) -> None:
    with pytest.raises(WireError, match=match):
        body_events(wire, blocks if blocks is not None else {"ram0": 4 * PAGE}, **kw)


def hdr(word: int) -> bytes:
    return struct.pack(">Q", word)


def test_decoder_errors_resemble_qemu():
    decode_fails(hdr(0x1), "Unknown combination of migration flags: 0x1")
    decode_fails(hdr(0x0A) + b"\x04ram0", "Unknown combination of migration flags: 0xa")
    decode_fails(hdr(0x80), "HOOK")
    decode_fails(hdr(0x28) + bytes(PAGE), "Ack, bad migration stream!")
    decode_fails(hdr(0x22) + b"\x00", "Ack, bad migration stream!")
    decode_fails(hdr(0x02) + b"\x04nope\x00", "Can't find block nope")
    decode_fails(hdr(0x4002) + b"\x04ram0\x00", "Illegal RAM offset 4000")
    decode_fails(hdr(0x02) + b"\x04ram0\x00" + hdr(0x1022) + b"\x00" + hdr(0x7022) + b"\x00",
                 "Illegal RAM offset 7000")
    decode_fails(hdr(0x02) + b"\x04ram0\x00" + hdr(0xFFFFFFFFFFFFF022) + b"\x00",
                 "Illegal RAM offset fffffffffffff000")
    decode_fails(hdr(0x40) + b"\x04ram0\x02\x00\x01x", "wrong compression")
    decode_fails(hdr(0x40) + b"\x04ram0\x01\x10\x01", "len overflow")
    decode_fails(hdr(0x100) + b"\x04ram0" + struct.pack(">I", 4111),
                 "Invalid compressed data length: 4111", accept_compressed=True)


def test_mem_size_errors():
    decode_fails(R.mem_size([("ram0", 4 * PAGE)])[:8] + b"\x04ram0" + hdr(8 * PAGE),
                 "exceed the announced total", blocks={"ram0": 8 * PAGE})
    decode_fails(R.mem_size([("other", 4 * PAGE)]), 'Unknown ramblock "other", cannot accept migration')
    decode_fails(R.mem_size([("ram0", 2 * PAGE)]), "Size mismatch: ram0: 0x2000 != 0x4000")
    many = hdr(2000 * PAGE | 4) + (b"\x01x" + hdr(PAGE)) * 2000
    with pytest.raises(WireError, match="more than 1024 RAM blocks"):
        body_events(many, None)


def test_mem_size_with_gpa_and_page_size():
    wire = R.mem_size([R.RamBlockInfo("ram0", 4 * PAGE, page_size=0x200000, gpa=0x100000)])
    events = body_events(wire + R.eos(), {"ram0": 4 * PAGE}, ignore_shared=True,
                         page_size_blocks={"ram0"})
    assert events[0].blocks == (R.RamBlockInfo("ram0", 4 * PAGE, 0x200000, 0x100000),)


def test_adopts_block_list_when_blocks_unknown():
    dec = R.RamBodyDecoder(None)
    wire = R.mem_size([("a", PAGE), ("b", 2 * PAGE)])
    ev, done = dec.decode(Reader(wire, 0, len(wire)))
    assert not done and ev.total == 3 * PAGE and dec.blocks == {"a": PAGE, "b": 2 * PAGE}


def test_partial_record_raises_short_without_side_effects():
    dec = R.RamBodyDecoder({"r": PAGE})
    wire = R.normal_page("r", 0, bytes(PAGE), R.ChannelState())
    with pytest.raises(Short):
        dec.decode(Reader(wire, 0, len(wire) - 1))
    assert dec.last_block is None


def test_wrong_ram_version_is_rejected():
    with pytest.raises(WireError, match="ram version 5 is not 4"):
        R.RamBodyDecoder({}).begin(1, Section(2, "ram", 0, 5))


def test_records_straddling_reads_do_not_degrade_to_one_event_per_record():
    """After a record split across two reads, decoding returns to whole runs."""
    ram = np.zeros((4096, 4096), dtype=np.uint8)
    body, _ = R.encode_pages("ram", ram, np.arange(4096), R.ChannelState())
    data = bytes(body)
    events = 0
    rs = R.RecordStream(R.RamBodyDecoder({"ram": ram.nbytes}))
    pages = 0
    for i in range(0, len(data), 1000):
        rs.feed(data[i:i + 1000])
        while (ev := rs.next_event()) is not NEED_DATA:
            events += 1
            pages += len(ev)
    assert pages == 4096
    assert events <= 2 * (len(data) // 1000 + 1)


def test_write_pages_handles_unsorted_and_repeated_indices(tmp_path):
    """Out-of-order records (compression threads) must land where their offsets say."""
    from vmigrate.machine.memory import RAMBlock

    block = RAMBlock("ram", 8 * 4096)
    data = np.arange(3, dtype=np.uint8).repeat(4096).reshape(3, 4096) + 1
    block.write_pages(np.array([1, 1, 3]), data)
    assert block.pages[1, 0] == 2 and block.pages[3, 0] == 3 and block.pages[2, 0] == 0
    block.write_pages(np.array([6, 4, 5]), data)
    assert list(block.pages[4:7, 0]) == [2, 3, 1]
    block.close()


def test_mem_size_with_gpa_bytes():
    """x-ignore-shared: each entry is idstr, used_length, then the block's GPA as be64
    (ram_save_setup, migration/ram.c); the total counts the ignored blocks too."""
    wire = R.mem_size([R.RamBlockInfo("ram", 2 * PAGE, gpa=0), R.RamBlockInfo("hi", PAGE, gpa=0x1_0000_0000)])
    assert wire == bytes.fromhex(
        "0000000000003004"                     # total 0x3000 | MEM_SIZE
        "03" "72616d" "0000000000002000" "0000000000000000"
        "02" "6869" "0000000000001000" "0000000100000000")
    events = body_events(wire, {"ram": 2 * PAGE, "hi": PAGE}, ignore_shared=True)
    assert events[0].blocks == (R.RamBlockInfo("ram", 2 * PAGE, None, 0),
                                R.RamBlockInfo("hi", PAGE, None, 0x1_0000_0000))


def test_mem_size_with_gpa_matches_qemu_capture():
    """QEMU 7.2's own START body for an 8 KiB shared ``ram0`` block with x-ignore-shared."""
    capture = (Path(__file__).parent / "vectors" / "ignoreshared8k.bin").read_bytes()
    assert R.mem_size([R.RamBlockInfo("ram0", 2 * PAGE, gpa=0)]) in capture


def test_page_of_an_ignored_block_is_refused():
    """The source sends no page of an ignored block: one that does is refused with QEMU's text."""
    wire = R.mem_size([R.RamBlockInfo("ram", PAGE, gpa=0)]) + R.zero_page("ram", 0, R.ChannelState())
    with pytest.raises(WireError, match="block ram should not be migrated !"):
        body_events(wire, {"ram": PAGE}, ignore_shared=True, ignored_blocks={"ram"})
