"""XBZRLE codec: the vectorised batch encoder/decoder against QEMU's byte-wise algorithm."""

from __future__ import annotations

import numpy as np
import pytest

from vmigrate.migration.wire import WireError
from vmigrate.migration.wire import xbzrle as X

PAGE = 4096


def reference_encode(old: bytes, new: bytes, dlen: int = PAGE) -> bytes | None:
    """docs/qemu/ram.md §5.2 literally, one byte at a time: b"" unchanged, None overflow."""
    i = d = 0
    out = bytearray()
    while i < PAGE:
        if d + 2 > dlen:
            return None
        z = 0
        while i < PAGE and old[i] == new[i]:
            z += 1
            i += 1
        if z == PAGE:
            return b""
        if i == PAGE:
            return bytes(out)
        out += X.uleb128_encode_small(z)
        d = len(out)
        if d + 2 > dlen:
            return None
        start = i
        while i < PAGE and old[i] != new[i]:
            i += 1
        out += X.uleb128_encode_small(i - start)
        d = len(out)
        if d + (i - start) > dlen:
            return None
        out += new[start:i]
        d = len(out)
    return bytes(out)


def mutate(rng: np.random.Generator, page: np.ndarray, kind: str) -> np.ndarray:
    new = page.copy()
    if kind == "same":
        return new
    if kind == "sparse":
        idx = rng.choice(PAGE, size=int(rng.integers(1, 40)), replace=False)
    elif kind == "dense":
        idx = rng.choice(PAGE, size=int(rng.integers(600, 2000)), replace=False)
    elif kind == "runs":
        idx = np.concatenate([np.arange(s, min(PAGE, s + int(rng.integers(1, 300))))
                              for s in rng.integers(0, PAGE, size=int(rng.integers(1, 12)))])
    elif kind == "tail":
        idx = np.arange(PAGE - int(rng.integers(1, 200)), PAGE)
    elif kind == "all":
        idx = np.arange(PAGE)
    else:
        raise AssertionError(kind)
    new[idx] ^= rng.integers(1, 256, size=idx.size, dtype=np.uint8)
    return new


KINDS = ["same", "sparse", "dense", "runs", "tail", "all"]


def test_uleb128_small():
    assert X.uleb128_encode_small(0) == b"\x00"
    assert X.uleb128_encode_small(127) == b"\x7f"
    assert X.uleb128_encode_small(128) == b"\x80\x01"
    assert X.uleb128_encode_small(2047) == b"\xff\x0f"
    assert X.uleb128_decode_small(b"\xff\x0f") == (2047, 2)
    with pytest.raises(WireError):
        X.uleb128_decode_small(b"\xff\x80")
    with pytest.raises(ValueError):
        X.uleb128_encode_small(1 << 14)


def test_example_captured_from_qemu():
    """docs/qemu/ram.md §5.2: bytes 0 and 2048 changed to 0x76."""
    old = bytes(PAGE)
    new = bytearray(old)
    new[0] = new[2048] = 0x76
    assert X.encode_page(old, bytes(new)) == bytes.fromhex("0001 76 ff0f 01 76")


def test_batch_matches_reference_on_random_pages():
    rng = np.random.default_rng(7)
    old = rng.integers(0, 256, size=(240, PAGE), dtype=np.uint8)
    old[::5] = 0
    kinds = [KINDS[i % len(KINDS)] for i in range(len(old))]
    new = np.stack([mutate(rng, p, k) for p, k in zip(old, kinds)])
    enc = X.encode_batch(old, new)
    for k in range(len(old)):
        ref = reference_encode(old[k].tobytes(), new[k].tobytes())
        got = int(enc.lengths[k])
        if ref is None:
            assert got == -1, k
        else:
            assert got == len(ref) and enc.page(k) == ref, (k, kinds[k])
    assert (enc.lengths[[i for i, k in enumerate(kinds) if k == "same"]] == 0).all()
    assert (enc.lengths[[i for i, k in enumerate(kinds) if k == "all"]] == -1).all()


def test_overflow_checks_at_qemus_points():
    """Alternating bytes: each pair costs 3 bytes, QEMU gives up at d + 2 > 4096."""
    old = np.zeros((4, PAGE), np.uint8)
    new = old.copy()
    new[0, ::2] = 1                    # 2048 pairs -> overflow
    new[1, : 2 * 1365 : 2] = 1         # 1365 pairs = 4095 bytes, trailing equal run: d+2 > 4096
    new[2, : 2 * 1364 : 2] = 1         # 1364 pairs = 4092 bytes: fits
    new[3, 1:] = 1                     # zrun 1, one nzrun of 4095 bytes: 1 + 2 + 4095 > 4096
    enc = X.encode_batch(old, new)
    assert enc.lengths.tolist() == [-1, -1, 4092, -1]
    for k in range(4):
        ref = reference_encode(old[k].tobytes(), new[k].tobytes())
        assert (ref is None) == (enc.lengths[k] == -1)


def test_layout_leaves_gaps_for_record_headers():
    rng = np.random.default_rng(3)
    old = rng.integers(0, 256, size=(5, PAGE), dtype=np.uint8)
    new = np.stack([mutate(rng, p, k) for p, k in zip(old, ["sparse", "same", "all", "runs", "sparse"])])
    plain = X.encode_batch(old, new)
    gapped = X.encode_batch(old, new, gap=11, lead=4)
    assert gapped.starts[0] == 4 + 11
    for k in range(5):
        assert gapped.page(k) == plain.page(k)
    assert len(gapped.out) == 4 + sum(11 + n for n in plain.lengths if n > 0)


def test_decoder_round_trip_on_destination_pages():
    rng = np.random.default_rng(11)
    npages = 64
    old = rng.integers(0, 256, size=(npages, PAGE), dtype=np.uint8)
    kinds = [KINDS[i % 5] for i in range(npages)]      # no "all": those overflow
    new = np.stack([mutate(rng, p, k) for p, k in zip(old, kinds)])
    enc = X.encode_batch(old, new)
    sent = np.flatnonzero(enc.lengths > 0)
    dst = old.copy()
    X.decode_into(dst.reshape(-1), sent * PAGE, enc.out, enc.starts[sent], enc.lengths[sent])
    assert np.array_equal(dst, new)


def test_decoder_keeps_bytes_outside_runs_and_applies_repeats_in_order():
    page = np.full(PAGE, 9, np.uint8)
    first = bytes.fromhex("0001 76 ff0f 01 76")     # bytes 0 and 2048 := 0x76
    second = bytes.fromhex("0002 5051")             # bytes 0, 1 := 0x50 0x51
    src = first + second
    X.decode_into(page, np.array([0, 0]), src, np.array([0, len(first)]), np.array([len(first), len(second)]))
    assert page[:3].tolist() == [0x50, 0x51, 9] and page[2048] == 0x76 and page[3000] == 9


@pytest.mark.parametrize("encoded", [
    bytes.fromhex("00"),              # one byte left before a zrun
    bytes.fromhex("0001"),            # nzrun says 1 byte, none follows
    bytes.fromhex("0000"),            # empty nzrun
    bytes.fromhex("000176 0001 76"),  # zero-length zrun not at the start
    bytes.fromhex("ff80 0176"),       # three-byte ULEB
    bytes.fromhex("8020 0176"),       # zrun 4096: beyond the page
    bytes.fromhex("ff1f 0276 76"),    # zrun 4095 + nzrun 2 > 4096
    bytes.fromhex("0001 76 05"),      # trailing single byte
])
def test_decoder_rejects_what_qemu_rejects(encoded):
    with pytest.raises(WireError, match="Failed to load XBZRLE page - decode error!"):
        X.decode_page(encoded, bytearray(PAGE))


def test_decoder_accepts_empty_encoding_and_rejects_overlong():
    page = bytearray(b"\x01" * PAGE)
    X.decode_page(b"", page)
    assert page == bytearray(b"\x01" * PAGE)
    with pytest.raises(WireError, match="len overflow"):
        X.decode_into(np.zeros(PAGE, np.uint8), np.array([0]), bytes(5000), np.array([0]), np.array([4097]))


# -- the source's cache and per-page rules (docs/qemu/ram.md §4) ------------------------------------

class ReferenceSource:
    """docs/qemu/ram.md §4 one page at a time, as QEMU's save_xbzrle_page / cache_insert do it."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.cache: dict[int, tuple[int, int, bytes]] = {}
        self.stats = {"pages": 0, "cache_miss": 0, "overflow": 0, "bytes": 0}

    def _insert(self, page: int, data: bytes, age: int) -> bool:
        slot = page % self.slots
        held = self.cache.get(slot)
        if held is not None and held[0] != page and held[1] + 2 > age:
            return False
        self.cache[slot] = (page, age, data)
        return True

    def send(self, ram: np.ndarray, pages, age: int, last: bool) -> dict[int, bytes | None]:
        """page -> bytes the destination ends up with (None: nothing sent for it)."""
        out: dict[int, bytes | None] = {}
        for page in pages:
            data = ram[page].tobytes()
            if not any(data):
                self._insert(page, data, age)
                out[page] = data
                continue
            slot = page % self.slots
            held = self.cache.get(slot)
            if held is None or held[0] != page:
                self.stats["cache_miss"] += 1
                if not last:
                    self._insert(page, data, age)
                out[page] = data
                continue
            self.cache[slot] = (page, age, held[2])
            self.stats["pages"] += 1
            enc = reference_encode(held[2], data)
            if enc == b"":
                out[page] = None
                continue
            if not last:
                self.cache[slot] = (page, age, data)
            if enc is None:
                self.stats["overflow"] += 1
                self.stats["bytes"] += PAGE
            else:
                self.stats["bytes"] += 3 + len(enc)
            out[page] = data
        return out


def test_sender_follows_qemus_cache_rules_and_destination_matches():
    from vmigrate.machine.memory import RAMBlock
    from vmigrate.migration.stats import XbzrleStats
    from vmigrate.migration.wire import ram as R
    from vmigrate.migration.xbzrle import XbzrleSender

    rng = np.random.default_rng(21)
    npages, slots = 96, 32
    block = RAMBlock("ram", npages * PAGE)
    block.pages[:] = rng.integers(0, 256, size=(npages, PAGE), dtype=np.uint8)
    block.pages[::7] = 0
    dst = block.pages.copy()
    stats = XbzrleStats()
    sender = XbzrleSender(slots * PAGE, stats, [block])
    ref = ReferenceSource(slots)
    channel = R.ChannelState("ram")
    decoder = R.RamBodyDecoder({"ram": npages * PAGE}, variable_runs=True)
    decoder.last_block = "ram"
    for age in range(1, 9):
        last = age == 8
        dirty = np.sort(rng.choice(npages, size=int(rng.integers(10, npages)), replace=False))
        for page in dirty:
            kind = ["sparse", "dense", "runs", "all", "same", "zero"][int(rng.integers(0, 6))]
            if kind == "zero":
                block.pages[page] = 0
            else:
                block.pages[page] = mutate(rng, block.pages[page], kind)
        expected = ref.send(block.pages, dirty.tolist(), age, last)
        parts, counts = sender.send(block, dirty, channel, age, last)
        stream = R.RecordStream(decoder)
        stream.feed(b"".join(bytes(p) for p in parts) + R.eos())
        while not isinstance(ev := stream.next_event(), R.RamEOS):
            if isinstance(ev, R.RamXbzrleRun):
                X.decode_into(dst.reshape(-1), ev.offsets, ev.buf, ev.starts, ev.lengths)
            elif isinstance(ev, R.RamPages):
                dst[ev.pages] = ev.data
            else:
                dst[ev.pages] = ev.fill[:, None]
        for page, data in expected.items():
            if data is not None:
                assert dst[page].tobytes() == data, (age, page)
        assert counts.xbzrle_records + counts.normal_pages + counts.zero_pages == \
            sum(v is not None for v in expected.values())
    assert {k: getattr(stats, k) for k in ref.stats} == ref.stats
    assert stats.pages > 0 and stats.cache_miss > 0 and stats.overflow > 0
    assert np.array_equal(dst, block.pages)


def test_overflowing_neighbours_do_not_disturb_other_pages():
    """Runs of dropped (overflowing) pages that touch each other in memory order."""
    rng = np.random.default_rng(4)
    old = rng.integers(0, 256, size=(6, PAGE), dtype=np.uint8)
    new = np.stack([mutate(rng, p, k) for p, k in zip(old, ["sparse", "all", "all", "tail", "all", "runs"])])
    enc = X.encode_batch(old, new, gap=3)
    for k in range(6):
        ref = reference_encode(old[k].tobytes(), new[k].tobytes())
        assert (enc.lengths[k] == -1) if ref is None else enc.page(k) == ref


def test_records_decode_as_runs_in_any_chunking():
    """XBZRLE records of a batch come back as runs whose payloads equal the encodings."""
    from vmigrate.migration.wire import ram as R

    rng = np.random.default_rng(8)
    old = rng.integers(0, 256, size=(40, PAGE), dtype=np.uint8)
    new = np.stack([mutate(rng, p, KINDS[i % 5]) for i, p in enumerate(old)])
    pages = np.arange(100, 140)
    records, enc = X.xbzrle_records("ram", pages, old, new, R.ChannelState())
    sent = np.flatnonzero(enc.lengths > 0)
    wire = bytes(records) + R.eos()
    for chunk in (len(wire), 4099, 7):
        dec = R.RamBodyDecoder({"ram": 256 * PAGE}, variable_runs=True)
        stream = R.RecordStream(dec)
        runs = []
        for i in range(0, len(wire), chunk):
            stream.feed(wire[i:i + chunk])
            while (ev := stream.next_event()) is not R.NEED_DATA:
                runs.append(ev)
        assert isinstance(runs[-1], R.RamEOS) and all(isinstance(r, R.RamXbzrleRun) for r in runs[:-1])
        offsets = np.concatenate([r.offsets for r in runs[:-1]])
        assert offsets.tolist() == (pages[sent] * PAGE).tolist()
        payloads = [r.payload(i) for r in runs[:-1] for i in range(len(r))]
        assert payloads == [enc.page(k) for k in sent]
    # The same bytes, one event per record, as the stream analyser reads them.
    plain = R.RecordStream(R.RamBodyDecoder({"ram": 256 * PAGE}))
    plain.feed(wire)
    first = plain.next_event()
    assert first == R.RamXbzrlePage("ram", int(pages[sent[0]]) * PAGE, enc.page(sent[0]))


def test_run_decoder_checks_every_record():
    from vmigrate.migration.wire import ram as R

    ch = R.ChannelState()
    good = R.xbzrle_page("ram", 0, b"\x00\x01\x76", ch)
    bad_flag = bytearray(R.xbzrle_page("ram", PAGE, b"\x00\x01\x76", ch))
    bad_flag[8] = 2
    beyond = R.xbzrle_page("ram", 9 * PAGE, b"\x00\x01\x76", ch)
    for tail, match in ((bytes(bad_flag), "wrong compression"), (beyond, "Illegal RAM offset")):
        stream = R.RecordStream(R.RamBodyDecoder({"ram": 4 * PAGE}, variable_runs=True))
        stream.feed(good + tail + R.eos())
        with pytest.raises(WireError, match=match):
            while stream.next_event() is not R.NEED_DATA:
                pass
