"""VMState device sections as data (spec: docs/qemu/stream.md §7 and §9).

A device section is described by a :class:`Description` - a small list of
:class:`Field` (name, VMStateInfo type, size) plus optional subsections -
exactly the information QEMU's vmdesc JSON carries.  The same description
drives encoding, decoding (:class:`VMStateBodyDecoder`) and the vmdesc, so a
new device (CPU state, UART) is added as data::

    UART = Description("serial", 3, (Field("divider", "uint16", 2), ...))

Device state values are plain dicts: field name -> int / bytes / list of
ints (arrays); a present subsection appears under its full name
(``"timer/icount"``) as a nested dict.  Missing values encode as zero.

A source emits its device sections and the description with::

    devices = [DeviceSection(0, "timer", 0, TIMER, {...}),
               DeviceSection(4, "globalstate", 0, GLOBALSTATE, {"runstate": "running"})]
    out = b"".join(d.encode() for d in devices) + eof() + vmdesc(vmdesc_json(devices))
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from vmigrate.migration.wire.buffer import Reader, decode_name
from vmigrate.migration.wire.errors import WireError
from vmigrate.migration.wire.stream import (
    QEMU_VM_SUBSECTION, Section, section_full, subsection_header,
)

#: struct formats of the scalar VMStateInfo types (all big-endian).
SCALAR_FORMATS: dict[str, str] = {
    "bool": ">B", "int8": ">b", "uint8": ">B", "int16": ">h", "uint16": ">H",
    "int32": ">i", "uint32": ">I", "int64": ">q", "uint64": ">Q",
    "timer": ">q",          # expire time in ns, -1 when not armed
}
#: Opaque byte types: ``buffer`` carries data, ``unused_buffer`` is zeros ignored on load.
BYTE_TYPES = ("buffer", "unused_buffer")


@dataclass(frozen=True, slots=True)
class Field:
    """One VMState field: ``size`` bytes per element, ``count`` elements."""

    name: str
    type: str
    size: int
    version_id: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.type in SCALAR_FORMATS:
            if struct.calcsize(SCALAR_FORMATS[self.type]) != self.size:
                raise ValueError(f"{self.name}: {self.type} is not {self.size} bytes")
        elif self.type not in BYTE_TYPES:
            raise ValueError(f"{self.name}: unsupported VMState type {self.type}")


@dataclass(frozen=True, slots=True)
class Description:
    """A VMStateDescription: fields, subsections, and the load-time check.

    ``check`` runs on the decoded values (QEMU's post_load) and raises
    WireError to refuse them.
    """

    name: str
    version_id: int
    fields: tuple[Field, ...]
    subsections: tuple["Description", ...] = ()
    minimum_version_id: int = 0
    check: Callable[[dict], None] | None = None


def _default(f: Field) -> Any:
    if f.type in BYTE_TYPES:
        return bytes(f.size)
    return 0 if f.count == 1 else [0] * f.count


def _encode_field(f: Field, value: Any) -> bytes:
    if f.type in BYTE_TYPES:
        raw = bytes(f.size) if f.type == "unused_buffer" else bytes(value)
        if len(raw) != f.size * f.count:
            raise ValueError(f"{f.name}: expected {f.size * f.count} bytes, got {len(raw)}")
        return raw
    fmt = SCALAR_FORMATS[f.type]
    if f.count == 1:
        return struct.pack(fmt, int(value))
    if len(value) != f.count:
        raise ValueError(f"{f.name}: expected {f.count} elements")
    return struct.pack(">" + fmt[1] * f.count, *(int(v) for v in value))


def encode_state(desc: Description, values: Mapping[str, Any],
                 version_id: int | None = None) -> bytes:
    """The wire body of ``values``: fields, then the subsections present in it."""
    version = desc.version_id if version_id is None else version_id
    out = []
    for f in desc.fields:
        if f.version_id <= version:
            out.append(_encode_field(f, values.get(f.name, _default(f))))
    for sub in desc.subsections:
        if sub.name in values:
            out.append(subsection_header(sub.name, sub.version_id))
            out.append(encode_state(sub, values[sub.name]))
    return b"".join(out)


def _decode_field(f: Field, r: Reader) -> Any:
    if f.type in BYTE_TYPES:
        return r.take(f.size * f.count)
    fmt = SCALAR_FORMATS[f.type]
    raw = r.take(f.size * f.count)
    if f.count == 1:
        v = struct.unpack(fmt, raw)[0]
        return bool(v) if f.type == "bool" else v
    return list(struct.unpack(">" + fmt[1] * f.count, raw))


def decode_state(desc: Description, r: Reader, version_id: int) -> dict:
    """Parse one description's body (raising Short if incomplete)."""
    if version_id > desc.version_id:
        raise WireError(f"{desc.name}: incoming version_id {version_id} is too new "
                        f"for local version_id {desc.version_id}")
    if version_id < desc.minimum_version_id:
        raise WireError(f"{desc.name}: incoming version_id {version_id} is too old "
                        f"for local minimum version_id  {desc.minimum_version_id}")
    values: dict[str, Any] = {}
    for f in desc.fields:
        if f.version_id <= version_id:
            values[f.name] = _decode_field(f, r)
    prefix = desc.name.encode("ascii")
    while r.peek_u8() == QEMU_VM_SUBSECTION:
        n = r.peek_u8(1)
        if n < len(prefix) + 1:
            break
        r.need(2 + n)
        raw = r.buf[r.pos + 2:r.pos + 2 + n]
        if not raw.startswith(prefix):
            break
        name = decode_name(raw, "subsection name")
        sub = next((s for s in desc.subsections if s.name == name), None)
        if sub is None:
            raise WireError(f"{desc.name}: unknown subsection {name}")
        if name in values:
            raise WireError(f"{desc.name}: subsection {name} repeated")
        r.skip(2 + n)
        values[name] = decode_state(sub, r, r.be32())
    if desc.check is not None:
        desc.check(values)
    return values


# -- device sections -----------------------------------------------------------

@dataclass(frozen=True, slots=True, eq=False)
class DeviceState:
    """A decoded device section body."""

    idstr: str
    instance_id: int
    version_id: int
    vmsd_name: str
    values: dict


@dataclass
class VMStateBodyDecoder:
    """Body decoder for FULL sections described by ``description``."""

    description: Description
    instance_ids: frozenset[int] = frozenset({0})
    _section: Section | None = field(default=None, init=False, repr=False)

    @property
    def version_id(self) -> int:
        return self.description.version_id

    def begin(self, kind: int, section: Section) -> None:
        self._section = section

    def decode(self, r: Reader) -> tuple[object, bool]:
        s = self._section
        values = decode_state(self.description, r, s.version_id)
        return DeviceState(s.idstr, s.instance_id, s.version_id,
                           self.description.name, values), True


@dataclass(frozen=True, slots=True, eq=False)
class DeviceSection:
    """One device's FULL section as a source writes it."""

    section_id: int
    idstr: str
    instance_id: int
    description: Description
    values: Mapping[str, Any]

    def body(self) -> bytes:
        return encode_state(self.description, self.values)

    def encode(self) -> bytes:
        return section_full(self.section_id, self.idstr, self.instance_id,
                            self.description.version_id, self.body())


# -- vmdesc --------------------------------------------------------------------

def _json_str(s: str) -> str:
    """A JSON string escaped the way QEMU's JSONWriter does it."""
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return f'"{s}"'  # nothing to escape: every name QEMU and we use (this runs in the downtime)
    out = ['"']
    for ch in s:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json(value: Any) -> str:
    """QEMU's compact JSON layout: ``", "`` between items, ``": "`` after keys."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_json_str(k)}: {_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_json(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return _json_str(value)


def _desc_fields(desc: Description, values: Mapping[str, Any], version: int) -> dict:
    names = [f.name for f in desc.fields]
    fields = []
    for f in desc.fields:
        if f.version_id > version:
            continue
        name = f.name
        if names.count(name) > 1:
            same = [g for g in desc.fields if g.name == name]
            name = f"{name}[{same.index(f)}]"
        entry: dict[str, Any] = {"name": name}
        if f.count > 1:
            entry["array_len"] = f.count
        entry["type"] = f.type
        entry["size"] = f.size
        fields.append(entry)
    out: dict[str, Any] = {"vmsd_name": desc.name, "version": version, "fields": fields}
    subs = [_desc_fields(s, values[s.name], s.version_id)
            for s in desc.subsections if s.name in values]
    if subs:
        out["subsections"] = subs
    return out


def vmdesc_json(devices: Iterable[DeviceSection], page_size: int = 4096) -> bytes:
    """The VM description QEMU appends after EOF, byte-identical to QEMU's."""
    entries = []
    for d in devices:
        entry: dict[str, Any] = {"name": d.idstr, "instance_id": d.instance_id}
        entry.update(_desc_fields(d.description, d.values, d.description.version_id))
        entries.append(entry)
    return _json({"page_size": page_size, "devices": entries}).encode("ascii")


def description_from_vmdesc(entry: Mapping[str, Any]) -> Description:
    """A Description able to decode a section as the vmdesc JSON describes it.

    Lets inspection tools walk devices they have no built-in description
    for: struct and other composite fields are kept as opaque bytes of the
    size the vmdesc reports.  Old-style sections (top-level "size") become a
    single buffer.
    """
    fields = []
    for f in entry.get("fields", ()):
        size = int(f["size"])
        count = int(f.get("array_len", 1))
        ftype = f.get("type", "buffer")
        if ftype not in SCALAR_FORMATS or struct.calcsize(SCALAR_FORMATS[ftype]) != size:
            size, count, ftype = size * count, 1, "buffer"
        fields.append(Field(f["name"], ftype, size, count=count))
    subs = tuple(description_from_vmdesc(s) for s in entry.get("subsections", ()))
    return Description(entry["vmsd_name"] if "vmsd_name" in entry else entry["name"],
                       int(entry.get("version", entry.get("version_id", 0))),
                       tuple(fields), subs)
