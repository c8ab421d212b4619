"""ctypes structures as flat VMState fields and plain values, in both directions.

A KVM state structure becomes one VMState field per integer member, named
by its path (``cs.selector``, ``xcrs[0].value``), so a vCPU section reads
like QEMU's in ``vmigrate analyze`` and the field list is derived from the
ABI definition instead of being written out again.  Padding and reserved
members are left out (they load as zero); long byte arrays become one
``buffer`` field.
"""

from __future__ import annotations

import ctypes
from typing import Any, Iterator

from vmigrate.migration.wire.vmstate import Field

_INT_TYPES: dict[type, str] = {
    ctypes.c_uint8: "uint8", ctypes.c_uint16: "uint16", ctypes.c_uint32: "uint32",
    ctypes.c_uint64: "uint64", ctypes.c_int64: "int64",
}
#: Byte arrays longer than this travel as one opaque buffer.
_BUFFER_MIN = 16


def _members(ctype: type, prefix: str) -> Iterator[tuple[str, str, type]]:
    """(path, member name, member type) of the members worth carrying, in layout order."""
    for name, member, *_ in ctype._fields_:
        if name.startswith(("pad", "reserved")):
            continue
        yield f"{prefix}{name}", name, member


def fields_of(ctype: type, prefix: str = "") -> list[Field]:
    fields: list[Field] = []
    for path, _, member in _members(ctype, prefix):
        if issubclass(member, ctypes.Structure):
            fields += fields_of(member, f"{path}.")
        elif issubclass(member, ctypes.Array):
            elem = member._type_
            if issubclass(elem, ctypes.Structure):
                for i in range(member._length_):
                    fields += fields_of(elem, f"{path}[{i}].")
            elif elem is ctypes.c_uint8 and member._length_ > _BUFFER_MIN:
                fields.append(Field(path, "buffer", member._length_))
            else:
                fields.append(Field(path, _INT_TYPES[elem], ctypes.sizeof(elem), count=member._length_))
        else:
            fields.append(Field(path, _INT_TYPES[member], ctypes.sizeof(member)))
    return fields


def values_of(obj: ctypes.Structure, prefix: str = "") -> dict[str, Any]:
    values: dict[str, Any] = {}
    for path, name, member in _members(type(obj), prefix):
        value = getattr(obj, name)
        if issubclass(member, ctypes.Structure):
            values.update(values_of(value, f"{path}."))
        elif issubclass(member, ctypes.Array):
            if issubclass(member._type_, ctypes.Structure):
                for i, item in enumerate(value):
                    values.update(values_of(item, f"{path}[{i}]."))
            elif member._type_ is ctypes.c_uint8 and member._length_ > _BUFFER_MIN:
                values[path] = bytes(value)
            else:
                values[path] = list(value)
        else:
            values[path] = value
    return values


def load_into(obj: ctypes.Structure, values: dict[str, Any], prefix: str = "") -> ctypes.Structure:
    """Set *obj*'s members from flat *values* (missing paths keep their value); returns *obj*."""
    for path, name, member in _members(type(obj), prefix):
        if issubclass(member, ctypes.Structure):
            load_into(getattr(obj, name), values, f"{path}.")
        elif issubclass(member, ctypes.Array) and issubclass(member._type_, ctypes.Structure):
            for i, item in enumerate(getattr(obj, name)):
                load_into(item, values, f"{path}[{i}].")
        elif path in values:
            value = values[path]
            if issubclass(member, ctypes.Array):
                target = getattr(obj, name)
                ctypes.memmove(target, bytes(value) if isinstance(value, (bytes, bytearray)) else
                               (member._type_ * member._length_)(*value), ctypes.sizeof(member))
            else:
                setattr(obj, name, value)
    return obj


def from_nested(ctype: type, nested: dict[str, Any]) -> ctypes.Structure:
    """A structure from nested dicts (``{"cs": {"selector": 0x23}}``), other members zero."""
    return load_into(ctype(), flatten(nested))


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
