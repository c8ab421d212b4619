"""Top-level framing of the QEMU 7.2 migration stream (spec: docs/qemu/stream.md).

Encoders are plain functions returning ``bytes``; a source concatenates them
in the order of docs/qemu/stream.md §6 (header, configuration, START sections, PART
sections, END sections, FULL sections, EOF, vmdesc)::

    out = header() + configuration("none")
    out += section_start(2, "ram", 0, 4) + ram.mem_size([("ram0", size)]) + ram.eos()
    out += footer(2)

:class:`StreamDecoder` is the incremental, sans-IO reader used by a
destination (h11 style)::

    dec = StreamDecoder({"ram": RamBodyDecoder(blocks), "timer": ..., ...})
    while not done:
        n = sock.recv_into(buf)
        dec.feed(memoryview(buf)[:n])
        while (ev := dec.next_event()) is not NEED_DATA:
            apply(ev)             # RamPages: ram[ev.pages] = ev.data

Section bodies are decoded by *body decoders* chosen by idstr at START/FULL
time (see :class:`BodyDecoder`); their events (``RamPages``, ``DeviceState``
...) are returned by ``next_event()`` between the section's header event and
its :class:`SectionFooter`.  A malformed stream raises :class:`WireError`
and leaves the decoder failed (every later call raises the same error).

End of stream: after :class:`EOF` a precopy source sends the vmdesc
(:class:`VMDescription`, then ``finished`` is True); a postcopy source sends
nothing, so the destination decides whether to wait for it.  When ``recv``
returns 0, call ``close()``: a stream cut inside an element then raises
WireError instead of waiting forever, while a stream ending right after EOF
is accepted, as QEMU does.  PACKAGED blobs are decoded inline: the command
event, the blob's own events, then :class:`PackageEnd`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Container, Mapping, Protocol, Sequence

from vmigrate.migration.wire.buffer import (
    NEED_DATA, InputBuffer, Reader, Short, decode_name,
)
from vmigrate.migration.wire.errors import WireError

# -- constants ---------------------------------------------------------------

QEMU_VM_FILE_MAGIC = 0x5145564D          # "QEVM"
QEMU_VM_FILE_VERSION_COMPAT = 2
QEMU_VM_FILE_VERSION = 3

QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

MIG_CMD_INVALID = 0
MIG_CMD_OPEN_RETURN_PATH = 1
MIG_CMD_PING = 2
MIG_CMD_POSTCOPY_ADVISE = 3
MIG_CMD_POSTCOPY_LISTEN = 4
MIG_CMD_POSTCOPY_RUN = 5
MIG_CMD_POSTCOPY_RAM_DISCARD = 6
MIG_CMD_PACKAGED = 7
MIG_CMD_ENABLE_COLO = 8
MIG_CMD_POSTCOPY_RESUME = 9
MIG_CMD_RECV_BITMAP = 10
MIG_CMD_MAX = 11

#: name and fixed payload length (None = variable) of each command.
MIG_CMDS: dict[int, tuple[str, int | None]] = {
    MIG_CMD_OPEN_RETURN_PATH: ("OPEN_RETURN_PATH", 0),
    MIG_CMD_PING: ("PING", 4),
    MIG_CMD_POSTCOPY_ADVISE: ("POSTCOPY_ADVISE", None),
    MIG_CMD_POSTCOPY_LISTEN: ("POSTCOPY_LISTEN", 0),
    MIG_CMD_POSTCOPY_RUN: ("POSTCOPY_RUN", 0),
    MIG_CMD_POSTCOPY_RAM_DISCARD: ("POSTCOPY_RAM_DISCARD", None),
    MIG_CMD_PACKAGED: ("PACKAGED", 4),
    MIG_CMD_ENABLE_COLO: ("ENABLE_COLO", 0),
    MIG_CMD_POSTCOPY_RESUME: ("POSTCOPY_RESUME", 0),
    MIG_CMD_RECV_BITMAP: ("RECV_BITMAP", None),
}

#: Upper bounds on lengths read from the wire, so a hostile length is
#: rejected instead of making the decoder wait for (and buffer) gigabytes.
MAX_MACHINE_NAME = 256
MAX_VMDESC = 64 << 20
MAX_PACKAGED = 64 << 20
MAX_PACKAGE_DEPTH = 4
MAX_CAPABILITIES = 64

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")

_CONFIG_SUBSECTIONS = ("configuration/target-page-bits", "configuration/capabilities",
                       "configuration/uuid")


# -- encoders ----------------------------------------------------------------

def str8(name: str | bytes) -> bytes:
    """Counted string: u8 length + bytes, no NUL."""
    raw = name.encode("ascii") if isinstance(name, str) else bytes(name)
    if not 0 < len(raw) <= 255:
        raise ValueError(f"counted string must be 1..255 bytes: {raw!r}")
    return bytes((len(raw),)) + raw


def header() -> bytes:
    return _BE32.pack(QEMU_VM_FILE_MAGIC) + _BE32.pack(QEMU_VM_FILE_VERSION)


def subsection_header(name: str, version_id: int) -> bytes:
    return bytes((QEMU_VM_SUBSECTION,)) + str8(name) + _BE32.pack(version_id)


def configuration(machine: str = "none", caps: Sequence[str] = (),
                  uuid: bytes | None = None, target_page_bits: int | None = None) -> bytes:
    """The configuration section; subsections only when their data is given.

    ``caps`` are the enabled *validated* capabilities (``x-ignore-shared``);
    ``uuid`` (16 bytes) is sent by QEMU only with ``-uuid`` and the
    ``validate-uuid`` capability.
    """
    name = machine.encode("ascii")
    out = bytes((QEMU_VM_CONFIGURATION,)) + _BE32.pack(len(name)) + name
    if target_page_bits is not None:
        out += subsection_header(_CONFIG_SUBSECTIONS[0], 1) + _BE32.pack(target_page_bits)
    if caps:
        out += subsection_header(_CONFIG_SUBSECTIONS[1], 1) + _BE32.pack(len(caps))
        out += b"".join(str8(c) for c in caps)
    if uuid is not None:
        if len(uuid) != 16:
            raise ValueError("uuid must be 16 bytes")
        out += subsection_header(_CONFIG_SUBSECTIONS[2], 1) + bytes(uuid)
    return out


def _full_header(kind: int, section_id: int, idstr: str, instance: int, version: int) -> bytes:
    return (bytes((kind,)) + _BE32.pack(section_id) + str8(idstr)
            + _BE32.pack(instance) + _BE32.pack(version))


def section_start(section_id: int, idstr: str, instance: int, version: int) -> bytes:
    return _full_header(QEMU_VM_SECTION_START, section_id, idstr, instance, version)


def section_full_header(section_id: int, idstr: str, instance: int, version: int) -> bytes:
    return _full_header(QEMU_VM_SECTION_FULL, section_id, idstr, instance, version)


def section_part(section_id: int) -> bytes:
    return bytes((QEMU_VM_SECTION_PART,)) + _BE32.pack(section_id)


def section_end(section_id: int) -> bytes:
    return bytes((QEMU_VM_SECTION_END,)) + _BE32.pack(section_id)


def footer(section_id: int) -> bytes:
    return bytes((QEMU_VM_SECTION_FOOTER,)) + _BE32.pack(section_id)


def section_full(section_id: int, idstr: str, instance: int, version: int,
                 body: bytes) -> bytes:
    """A complete FULL section: header, device body, footer."""
    return section_full_header(section_id, idstr, instance, version) + body + footer(section_id)


def command(cmd: int, payload: bytes = b"") -> bytes:
    if len(payload) > 0xFFFF:
        raise ValueError("command payload longer than 65535 bytes")
    return bytes((QEMU_VM_COMMAND,)) + _BE16.pack(cmd) + _BE16.pack(len(payload)) + payload


def open_return_path() -> bytes:
    return command(MIG_CMD_OPEN_RETURN_PATH)


def ping(value: int) -> bytes:
    return command(MIG_CMD_PING, _BE32.pack(value))


def postcopy_advise(page_size_summary: int | None = 0x1000,
                    target_page_size: int = 0x1000) -> bytes:
    """16-byte advise with postcopy-ram; ``None`` gives the 0-byte form (dirty-bitmaps only)."""
    if page_size_summary is None:
        return command(MIG_CMD_POSTCOPY_ADVISE)
    return command(MIG_CMD_POSTCOPY_ADVISE,
                   _BE64.pack(page_size_summary) + _BE64.pack(target_page_size))


def postcopy_listen() -> bytes:
    return command(MIG_CMD_POSTCOPY_LISTEN)


def postcopy_run() -> bytes:
    return command(MIG_CMD_POSTCOPY_RUN)


def postcopy_resume() -> bytes:
    return command(MIG_CMD_POSTCOPY_RESUME)


def enable_colo() -> bytes:
    return command(MIG_CMD_ENABLE_COLO)


def postcopy_ram_discard(idstr: str, ranges: Sequence[tuple[int, int]]) -> bytes:
    """Discard ``(start, length)`` byte ranges of one RAMBlock."""
    if not ranges:
        raise ValueError("a discard command needs at least one range")
    payload = b"\x00" + str8(idstr) + b"\x00" + b"".join(
        _BE64.pack(s) + _BE64.pack(n) for s, n in ranges)
    return command(MIG_CMD_POSTCOPY_RAM_DISCARD, payload)


def packaged(blob: bytes) -> bytes:
    """PACKAGED command followed by its blob (the blob is outside the command length)."""
    return command(MIG_CMD_PACKAGED, _BE32.pack(len(blob))) + blob


def recv_bitmap(idstr: str) -> bytes:
    return command(MIG_CMD_RECV_BITMAP, str8(idstr))


def eof() -> bytes:
    return bytes((QEMU_VM_EOF,))


def vmdesc(json_bytes: bytes) -> bytes:
    return bytes((QEMU_VM_VMDESCRIPTION,)) + _BE32.pack(len(json_bytes)) + bytes(json_bytes)


# -- command payload helpers ---------------------------------------------------

def command_name(cmd: int) -> str:
    return MIG_CMDS.get(cmd, ("INVALID", None))[0]


def decode_ping(payload: bytes) -> int:
    return _BE32.unpack(payload)[0]


def decode_advise(payload: bytes) -> tuple[int, int] | None:
    """``(page_size_summary, target_page_size)`` or None for the 0-byte advise."""
    if not payload:
        return None
    return _BE64.unpack_from(payload, 0)[0], _BE64.unpack_from(payload, 8)[0]


def decode_discard(payload: bytes) -> tuple[str, list[tuple[int, int]]]:
    """RAMBlock idstr and ``(start, length)`` ranges of a POSTCOPY_RAM_DISCARD."""
    n = payload[1]
    name = decode_name(payload[2:2 + n], "discard RAMBlock name")
    body = payload[3 + n:]
    return name, [(_BE64.unpack_from(body, i)[0], _BE64.unpack_from(body, i + 8)[0])
                  for i in range(0, len(body), 16)]


def decode_packaged(payload: bytes) -> int:
    return _BE32.unpack(payload)[0]


def decode_recv_bitmap(payload: bytes) -> str:
    return decode_name(payload[1:], "RECV_BITMAP RAMBlock name")


def _validate_command(cmd: int, payload: bytes) -> None:
    length = len(payload)
    if cmd not in MIG_CMDS:
        raise WireError(f"MIG_CMD {cmd:#x} unknown (len {length:#x})")
    name, fixed = MIG_CMDS[cmd]
    if fixed is not None and fixed != length:
        raise WireError(f"{name} received with bad length - expecting {fixed}, got {length}")
    if cmd == MIG_CMD_POSTCOPY_ADVISE and length not in (0, 16):
        raise WireError(f"CMD_POSTCOPY_ADVISE invalid length ({length})")
    elif cmd == MIG_CMD_POSTCOPY_RAM_DISCARD:
        if length < 1 + 1 + 1 + 1 + 2 * 8:
            raise WireError(f"CMD_POSTCOPY_RAM_DISCARD invalid length ({length})")
        if payload[0] != 0:
            raise WireError(f"CMD_POSTCOPY_RAM_DISCARD invalid version ({payload[0]})")
        n = payload[1]
        if 3 + n > length or payload[2 + n] != 0:
            raise WireError("CMD_POSTCOPY_RAM_DISCARD missing nil")
        if (length - 3 - n) % 16 or length - 3 - n == 0:
            raise WireError(f"CMD_POSTCOPY_RAM_DISCARD invalid length ({length - 3 - n})")
        decode_name(payload[2:2 + n], "discard RAMBlock name")
    elif cmd == MIG_CMD_RECV_BITMAP:
        if length < 1 or payload[0] + 1 != length:
            raise WireError(f"loadvm_handle_recv_bitmap: invalid payload length ({length})")
        decode_name(payload[1:], "RECV_BITMAP RAMBlock name")
    elif cmd == MIG_CMD_PACKAGED:
        size = decode_packaged(payload)
        if size > MAX_PACKAGED:
            raise WireError(f"PACKAGED blob of {size} bytes exceeds the {MAX_PACKAGED} byte limit")


# -- events --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Header:
    version: int = QEMU_VM_FILE_VERSION


@dataclass(frozen=True, slots=True)
class Configuration:
    machine: str
    capabilities: tuple[str, ...] = ()
    uuid: bytes | None = None
    #: None when the subsection is absent (the destination then assumes 12 on x86).
    target_page_bits: int | None = None


@dataclass(frozen=True, slots=True)
class Section:
    """What a section header told about its handler, kept for PART/END."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class SectionStart:
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class SectionFull:
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class SectionPart:
    section_id: int
    idstr: str = ""


@dataclass(frozen=True, slots=True)
class SectionEnd:
    section_id: int
    idstr: str = ""


@dataclass(frozen=True, slots=True)
class SectionFooter:
    section_id: int


@dataclass(frozen=True, slots=True)
class Command:
    cmd: int
    payload: bytes = b""

    @property
    def name(self) -> str:
        return command_name(self.cmd)


@dataclass(frozen=True, slots=True)
class PackageEnd:
    """The blob of a PACKAGED command has been fully consumed."""


@dataclass(frozen=True, slots=True)
class EOF:
    pass


@dataclass(frozen=True, slots=True)
class VMDescription:
    json: bytes

    def parsed(self) -> dict:
        return json.loads(self.json)


# -- body decoders ---------------------------------------------------------------

class BodyDecoder(Protocol):
    """Decodes the body of one kind of section (chosen by idstr).

    ``begin`` is called after every section header naming this decoder and
    may reject the section (WireError); ``decode`` parses one element of the
    body from the reader (raising :class:`Short` through the reader when the
    element is incomplete, without side effects) and returns the event plus
    True when the body is complete (the footer comes next).  Decoders that
    keep state across sections (RAM's last block) keep it in themselves, so
    one instance serves one channel.
    """

    #: Highest section version this side loads.
    version_id: int

    def begin(self, kind: int, section: Section) -> None: ...

    def decode(self, r: Reader) -> tuple[object, bool]: ...


# -- decoder -------------------------------------------------------------------

_S_HEADER, _S_CONFIG, _S_TOP, _S_BODY, _S_FOOTER, _S_AFTER_EOF, _S_DONE, _S_SKIP = range(8)


@dataclass(slots=True)
class _Package:
    end: int                  # absolute stream offset where the blob ends
    skipping: bool = False    # EOF or POSTCOPY_RUN seen: the rest is ignored


@dataclass
class StreamDecoder:
    """Incremental decoder of the main migration channel.

    ``bodies`` maps idstr to the body decoder for its sections; a section
    whose idstr is absent fails like QEMU's "Unknown savevm section".
    ``header=False`` decodes a stream that starts directly with top-level
    elements (a postcopy-recovery connection).  ``require_configuration``
    mirrors the destination's ``send-configuration`` property: True requires
    the configuration section, False forbids it, None accepts either.
    ``known_capabilities`` (the MigrationCapability names of the schema), when
    given, rejects an unknown name in the configuration's capability list.
    ``sections`` seeds the section table: a recovery connection's PART
    sections refer to sections started on the broken one.
    """

    bodies: Mapping[str, BodyDecoder]
    header: bool = True
    require_configuration: bool | None = True
    known_capabilities: Container[str] | None = None
    sections_seen: Mapping[int, Section] | None = None
    _in: InputBuffer = field(default_factory=InputBuffer, init=False, repr=False)
    _state: int = field(default=_S_HEADER, init=False)
    _sections: dict[int, Section] = field(default_factory=dict, init=False, repr=False)
    _current: Section | None = field(default=None, init=False, repr=False)
    _packages: list[_Package] = field(default_factory=list, init=False, repr=False)
    _error: WireError | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.header:
            self._state = _S_TOP
        if self.sections_seen is not None:
            self._sections.update(self.sections_seen)

    # public API

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes (copied unless already ``bytes``)."""
        self._in.feed(data)

    def close(self) -> None:
        """The peer closed the channel: a truncated element now raises WireError."""
        self._in.close()

    @property
    def finished(self) -> bool:
        """True after the vmdesc (the last thing a precopy source writes)."""
        return self._state == _S_DONE

    @property
    def offset(self) -> int:
        """Stream offset of the next unconsumed byte."""
        return self._in.consumed

    def take_rest(self) -> bytes:
        """The bytes fed after the last event: what follows a COLO checkpoint's EOF on the
        channel (its ``vmstate-size`` message), which is not stream elements."""
        return self._in.take_rest()

    @property
    def sections(self) -> Mapping[int, Section]:
        """Sections seen so far by stream section id."""
        return self._sections

    def next_event(self) -> object:
        """The next decoded event, or :data:`NEED_DATA`."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except WireError as err:
            self._error = err
            raise

    # internals

    def _next(self) -> object:
        buf = self._in
        while True:
            if self._state == _S_SKIP:
                ev = self._skip_package()
                if ev is None:
                    return NEED_DATA
                return ev
            if (self._packages and self._state == _S_TOP
                    and buf.consumed == self._packages[-1].end):
                self._packages.pop()
                return PackageEnd()
            if not buf.snapshot():
                return self._need_more()
            limit = len(buf.data)
            package_limited = False
            if self._packages:
                pkg_end = buf.pos + (self._packages[-1].end - buf.consumed)
                if pkg_end < limit:
                    limit, package_limited = pkg_end, True
            r = Reader(buf.data, buf.pos, limit)
            try:
                ev = self._step(r)
            except Short as short:
                if package_limited:
                    raise WireError("element crosses the end of the PACKAGED blob") from None
                buf.need = short.end - buf.pos
                if not buf.snapshot():
                    return self._need_more()
                continue
            buf.advance(r.pos)
            if ev is not None:
                return ev

    def _need_more(self) -> object:
        if self._in.closed:
            if self._state in (_S_DONE, _S_AFTER_EOF) and not self._in.available():
                return NEED_DATA
            end = self._in.consumed + self._in.available()
            raise WireError(f"migration stream truncated at offset {end}")
        return NEED_DATA

    def _step(self, r: Reader) -> object | None:
        state = self._state
        if state == _S_BODY:
            return self._body(r)
        if state == _S_TOP:
            return self._top(r)
        if state == _S_FOOTER:
            return self._footer(r)
        if state == _S_HEADER:
            return self._header(r)
        if state == _S_CONFIG:
            return self._configuration(r)
        if state == _S_AFTER_EOF:
            return self._vmdesc(r)
        raise WireError(f"unexpected data after the end of the migration stream "
                        f"(offset {self._in.consumed})")

    def _header(self, r: Reader) -> object:
        magic = r.be32()
        version = r.be32()
        if magic != QEMU_VM_FILE_MAGIC:
            raise WireError("Not a migration stream")
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise WireError("SaveVM v2 format is obsolete and don't work anymore")
        if version != QEMU_VM_FILE_VERSION:
            raise WireError("Unsupported migration stream version")
        self._state = _S_CONFIG
        return Header(version)

    def _configuration(self, r: Reader) -> object | None:
        kind = r.peek_u8()
        if kind != QEMU_VM_CONFIGURATION:
            if self.require_configuration:
                raise WireError("Configuration section missing")
            self._state = _S_TOP
            return None
        if self.require_configuration is False:
            raise WireError(f"Unknown savevm section type {kind}")
        r.skip(1)
        n = r.be32()
        if not 0 < n <= MAX_MACHINE_NAME:
            raise WireError(f"configuration: machine name length {n} out of range")
        machine = decode_name(r.take(n), "machine type name")
        caps: tuple[str, ...] = ()
        uuid = None
        page_bits = None
        seen: set[str] = set()
        for name, version in _subsections(r, "configuration"):
            if name in seen:
                raise WireError(f"configuration: subsection {name} repeated")
            seen.add(name)
            if version != 1:
                raise WireError(f"{name}: unsupported version {version}")
            if name == "configuration/target-page-bits":
                page_bits = r.be32()
            elif name == "configuration/capabilities":
                count = r.be32()
                if count > MAX_CAPABILITIES:
                    raise WireError(f"configuration: {count} capabilities is too many")
                caps = tuple(decode_name(r.str8(), "capability") for _ in range(count))
                for cap in caps:
                    if self.known_capabilities is not None and cap not in self.known_capabilities:
                        raise WireError(f"Received unknown capability {cap}")
            elif name == "configuration/uuid":
                uuid = r.take(16)
            else:
                raise WireError(f"configuration: unknown subsection {name}")
        self._state = _S_TOP
        return Configuration(machine, caps, uuid, page_bits)

    def _top(self, r: Reader) -> object | None:
        kind = r.u8()
        if kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            section_id = r.be32()
            n = r.u8()
            if n == 0:
                raise WireError(f"Unable to read ID string for section {section_id}")
            idstr = decode_name(r.take(n), "section idstr")
            instance_id = r.be32()
            version_id = r.be32()
            body = self.bodies.get(idstr)
            if body is None or instance_id not in getattr(body, "instance_ids", (0,)):
                raise WireError(
                    f"Unknown savevm section or instance '{idstr}' {instance_id}. Make sure "
                    "that your current VM setup matches your saved VM setup, including "
                    "any hotplugged devices")
            if version_id > body.version_id:
                raise WireError(f"savevm: unsupported version {version_id} for "
                                f"'{idstr}' v{body.version_id}")
            section = Section(section_id, idstr, instance_id, version_id)
            body.begin(kind, section)
            self._sections[section_id] = section
            self._current = section
            self._state = _S_BODY
            cls = SectionStart if kind == QEMU_VM_SECTION_START else SectionFull
            return cls(section_id, idstr, instance_id, version_id)
        if kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
            section_id = r.be32()
            section = self._sections.get(section_id)
            if section is None:
                raise WireError(f"Unknown savevm section {section_id}")
            self.bodies[section.idstr].begin(kind, section)
            self._current = section
            self._state = _S_BODY
            cls = SectionPart if kind == QEMU_VM_SECTION_PART else SectionEnd
            return cls(section_id, section.idstr)
        if kind == QEMU_VM_COMMAND:
            return self._command(r)
        if kind == QEMU_VM_EOF:
            if self._packages:
                self._state = _S_SKIP
                self._packages[-1].skipping = True
                return None
            self._state = _S_AFTER_EOF
            return EOF()
        raise WireError(f"Unknown savevm section type {kind}")

    def _command(self, r: Reader) -> object:
        cmd = r.be16()
        length = r.be16()
        payload = r.take(length)
        _validate_command(cmd, payload)
        if cmd == MIG_CMD_PACKAGED:
            if len(self._packages) >= MAX_PACKAGE_DEPTH:
                raise WireError("PACKAGED commands nested too deeply")
            start = self._in.consumed + (r.pos - self._in.pos)
            self._packages.append(_Package(start + decode_packaged(payload)))
        elif cmd == MIG_CMD_POSTCOPY_RUN and self._packages:
            # QEMU stops parsing the package at RUN and drops what follows.
            self._state = _S_SKIP
            self._packages[-1].skipping = True
        return Command(cmd, payload)

    def _skip_package(self) -> object | None:
        buf = self._in
        pkg = self._packages[-1]
        left = pkg.end - buf.consumed
        if left:
            buf.need = 1
            if not buf.snapshot():
                if buf.closed:
                    raise WireError("migration stream truncated inside a PACKAGED blob")
                return None
            buf.advance(buf.pos + min(left, len(buf.data) - buf.pos))
            if pkg.end - buf.consumed:
                return None
        self._packages.pop()
        self._state = _S_TOP
        if self._packages and self._packages[-1].skipping:
            self._state = _S_SKIP
        return PackageEnd()

    def _body(self, r: Reader) -> object:
        section = self._current
        ev, done = self.bodies[section.idstr].decode(r)
        if done:
            self._state = _S_FOOTER
        return ev

    def _footer(self, r: Reader) -> object:
        section = self._current
        mark = r.u8()
        if mark != QEMU_VM_SECTION_FOOTER:
            raise WireError(f"Missing section footer for {section.idstr}")
        read_id = r.be32()
        if read_id != section.section_id:
            raise WireError(f"Mismatched section id in footer for {section.idstr} - "
                            f"read {read_id:#x} expected {section.section_id:#x}")
        self._state = _S_TOP
        self._current = None
        return SectionFooter(read_id)

    def _vmdesc(self, r: Reader) -> object:
        kind = r.u8()
        if kind != QEMU_VM_VMDESCRIPTION:
            raise WireError(f"Expected vmdescription section, but got {kind}")
        n = r.be32()
        if n > MAX_VMDESC:
            raise WireError(f"VM description of {n} bytes exceeds the {MAX_VMDESC} byte limit")
        text = r.take(n)
        self._state = _S_DONE
        return VMDescription(text)


def _subsections(r: Reader, parent: str):
    """Yield ``(name, version)`` for each subsection of ``parent`` that follows.

    Stops (leaving the bytes) at the first byte that does not start a
    subsection carrying the parent's name prefix, as QEMU's loader does.
    """
    prefix = parent.encode("ascii")
    while True:
        if r.peek_u8() != QEMU_VM_SUBSECTION:
            return
        n = r.peek_u8(1)
        if n < len(prefix) + 1:
            return
        r.need(2 + n)
        raw = r.buf[r.pos + 2:r.pos + 2 + n]
        if not raw.startswith(prefix):
            return
        r.skip(2 + n)
        version = r.be32()
        yield decode_name(raw, "subsection name"), version

