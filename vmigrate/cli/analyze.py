"""``vmigrate analyze FILE``: dump a migration stream file.

Works on any stream written by ``migrate "exec:cat > FILE"`` (QEMU or
vmigrate): lists sections and commands, counts RAM pages by kind, shows the
RAM blocks, decoded device sections and the VM description, and with
``--extract DIR`` rebuilds each RAM block as ``DIR/<idstr>.bin``.

Device sections vmigrate has no description for are decoded with the field
sizes of the stream's own vmdesc (read first from the end of the file), as
QEMU's scripts/analyze-migration.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vmigrate.cli.main import CLIError
from vmigrate.migration.wire import NEED_DATA, WireError
from vmigrate.migration.wire import ram as wram
from vmigrate.migration.wire import stream as ws
from vmigrate.machine import devices as D
from vmigrate.migration.wire import vmstate as wv

READ_CHUNK = 4 << 20
#: The most RAM ``--extract`` writes, all blocks together: past it a stream's RAM_SAVE_FLAG_MEM_SIZE
#: is not believed (the images are sparse, but their page map costs a byte per page in memory).
MAX_EXTRACT_BYTES = 256 << 30
#: The smallest record of one page in a stream: its be64 offset/flags (with RAM_SAVE_FLAG_CONTINUE,
#: no block name) and the fill byte of a zero page (docs/qemu/ram.md).  The first pass sends every
#: page of every block, so a stream of N bytes carries at most N / 9 pages.
MIN_PAGE_RECORD = 9


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "analyze", help="dump a migration stream file",
        description="Decode a QEMU 7.2 migration stream file and print its contents.")
    parser.add_argument("file", type=Path, help="stream file (e.g. from migrate exec:cat > FILE)")
    parser.add_argument("--extract", metavar="DIR", type=Path,
                        help="write each RAM block to DIR/<idstr>.bin")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.set_defaults(func=run)
    return parser


# -- vmdesc-driven bodies --------------------------------------------------------

def find_vmdesc(tail: bytes) -> dict | None:
    """The trailing VM description of a stream, given the end of the file."""
    pos = len(tail)
    limit = max(0, len(tail) - ws.MAX_VMDESC - 5)
    while True:
        pos = tail.rfind(bytes((ws.QEMU_VM_VMDESCRIPTION,)), limit, pos)
        if pos < 0 or pos + 5 > len(tail):
            return None
        (n,) = struct.unpack_from(">I", tail, pos + 1)
        if pos + 5 + n == len(tail):
            try:
                return json.loads(tail[pos + 5:])
            except ValueError:
                return None


@dataclass
class VmdescBodyDecoder:
    """Decodes one idstr's sections with the layout its vmdesc entries give."""

    by_instance: dict[int, wv.Description]
    version_id: int = 0xFFFFFFFF
    _section: ws.Section | None = None

    @property
    def instance_ids(self) -> frozenset[int]:
        return frozenset(self.by_instance)

    def begin(self, kind: int, section: ws.Section) -> None:
        self._section = section

    def decode(self, r) -> tuple[object, bool]:
        s = self._section
        desc = self.by_instance[s.instance_id]
        values = wv.decode_state(desc, r, desc.version_id)
        return wv.DeviceState(s.idstr, s.instance_id, s.version_id, desc.name, values), True


def vmdesc_bodies(vmdesc: dict | None) -> dict[str, VmdescBodyDecoder]:
    bodies: dict[str, VmdescBodyDecoder] = {}
    for dev in (vmdesc or {}).get("devices", ()):
        body = bodies.setdefault(dev["name"], VmdescBodyDecoder({}))
        body.by_instance[int(dev.get("instance_id", 0))] = wv.description_from_vmdesc(dev)
    return bodies


# -- the walk -------------------------------------------------------------------

def image_name(idstr: str) -> str:
    """File name for a RAM block (ROM idstrs such as ``/rom@etc/acpi/tables`` hold slashes)."""
    return idstr.strip("/").replace("/", "_") + ".bin"


@dataclass
class BlockImage:
    """A RAM block being rebuilt in a sparse file."""

    path: Path
    pages: np.memmap
    written: np.ndarray


@dataclass
class Report:
    size: int = 0
    configuration: dict | None = None
    sections: list[dict] = field(default_factory=list)
    commands: list[dict] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)
    pages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("zero", "normal", "xbzrle", "compressed"), 0))
    devices: list[dict] = field(default_factory=list)
    eof: bool = False
    vmdesc: Any = None


def _value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.rstrip(b"\0").decode("ascii") if _printable(v) else v.hex()
    if isinstance(v, dict):
        return {k: _value(x) for k, x in v.items()}
    return v


def _printable(raw: bytes) -> bool:
    text = raw.rstrip(b"\0")
    return bool(text) and b"\0" not in text and all(32 <= c < 127 for c in text)


class Analyzer:
    def __init__(self, extract: Path | None, vmdesc: dict | None, stream_size: int) -> None:
        """``stream_size`` (the file's bytes) bounds the RAM blocks ``extract`` believes."""
        self.report = Report()
        self.stream_size = stream_size
        self.ram = wram.RamBodyDecoder(blocks=None, accept_compressed=True)
        bodies: dict[str, Any] = vmdesc_bodies(vmdesc)
        bodies.update(D.none_machine_bodies())
        bodies["ram"] = self.ram
        self.decoder = ws.StreamDecoder(bodies, require_configuration=None)
        self.extract = extract
        self.images: dict[str, BlockImage] = {}

    def feed(self, data: bytes) -> None:
        self.decoder.feed(data)
        self.drain()

    def drain(self) -> None:
        while True:
            offset = self.decoder.offset
            ev = self.decoder.next_event()
            if ev is NEED_DATA:
                return
            self._event(ev, offset)

    def _section(self, kind: str, ev: Any, offset: int) -> None:
        self.report.sections.append({
            "offset": offset, "type": kind, "section_id": ev.section_id, "idstr": ev.idstr,
            "instance_id": getattr(ev, "instance_id", None),
            "version_id": getattr(ev, "version_id", None)})

    def _event(self, ev: Any, offset: int) -> None:
        """Record one event; ``offset`` is where its bytes start in the file."""
        rep = self.report
        if isinstance(ev, (wram.RamPages, wram.RamZeroPages)):
            rep.pages["normal" if isinstance(ev, wram.RamPages) else "zero"] += len(ev)
            if self.extract is not None:
                self._store(ev)
        elif isinstance(ev, wram.RamXbzrlePage):
            rep.pages["xbzrle"] += 1
            if self.extract is not None:
                raise CLIError("cannot extract RAM: XBZRLE pages are not decodable yet")
        elif isinstance(ev, wram.RamCompressedPage):
            rep.pages["compressed"] += 1
            if self.extract is not None:
                self._store_compressed(ev)
        elif isinstance(ev, ws.SectionStart):
            self._section("START", ev, offset)
        elif isinstance(ev, ws.SectionPart):
            self._section("PART", ev, offset)
        elif isinstance(ev, ws.SectionEnd):
            self._section("END", ev, offset)
        elif isinstance(ev, ws.SectionFull):
            self._section("FULL", ev, offset)
        elif isinstance(ev, wram.RamMemSize):
            if self.extract is not None:
                self._check_extract_size(ev.blocks)
            for b in ev.blocks:
                rep.blocks.append({"idstr": b.idstr, "used_length": b.used_length})
                if self.extract is not None:
                    self._open_image(b.idstr, b.used_length)
        elif isinstance(ev, wv.DeviceState):
            rep.devices.append({"idstr": ev.idstr, "instance_id": ev.instance_id,
                                "version_id": ev.version_id, "values": _value(ev.values)})
        elif isinstance(ev, ws.Configuration):
            rep.configuration = {"machine": ev.machine, "capabilities": list(ev.capabilities),
                                 "uuid": ev.uuid.hex() if ev.uuid else None,
                                 "target_page_bits": ev.target_page_bits}
            self.ram.ignore_shared = "x-ignore-shared" in ev.capabilities
        elif isinstance(ev, ws.Command):
            rep.commands.append({"offset": offset, "cmd": ev.cmd, "name": ev.name,
                                 "payload": ev.payload.hex()})
        elif isinstance(ev, ws.EOF):
            rep.eof = True
        elif isinstance(ev, ws.VMDescription):
            try:
                rep.vmdesc = ev.parsed()
            except ValueError:
                rep.vmdesc = ev.json.decode("utf-8", "replace")

    def _check_extract_size(self, blocks) -> None:
        """Refuse images a hostile RAM_SAVE_FLAG_MEM_SIZE declares before creating any of them.

        With ``x-ignore-shared`` shared blocks are declared but never sent, so
        only :data:`MAX_EXTRACT_BYTES` bounds those streams.
        """
        total = sum(b.used_length for b in blocks)
        if total > MAX_EXTRACT_BYTES:
            raise CLIError(f"cannot extract RAM: the stream declares {total} bytes of RAM blocks, "
                           f"more than the {MAX_EXTRACT_BYTES} bytes --extract writes")
        pages = sum(b.used_length // wram.TARGET_PAGE_SIZE for b in blocks)
        if not self.ram.ignore_shared and pages * MIN_PAGE_RECORD > self.stream_size:
            raise CLIError(f"cannot extract RAM: the stream declares {total} bytes of RAM blocks, "
                           f"more than its {self.stream_size} bytes can carry")

    def _open_image(self, idstr: str, used_length: int) -> None:
        path = self.extract / image_name(idstr)
        npages = used_length // wram.TARGET_PAGE_SIZE
        with open(path, "wb") as f:
            f.truncate(used_length)
        pages = (np.memmap(path, dtype=np.uint8, mode="r+", shape=(npages, wram.TARGET_PAGE_SIZE))
                 if npages else np.zeros((0, wram.TARGET_PAGE_SIZE), np.uint8))
        self.images[idstr] = BlockImage(path, pages, np.zeros(npages, bool))

    def _store(self, ev: wram.RamPages | wram.RamZeroPages) -> None:
        img = self.images[ev.block]
        idx = ev.pages
        if isinstance(ev, wram.RamPages):
            img.pages[idx] = ev.data
            img.written[idx] = True
            return
        # Zero pages stay holes unless they overwrite earlier data (sparse output).
        touch = img.written[idx] | (ev.fill != 0)
        if touch.any():
            img.pages[idx[touch]] = np.asarray(ev.fill)[touch, None]
            img.written[idx[touch]] = True

    def _store_compressed(self, ev: wram.RamCompressedPage) -> None:
        try:
            page = zlib.decompress(ev.data)
        except zlib.error as err:
            raise CLIError(f"compressed page at {ev.offset:#x} of {ev.block}: {err}") from None
        if len(page) != wram.TARGET_PAGE_SIZE:
            raise CLIError(f"compressed page at {ev.offset:#x} of {ev.block} inflates to "
                           f"{len(page)} bytes")
        img = self.images[ev.block]
        i = ev.offset // wram.TARGET_PAGE_SIZE
        img.pages[i] = np.frombuffer(page, np.uint8)
        img.written[i] = True

    def close(self) -> None:
        for img in self.images.values():
            if isinstance(img.pages, np.memmap):
                img.pages.flush()


def analyze(path: Path, extract: Path | None = None) -> Report:
    """Decode the whole file; raises WireError/OSError on failure."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - ws.MAX_VMDESC - 5))
        vmdesc = find_vmdesc(f.read())
        f.seek(0)
        if extract is not None:
            extract.mkdir(parents=True, exist_ok=True)
        an = Analyzer(extract, vmdesc, size)
        try:
            while chunk := f.read(READ_CHUNK):
                an.feed(chunk)
            an.decoder.close()
            an.drain()
        finally:
            an.close()
    an.report.size = size
    if not an.report.eof:
        raise WireError("stream ends without QEMU_VM_EOF")
    return an.report


# -- output ---------------------------------------------------------------------

def _print_text(path: Path, rep: Report, out) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"{path}: {rep.size} bytes")
    if rep.configuration is not None:
        c = rep.configuration
        extra = ""
        if c["capabilities"]:
            extra += f", capabilities {','.join(c['capabilities'])}"
        if c["uuid"]:
            extra += f", uuid {c['uuid']}"
        if c["target_page_bits"] is not None:
            extra += f", target page bits {c['target_page_bits']}"
        p(f"configuration: machine '{c['machine']}'{extra}")
    p("sections:")
    p(f"  {'offset':>10}  {'type':5}  {'id':>4}  {'idstr':24}  {'instance':>8}  {'version':>7}")
    for s in rep.sections:
        inst = "" if s["instance_id"] is None else s["instance_id"]
        ver = "" if s["version_id"] is None else s["version_id"]
        p(f"  {s['offset']:#10x}  {s['type']:5}  {s['section_id']:>4}  {s['idstr']:24}  "
          f"{inst:>8}  {ver:>7}")
    if rep.commands:
        p("commands:")
        for c in rep.commands:
            p(f"  {c['offset']:#10x}  {c['name']} ({c['cmd']}) {c['payload']}")
    p("RAM blocks:")
    for b in rep.blocks:
        p(f"  {b['idstr']:24}  used_length {b['used_length']:#x} ({b['used_length']})")
    pages = rep.pages
    p(f"RAM pages: zero {pages['zero']}, normal {pages['normal']}, xbzrle {pages['xbzrle']}, "
      f"compressed {pages['compressed']}")
    p("devices:")
    for d in rep.devices:
        p(f"  {d['idstr']} (instance {d['instance_id']}, version {d['version_id']}): "
          f"{json.dumps(d['values'])}")
    if rep.vmdesc is None:
        p("VM description: none")
    else:
        p("VM description:")
        p(json.dumps(rep.vmdesc, indent=2))


def run(args: argparse.Namespace) -> int:
    try:
        rep = analyze(args.file, args.extract)
    except WireError as err:
        raise CLIError(f"{args.file}: invalid migration stream: {err}") from None
    except OSError as err:
        raise CLIError(f"{err.filename or args.file}: {err.strerror or err}") from None
    try:
        _print(args, rep)
    except BrokenPipeError:
        # The reader (e.g. ``| head``) went away: not an error of the stream.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _print(args: argparse.Namespace, rep: Report) -> None:
    if args.json:
        json.dump({"file": str(args.file), "size": rep.size,
                   "configuration": rep.configuration, "sections": rep.sections,
                   "commands": rep.commands,
                   "ram": {"blocks": rep.blocks, "pages": rep.pages},
                   "devices": rep.devices, "vmdesc": rep.vmdesc}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _print_text(args.file, rep, sys.stdout)
    if args.extract is not None:
        for b in rep.blocks:
            print(f"extracted {b['idstr']} -> {args.extract / image_name(b['idstr'])}",
                  file=sys.stderr)
