"""``vmigrate analyze`` on captured streams."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vmigrate.cli import analyze
from vmigrate.cli.main import CLIError
from vmigrate.migration.wire import ram as R
from vmigrate.migration.wire import stream as S
from vmigrate.migration.wire import vmstate as V

VECTORS = Path(__file__).parent / "vectors"


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    analyze.add_parser(parser.add_subparsers())
    args = parser.parse_args(["analyze", *argv])
    return args.func(args)


def test_text_report(capsys):
    assert run(str(VECTORS / "mixed64k.bin")) == 0
    out = capsys.readouterr().out
    assert "configuration: machine 'none'" in out
    assert "RAM pages: zero 6, normal 10, xbzrle 0, compressed 0" in out
    assert "ram0                      used_length 0x10000 (65536)" in out
    lines = [line.split() for line in out.splitlines()]
    assert ["0x11", "START", "2", "ram", "0", "4"] in lines
    assert ["0xa0f3", "FULL", "0", "timer", "0", "2"] in lines
    assert '"runstate": "running"' in out and '"vmsd_name": "globalstate"' in out


def test_json_report(capsys):
    assert run("--json", str(VECTORS / "uuid8k.bin")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["configuration"]["uuid"] == "123456789abcdef01122334455667788"
    assert [s["type"] for s in doc["sections"]] == ["START", "PART", "END", "FULL", "FULL"]
    assert doc["ram"] == {"blocks": [{"idstr": "ram0", "used_length": 8192}],
                          "pages": {"zero": 1, "normal": 1, "xbzrle": 0, "compressed": 0}}
    assert doc["devices"][1]["values"]["runstate"] == "running"
    assert doc["vmdesc"]["page_size"] == 4096


def test_extract_rebuilds_ram(tmp_path, capsys):
    assert run("--extract", str(tmp_path / "out"), str(VECTORS / "small8k.bin")) == 0
    assert (tmp_path / "out" / "ram0.bin").read_bytes() == bytes(4096) + b"\x5a" * 4096


def test_extract_applies_pages_in_stream_order(tmp_path, capsys):
    """A page sent twice ends with its last contents; a re-zeroed page is zeroed."""
    ram = np.zeros((4, 4096), np.uint8)
    ram[1] = 9
    ram[2] = 3
    ch = R.ChannelState()
    body = bytes(R.encode_pages("ram", ram, [0, 1, 2], ch)[0])
    ram[1] = 0
    ram[2] = 4
    body += bytes(R.encode_pages("ram", ram, [1, 2], ch)[0])
    stream = (S.header() + S.configuration() + S.section_start(2, "ram", 0, 4)
              + R.mem_size([("ram", 4 * 4096)]) + R.eos() + S.footer(2)
              + S.section_part(2) + body + R.eos() + S.footer(2) + S.eof())
    src = tmp_path / "s.bin"
    src.write_bytes(stream)
    assert run("--extract", str(tmp_path), str(src)) == 0
    assert (tmp_path / "ram.bin").read_bytes() == ram.tobytes()
    assert "RAM pages: zero 2, normal 3" in capsys.readouterr().out


def test_unknown_device_decoded_from_vmdesc(tmp_path, capsys):
    desc = V.Description("serial", 3, (V.Field("divider", "uint16", 2),
                                       V.Field("fifo", "uint8", 1, count=4)))
    dev = V.DeviceSection(7, "serial", 0, desc, {"divider": 12, "fifo": [1, 2, 3, 4]})
    stream = (S.header() + S.configuration() + dev.encode() + S.eof()
              + S.vmdesc(V.vmdesc_json([dev])))
    src = tmp_path / "s.bin"
    src.write_bytes(stream)
    assert run("--json", str(src)) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["devices"] == [{"idstr": "serial", "instance_id": 0, "version_id": 3,
                               "values": {"divider": 12, "fifo": [1, 2, 3, 4]}}]


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d[:100], "truncated"),
    (lambda d: d[:0x44] + b"\x09" + d[0x45:], "Unknown savevm section type 9"),
    (lambda d: b"XXXX" + d[4:], "Not a migration stream"),
])
def test_errors_are_one_line(tmp_path, mutate, match):
    src = tmp_path / "bad.bin"
    src.write_bytes(mutate((VECTORS / "small8k.bin").read_bytes()))
    with pytest.raises(CLIError, match=match):
        run(str(src))


def test_missing_file_and_cli_exit_status(tmp_path):
    with pytest.raises(CLIError, match="No such file"):
        run(str(tmp_path / "nope.bin"))
    proc = subprocess.run([sys.executable, "-m", "vmigrate", "analyze", str(tmp_path / "nope.bin")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("vmigrate analyze: ")


def mem_size_stream(used_length: int, capabilities: tuple[str, ...] = ()) -> bytes:
    """A stream whose only RAM record declares one block of ``used_length`` bytes (at GPA 0 with
    x-ignore-shared, whose MEM_SIZE entries carry it)."""
    gpa = 0 if "x-ignore-shared" in capabilities else None
    return (S.header() + S.configuration(caps=capabilities) + S.section_start(2, "ram", 0, 4)
            + R.mem_size([R.RamBlockInfo("ram", used_length, gpa=gpa)]) + R.eos() + S.footer(2) + S.eof())


TIB_DECLARED = "the stream declares 1099511627776 bytes of RAM blocks, "


@pytest.mark.parametrize("used_length,caps,match", [
    (1 << 40, (), TIB_DECLARED + "more than the 274877906944 bytes --extract writes"),
    (1 << 30, (), "the stream declares 1073741824 bytes of RAM blocks, more than its \\d+ bytes can carry"),
    (1 << 40, ("x-ignore-shared",), TIB_DECLARED + "more than the 274877906944 bytes --extract writes"),
])
def test_extract_refuses_blocks_the_stream_cannot_fill(tmp_path, used_length, caps, match):
    """A hostile MEM_SIZE costs a clear error, not a huge sparse file (nor its page map in memory)."""
    src = tmp_path / "s.bin"
    src.write_bytes(mem_size_stream(used_length, caps))
    out = tmp_path / "out"
    with pytest.raises(CLIError, match=f"^cannot extract RAM: {match}"):
        run("--extract", str(out), str(src))
    assert list(out.iterdir()) == []
    # Without --extract the report still shows what the stream declares.
    assert run(str(src)) == 0


def test_extract_takes_shared_blocks_the_stream_does_not_carry(tmp_path, capsys):
    """With x-ignore-shared a declared block may be missing from the stream: only the fixed bound applies."""
    src = tmp_path / "s.bin"
    src.write_bytes(mem_size_stream(1 << 30, ("x-ignore-shared",)))
    assert run("--extract", str(tmp_path / "out"), str(src)) == 0
    assert (tmp_path / "out" / "ram.bin").stat().st_size == 1 << 30
