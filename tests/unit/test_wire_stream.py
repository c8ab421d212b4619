"""Stream framing against streams captured from QEMU 7.2 (tests/unit/vectors)."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from vmigrate.migration.wire import NEED_DATA, WireError
from vmigrate.migration.wire import ram as R
from vmigrate.migration.wire import stream as S
from vmigrate.machine import devices as D
from vmigrate.migration.wire import vmstate as V

VECTORS = Path(__file__).parent / "vectors"
CAPTURES = ["small8k", "mixed64k", "prelaunch8k", "paused8k", "ram1m", "icount1m", "uuid8k",
            "ignoreshared8k"]


def vector(name: str) -> bytes:
    return (VECTORS / f"{name}.bin").read_bytes()


def sidecar(name: str) -> dict:
    return json.loads((VECTORS / f"{name}.json").read_text())


def decoder(blocks: dict | None = None, **kw) -> S.StreamDecoder:
    return S.StreamDecoder({"ram": R.RamBodyDecoder(blocks), **D.none_machine_bodies()}, **kw)


def drain(dec: S.StreamDecoder) -> list:
    events = []
    while (ev := dec.next_event()) is not NEED_DATA:
        if isinstance(ev, S.Configuration) and "x-ignore-shared" in ev.capabilities:
            dec.bodies["ram"].ignore_shared = True
        events.append(ev)
    return events


def decode_all(data: bytes, blocks: dict | None = None, chunk: int | None = None, **kw) -> list:
    dec = decoder(blocks, **kw)
    events = []
    step = chunk or len(data) or 1
    for i in range(0, len(data), step):
        dec.feed(data[i:i + step])
        events += drain(dec)
    dec.close()
    events += drain(dec)
    return events


def kinds(events: list) -> list[str]:
    return [type(e).__name__ for e in events]


def merged_pages(events: list) -> dict[int, bytes]:
    """Page index -> contents, from all RAM page events in order."""
    pages: dict[int, bytes] = {}
    for ev in events:
        if isinstance(ev, R.RamPages):
            for i, p in zip(ev.pages, ev.data):
                pages[int(i)] = bytes(p)
        elif isinstance(ev, R.RamZeroPages):
            for i, f in zip(ev.pages, ev.fill):
                pages[int(i)] = bytes([int(f)]) * 4096
    return pages


# -- real captures ---------------------------------------------------------------

def test_small_capture_event_sequence():
    events = decode_all(vector("small8k"), {"ram0": 8192})
    assert kinds(events) == [
        "Header", "Configuration",
        "SectionStart", "RamMemSize", "RamEOS", "SectionFooter",
        "SectionPart", "RamZeroPages", "RamPages", "RamEOS", "SectionFooter",
        "SectionEnd", "RamEOS", "SectionFooter",
        "SectionFull", "DeviceState", "SectionFooter",
        "SectionFull", "DeviceState", "SectionFooter",
        "EOF", "VMDescription"]
    assert events[1] == S.Configuration("none")
    assert events[2] == S.SectionStart(2, "ram", 0, 4)
    assert events[3].blocks == (R.RamBlockInfo("ram0", 8192),)
    assert events[14] == S.SectionFull(0, "timer", 0, 2)
    assert events[17] == S.SectionFull(4, "globalstate", 0, 1)
    assert D.globalstate_runstate(events[18].values) == "running"
    assert len(events[-1].json) == 486


@pytest.mark.parametrize("name", CAPTURES)
def test_capture_decodes_to_the_guest_image(name):
    data = vector(name)
    meta = sidecar(name)
    events = decode_all(data)
    assert isinstance(events[-1], S.VMDescription)
    pages = merged_pages(events)
    mem = next(e for e in events if isinstance(e, R.RamMemSize))
    npages = mem.total // 4096
    if meta["capabilities"].get("x-ignore-shared"):
        assert pages == {} and mem.blocks[0].gpa == 0
        return
    image = meta["image"]
    expected = ["zero"] * npages if image == "zero" else image["pages"]
    assert sorted(pages) == list(range(npages))
    for i, desc in enumerate(expected):
        assert pages[i] == page_from(desc), f"page {i}"
    zero = sum(len(e) for e in events if isinstance(e, R.RamZeroPages))
    normal = sum(len(e) for e in events if isinstance(e, R.RamPages))
    assert (zero, normal) == (meta["stats"]["duplicate"], meta["stats"]["normal"])


def page_from(desc: str) -> bytes:
    kind, _, arg = desc.partition(":")
    if kind == "zero":
        return bytes(4096)
    if kind == "fill":
        return bytes([int(arg, 16)]) * 4096
    if kind == "last":
        return bytes(4095) + bytes([int(arg, 16)])
    i = int(arg)
    return bytes(((i * 37 + k * 11) & 0xFF) or 1 for k in range(4096))


@pytest.mark.parametrize("name,runstate", [("small8k", "running"), ("prelaunch8k", "prelaunch"),
                                           ("paused8k", "paused")])
def test_globalstate_runstate_of_captures(name, runstate):
    events = decode_all(vector(name))
    gs = next(e for e in events if isinstance(e, V.DeviceState) and e.idstr == "globalstate")
    assert D.globalstate_runstate(gs.values) == runstate
    assert gs.values["size"] == len(runstate) + 1
    assert sidecar(name)["runstate_before_migrate"] == runstate


def test_configuration_subsections_from_qemu():
    events = decode_all(vector("uuid8k"))
    assert events[1] == S.Configuration("none", (), bytes.fromhex("123456789abcdef01122334455667788"))
    events = decode_all(vector("ignoreshared8k"))
    assert events[1] == S.Configuration("none", ("x-ignore-shared",))


@pytest.mark.parametrize("name", ["uuid8k", "ignoreshared8k", "small8k"])
def test_configuration_encoder_matches_qemu(name):
    data = vector(name)
    conf = decode_all(data)[1]
    encoded = S.configuration(conf.machine, conf.capabilities, conf.uuid)
    assert data[8:8 + len(encoded)] == encoded
    assert data[8 + len(encoded)] == S.QEMU_VM_SECTION_START


def reencode(events: list, ram_image: np.ndarray | None) -> bytes:
    """Rebuild a stream from decoded events with the encoders, in QEMU's page order."""
    out = [S.header()]
    ch = R.ChannelState()
    devices = []
    for ev in events:
        if isinstance(ev, S.Configuration):
            out.append(S.configuration(ev.machine, ev.capabilities, ev.uuid))
        elif isinstance(ev, S.SectionStart):
            out.append(S.section_start(ev.section_id, ev.idstr, ev.instance_id, ev.version_id))
        elif isinstance(ev, S.SectionPart):
            out.append(S.section_part(ev.section_id))
        elif isinstance(ev, S.SectionEnd):
            out.append(S.section_end(ev.section_id))
        elif isinstance(ev, S.SectionFull):
            out.append(S.section_full_header(ev.section_id, ev.idstr, ev.instance_id,
                                             ev.version_id))
            current = ev
        elif isinstance(ev, S.SectionFooter):
            out.append(S.footer(ev.section_id))
        elif isinstance(ev, R.RamMemSize):
            out.append(R.mem_size(ev.blocks))
        elif isinstance(ev, (R.RamPages, R.RamZeroPages)):
            wire, _ = R.encode_pages(ev.block, ram_image, ev.pages, ch)
            out.append(bytes(wire))
        elif isinstance(ev, R.RamEOS):
            out.append(R.eos())
        elif isinstance(ev, V.DeviceState):
            desc = {"timer": D.TIMER, "globalstate": D.GLOBALSTATE}[ev.idstr]
            dev = V.DeviceSection(current.section_id, ev.idstr, ev.instance_id, desc, ev.values)
            devices.append(dev)
            out.append(dev.body())
        elif isinstance(ev, S.EOF):
            out.append(S.eof())
        elif isinstance(ev, S.VMDescription):
            out.append(S.vmdesc(V.vmdesc_json(devices)))
    return b"".join(out)


@pytest.mark.parametrize("name", CAPTURES)
def test_reencode_is_byte_identical(name):
    """QEMU sends pages in address order; per-kind batches reproduce it exactly."""
    data = vector(name)
    events = decode_all(data)
    mem = next(e for e in events if isinstance(e, R.RamMemSize))
    pages = merged_pages(events)
    image = np.zeros((mem.total // 4096, 4096), np.uint8)
    for i, p in pages.items():
        image[i] = np.frombuffer(p, np.uint8)
    assert reencode(events, image) == data


def test_ram_counts_match_qemu_transferred():
    """encode_pages' counted bytes + 8 per PART EOS = QEMU's 'transferred'."""
    for name in ("small8k", "mixed64k", "ram1m"):
        events = decode_all(vector(name))
        total = next(e for e in events if isinstance(e, R.RamMemSize)).total
        image = np.zeros((total // 4096, 4096), np.uint8)
        for i, p in merged_pages(events).items():
            image[i] = np.frombuffer(p, np.uint8)
        wire, counts = R.encode_pages("ram0" if name != "ram1m" else "ram", image,
                                      np.arange(total // 4096), R.ChannelState())
        stats = sidecar(name)["stats"]
        assert counts.bytes + 8 == stats["transferred"] == len(wire) + 8
        assert (counts.zero_pages, counts.normal_pages) == (stats["duplicate"], stats["normal"])


def test_byte_at_a_time_equals_one_shot():
    data = vector("small8k")
    one = decode_all(data)
    tiny = decode_all(data, chunk=1)
    assert kinds(one) == kinds(tiny)
    assert merged_pages(one) == merged_pages(tiny)
    odd = decode_all(vector("mixed64k"), chunk=4099)
    assert merged_pages(odd) == merged_pages(decode_all(vector("mixed64k")))


# -- encoders --------------------------------------------------------------------

def test_minimal_stream_of_spec_13():
    page = bytes(range(256)) * 16
    stream = (S.header() + S.configuration("none")
              + S.section_start(2, "ram", 0, 4) + R.mem_size([("ram", 64 << 20)]) + R.eos()
              + S.footer(2)
              + S.section_part(2) + R.normal_page("ram", 0x5000, page, R.ChannelState())
              + R.eos() + S.footer(2) + S.eof())
    expected = bytes.fromhex(
        "5145564D00000003" "07000000046E6F6E65"
        "01000000020372616D0000000000000004"
        "00000000040000040372616D0000000004000000" "0000000000000010" "7E00000002"
        "0200000002" "00000000000050080372616D") + page + bytes.fromhex(
        "0000000000000010" "7E00000002" "00")
    assert stream == expected
    events = decode_all(stream, {"ram": 64 << 20})
    assert kinds(events)[-2:] == ["SectionFooter", "EOF"]
    pages = [e for e in events if isinstance(e, R.RamPages)]
    assert pages[0].offsets.tolist() == [0x5000] and bytes(pages[0].data[0]) == page


def test_section_headers_bytes():
    assert S.section_start(2, "ram", 0, 4) == bytes.fromhex("01000000020372616D0000000000000004")
    assert S.section_full(0, "t", 1, 2, b"\xAA") == bytes.fromhex(
        "04" "00000000" "0174" "00000001" "00000002" "AA" "7E00000000")
    assert S.section_part(7) + S.section_end(7) == bytes.fromhex("02000000070300000007")


def test_commands_roundtrip():
    blob = S.section_full(0, "timer", 0, 2, V.encode_state(D.TIMER, {})) + S.ping(3) + S.postcopy_run()
    stream = (S.open_return_path() + S.ping(1) + S.postcopy_advise() + S.postcopy_listen()
              + S.postcopy_ram_discard("ram0", [(0x668000, 0x3998000)]) + S.packaged(blob)
              + S.ping(4) + S.enable_colo() + S.postcopy_resume() + S.recv_bitmap("ram0"))
    assert S.postcopy_ram_discard("ram0", [(0x668000, 0x3998000)])[5:] == bytes.fromhex(
        "000472616D30000000000000668000" "0000000003998000")
    assert S.recv_bitmap("ram0") == bytes.fromhex("08000A00050472616D30")
    assert S.postcopy_advise() == bytes.fromhex("0800030010" + "0000000000001000" * 2)
    assert S.postcopy_advise(None) == bytes.fromhex("0800030000")
    events = decode_all(stream + S.eof(), header=False)
    assert kinds(events) == ["Command"] * 6 + ["SectionFull", "DeviceState", "SectionFooter",
                                               "Command", "Command", "PackageEnd"] + ["Command"] * 4 + ["EOF"]
    cmds = [e for e in events if isinstance(e, S.Command)]
    assert [c.name for c in cmds] == [
        "OPEN_RETURN_PATH", "PING", "POSTCOPY_ADVISE", "POSTCOPY_LISTEN", "POSTCOPY_RAM_DISCARD",
        "PACKAGED", "PING", "POSTCOPY_RUN", "PING", "ENABLE_COLO", "POSTCOPY_RESUME",
        "RECV_BITMAP"]
    assert S.decode_ping(cmds[1].payload) == 1 and S.decode_ping(cmds[8].payload) == 4
    assert S.decode_advise(cmds[2].payload) == (0x1000, 0x1000)
    assert S.decode_discard(cmds[4].payload) == ("ram0", [(0x668000, 0x3998000)])
    assert S.decode_packaged(cmds[5].payload) == len(blob)
    assert S.decode_recv_bitmap(cmds[11].payload) == "ram0"


def test_package_rest_after_run_is_skipped_and_eof_ends_package():
    blob = S.postcopy_run() + b"\xFF\xFF garbage QEMU never parses"
    events = decode_all(S.packaged(blob) + S.ping(9) + S.eof(), header=False)
    assert kinds(events) == ["Command", "Command", "PackageEnd", "Command", "EOF"]
    blob = S.ping(2) + S.eof() + b"junk"
    events = decode_all(S.packaged(blob) + S.ping(9) + S.eof(), header=False)
    assert kinds(events) == ["Command", "Command", "PackageEnd", "Command", "EOF"]


def test_element_crossing_package_end_fails():
    stream = S.command(S.MIG_CMD_PACKAGED, struct.pack(">I", 5)) + S.ping(2) + S.ping(3)
    with pytest.raises(WireError, match="crosses the end of the PACKAGED blob"):
        decode_all(stream, header=False)


# -- errors -----------------------------------------------------------------------

def fails(data: bytes, match: str, **kw) -> None:
    with pytest.raises(WireError, match=match):
        decode_all(data, **kw)


def test_header_errors():
    fails(b"QEVX\0\0\0\3", "Not a migration stream")
    fails(S.header()[:4] + struct.pack(">I", 2), "v2 format is obsolete")
    fails(S.header()[:4] + struct.pack(">I", 4), "Unsupported migration stream version")
    fails(S.header() + S.eof(), "Configuration section missing")
    fails(S.header() + S.configuration() + S.eof() + b"\x07", "Expected vmdescription section, but got 7")
    fails(S.header() + S.configuration(), "truncated")
    fails(S.header() + S.configuration() + bytes([9]), "Unknown savevm section type 9")
    fails(S.header() + S.configuration(), "Unknown savevm section type 7", require_configuration=False)
    assert kinds(decode_all(S.header() + S.eof(), require_configuration=None)) == ["Header", "EOF"]


def test_after_eof_without_vmdesc_is_accepted():
    assert kinds(decode_all(S.header() + S.configuration() + S.eof())) == [
        "Header", "Configuration", "EOF"]


def test_unknown_capability_and_subsection():
    data = S.header() + S.configuration(caps=("no-such-cap",)) + S.eof()
    fails(data, "Received unknown capability no-such-cap", known_capabilities={"x-ignore-shared"})
    bad = S.header() + S.configuration() + S.subsection_header("configuration/bogus", 1) + S.eof()
    fails(bad, "unknown subsection configuration/bogus")


def test_section_errors():
    base = S.header() + S.configuration()
    timer = V.encode_state(D.TIMER, {})
    fails(base + S.section_full(0, "nosuch", 0, 1, b""), "Unknown savevm section or instance 'nosuch' 0")
    fails(base + S.section_full(0, "timer", 3, 2, timer), "Unknown savevm section or instance 'timer' 3")
    fails(base + S.section_full(0, "timer", 0, 3, timer), "unsupported version 3 for 'timer' v2")
    fails(base + S.section_full(0, "timer", 0, 0, timer), "too old")
    fails(base + S.section_part(5), "Unknown savevm section 5")
    no_footer = S.section_full_header(4, "timer", 0, 2) + timer + S.eof()
    fails(base + no_footer, "Missing section footer for timer")
    wrong = S.section_full_header(4, "timer", 0, 2) + timer + S.footer(5)
    fails(base + wrong, "Mismatched section id in footer for timer - read 0x5 expected 0x4")
    fails(base + S.section_start(2, "ram", 0, 3), "ram version 3")


def test_command_errors():
    fails(S.command(0), "MIG_CMD 0x0 unknown", header=False)
    fails(S.command(11, b"ab"), "MIG_CMD 0xb unknown \\(len 0x2\\)", header=False)
    fails(S.command(S.MIG_CMD_PING, b"\0\0\0"), "PING received with bad length - expecting 4, got 3",
          header=False)
    fails(S.command(S.MIG_CMD_POSTCOPY_ADVISE, bytes(8)), "CMD_POSTCOPY_ADVISE invalid length \\(8\\)",
          header=False)
    fails(S.command(S.MIG_CMD_POSTCOPY_RAM_DISCARD, b"\x01\x01a\x00" + bytes(16)),
          "invalid version", header=False)
    fails(S.command(S.MIG_CMD_POSTCOPY_RAM_DISCARD, b"\x00\x01a\x01" + bytes(16)),
          "missing nil", header=False)
    fails(S.command(S.MIG_CMD_RECV_BITMAP, b"\x05ram0"), "invalid payload length", header=False)
    fails(S.command(S.MIG_CMD_PACKAGED, struct.pack(">I", 0xFFFFFFFF)), "exceeds", header=False)


def test_hostile_lengths_fail_fast():
    """Lengths beyond the bounds fail at once instead of waiting for gigabytes."""
    base = S.header() + S.configuration() + S.eof()
    dec = decoder()
    dec.feed(base + b"\x06\xFF\xFF\xFF\xFF")
    with pytest.raises(WireError, match="VM description"):
        drain(dec)
    dec = decoder()
    dec.feed(S.header() + b"\x07\xFF\xFF\xFF\xFF")
    with pytest.raises(WireError, match="machine name length"):
        drain(dec)


def test_failed_decoder_stays_failed():
    dec = decoder()
    dec.feed(b"garbage!")
    with pytest.raises(WireError):
        dec.next_event()
    with pytest.raises(WireError, match="Not a migration stream"):
        dec.next_event()


def test_truncation_at_every_offset():
    data = vector("small8k")
    after_eof = 0x1135                  # docs/qemu/stream.md §12: a missing vmdesc is accepted
    assert data[after_eof - 1] == S.QEMU_VM_EOF and data[after_eof] == S.QEMU_VM_VMDESCRIPTION
    for cut in range(len(data)):
        dec = decoder({"ram0": 8192})
        dec.feed(data[:cut])
        drain(dec)                      # never raises: a prefix is just incomplete
        dec.close()
        if cut == after_eof:
            assert drain(dec) == []
            continue
        with pytest.raises(WireError, match="truncated"):
            drain(dec)


def test_flipped_bytes_only_raise_wire_error():
    data = bytearray(vector("small8k"))
    rng = random.Random(7)
    offsets = list(range(0, 0x60)) + list(range(0x1050, len(data))) + rng.sample(range(0x60, 0x1050), 40)
    outcomes = set()
    for off in offsets:
        for flip in (0xFF, 0x01, 0x80):
            mutated = bytearray(data)
            mutated[off] ^= flip
            try:
                decode_all(bytes(mutated), {"ram0": 8192})
                outcomes.add("ok")
            except WireError:
                outcomes.add("error")
    assert outcomes == {"ok", "error"}


def test_random_garbage_after_header_only_raises_wire_error():
    rng = random.Random(3)
    base = S.header() + S.configuration()
    for _ in range(500):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        # Bias towards valid type bytes so deeper parsers are reached.
        junk = bytes([rng.choice([1, 2, 3, 4, 8, 0])]) + junk
        dec = decoder({"ram0": 8192})
        dec.feed(base + junk)
        dec.close()
        try:
            drain(dec)
        except WireError:
            pass
