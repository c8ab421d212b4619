"""Declarative device sections and the vmdesc JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmigrate.migration.wire import WireError
from vmigrate.migration.wire import stream as S
from vmigrate.migration.wire import vmstate as V
from vmigrate.machine import devices as D
from vmigrate.migration.wire.buffer import Reader

VECTORS = Path(__file__).parent / "vectors"

# docs/qemu/stream.md §9, as emitted by qemu-system-x86_64 -M none.
SPEC_VMDESC = (
    b'{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": "timer", '
    b'"version": 2, "fields": [{"name": "cpu_ticks_offset", "type": "int64", "size": 8}, '
    b'{"name": "unused", "type": "unused_buffer", "size": 8}, {"name": "cpu_clock_offset", '
    b'"type": "int64", "size": 8}]}, {"name": "globalstate", "instance_id": 0, "vmsd_name": '
    b'"globalstate", "version": 1, "fields": [{"name": "size", "type": "uint32", "size": 4}, '
    b'{"name": "runstate", "type": "buffer", "size": 100}]}]}')


def none_devices(runstate: str = "running") -> list[V.DeviceSection]:
    return [V.DeviceSection(0, "timer", 0, D.TIMER, D.timer_values(1, 2)),
            V.DeviceSection(4, "globalstate", 0, D.GLOBALSTATE, D.globalstate_values(runstate))]


def captured_vmdesc(name: str) -> bytes:
    data = (VECTORS / f"{name}.bin").read_bytes()
    n = len(SPEC_VMDESC)
    return data[-n:] if name != "icount1m" else data[data.rindex(b"\x06\x00\x00") + 5:]


def test_vmdesc_is_byte_identical_to_qemu():
    assert len(SPEC_VMDESC) == 486
    assert V.vmdesc_json(none_devices()) == SPEC_VMDESC
    for name in ("small8k", "paused8k", "mixed64k"):
        assert captured_vmdesc(name) == SPEC_VMDESC


def test_vmdesc_with_nested_subsections_matches_qemu_icount_capture():
    qemu = captured_vmdesc("icount1m")
    timer_entry = json.loads(qemu)["devices"][0]
    values = D.timer_values()
    values["timer/icount"] = {"timer/icount/warp_timer": {}, "timer/icount/timers": {},
                              "timer/icount/shift": {}}
    devices = [V.DeviceSection(0, "timer", 0, D.TIMER, values), none_devices()[1]]
    assert V.vmdesc_json(devices) == qemu
    assert [s["vmsd_name"] for s in timer_entry["subsections"][0]["subsections"]] == [
        "timer/icount/warp_timer", "timer/icount/timers", "timer/icount/shift"]


def test_none_machine_device_bodies():
    timer, gs = none_devices("paused")
    assert timer.body() == bytes.fromhex("0000000000000001" "0000000000000000" "0000000000000002")
    body = gs.body()
    assert len(body) == 104 and body[:4] == bytes.fromhex("00000007") and body[4:10] == b"paused"
    assert set(body[10:]) == {0}
    assert timer.encode() == S.section_full(0, "timer", 0, 2, timer.body())


def test_state_roundtrip_with_subsections_and_versions():
    values = D.timer_values(-5, 7)
    values["timer/icount"] = {"qemu_icount_bias": 3, "qemu_icount": 4,
                              "timer/icount/shift": {"icount_time_shift": -2, "last_delta": 9}}
    body = V.encode_state(D.TIMER, values) + S.footer(0)
    r = Reader(body, 0, len(body))
    got = V.decode_state(D.TIMER, r, 2)
    assert got["cpu_ticks_offset"] == -5 and got["cpu_clock_offset"] == 7
    assert got["timer/icount"]["timer/icount/shift"] == {"icount_time_shift": -2, "last_delta": 9}
    assert body[r.pos] == S.QEMU_VM_SECTION_FOOTER
    v1 = V.encode_state(D.TIMER, D.timer_values(1, 2), version_id=1)
    assert len(v1) == 16
    assert "cpu_clock_offset" not in V.decode_state(D.TIMER, Reader(v1 + b"\x7e", 0, 17), 1)


def test_unknown_subsection_with_parent_prefix_fails():
    body = V.encode_state(D.TIMER, {}) + S.subsection_header("timer/bogus", 1)
    with pytest.raises(WireError, match="unknown subsection timer/bogus"):
        V.decode_state(D.TIMER, Reader(body, 0, len(body)), 2)
    other = V.encode_state(D.TIMER, {}) + S.subsection_header("globalstate/x", 1)
    r = Reader(other, 0, len(other))
    V.decode_state(D.TIMER, r, 2)
    assert r.pos == 24                   # a foreign subsection ends the list, unread


def test_globalstate_validation():
    dec = V.VMStateBodyDecoder(D.GLOBALSTATE)
    dec.begin(S.QEMU_VM_SECTION_FULL, S.Section(4, "globalstate", 0, 1))
    bad = V.encode_state(D.GLOBALSTATE, {"size": 6, "runstate": D.runstate_buffer("bogus")})
    with pytest.raises(WireError, match="invalid parameter value: bogus"):
        dec.decode(Reader(bad + b"\x7e", 0, len(bad) + 1))
    # No NUL in 100 bytes: QEMU forces the last byte to NUL before parsing.
    unterminated = b"\0\0\0\x64" + b"r" * 100
    with pytest.raises(WireError, match="invalid parameter value: r{99}$"):
        dec.decode(Reader(unterminated + b"\x7e", 0, 105))
    ok = V.encode_state(D.GLOBALSTATE, D.globalstate_values("suspended"))
    ev, done = dec.decode(Reader(ok + b"\x7e", 0, len(ok) + 1))
    assert done and D.globalstate_runstate(ev.values) == "suspended"
    with pytest.raises(ValueError):
        D.globalstate_values("bogus")


def test_vmdesc_field_naming_arrays_and_escaping():
    desc = V.Description("dev", 3, (
        V.Field("unused", "unused_buffer", 4), V.Field("regs", "uint32", 4, count=4),
        V.Field("unused", "unused_buffer", 2), V.Field("new", "uint8", 1, version_id=4)))
    dev = V.DeviceSection(1, "0000:00:02.0/d\u00e9v", 2, desc, {"regs": [1, 2, 3, 4]})
    text = V.vmdesc_json([dev]).decode()
    assert text == (
        '{"page_size": 4096, "devices": [{"name": "0000:00:02.0/d\\u00E9v", "instance_id": 2, '
        '"vmsd_name": "dev", "version": 3, "fields": [{"name": "unused[0]", "type": '
        '"unused_buffer", "size": 4}, {"name": "regs", "array_len": 4, "type": "uint32", '
        '"size": 4}, {"name": "unused[1]", "type": "unused_buffer", "size": 2}]}]}')
    body = dev.body()
    assert body == bytes(4) + bytes.fromhex("00000001000000020000000300000004") + bytes(2)
    got = V.decode_state(desc, Reader(body + b"\x7e", 0, len(body) + 1), 3)
    assert got["regs"] == [1, 2, 3, 4]


def test_description_from_vmdesc_decodes_like_builtin():
    entries = json.loads(captured_vmdesc("icount1m"))["devices"]
    data = (VECTORS / "icount1m.bin").read_bytes()
    start = data.index(b"\x05timer") + 6 + 8
    for builtin, entry in zip((D.TIMER, D.GLOBALSTATE), entries):
        derived = V.description_from_vmdesc(entry)
        assert derived.name == builtin.name and derived.version_id == builtin.version_id
    derived = V.description_from_vmdesc(entries[0])
    a = V.decode_state(D.TIMER, Reader(data, start, len(data)), 2)
    b = V.decode_state(derived, Reader(data, start, len(data)), 2)
    assert a == b and "timer/icount" in b


def test_field_type_checks():
    with pytest.raises(ValueError):
        V.Field("x", "int32", 8)
    with pytest.raises(ValueError):
        V.Field("x", "float", 4)


@pytest.mark.parametrize("text, written", [
    ("ram", '"ram"'),
    ('a"b\\c', '"a\\"b\\\\c"'),
    ("tab\there\n", '"tab\\there\\n"'),
    ("\x01\x7f", '"\\u0001\\u007F"'),
    ("é😀", '"\\u00E9\\uD83D\\uDE00"'),
])
def test_vmdesc_strings_are_escaped_as_qemus_json_writer_does(text, written):
    assert V._json_str(text) == written
