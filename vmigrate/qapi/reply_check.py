"""Checking that a reply or event payload conforms to its declared type.

QEMU never sends a value its generated output visitor could not produce, so
clients rely on it; tests run every vmigrate reply through this check to keep
handlers honest (a missing mandatory member, a stray member, an enum value
the schema lacks, an integer out of its type's range).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmigrate.qapi.model import AlternateType, BuiltinType, EnumType, ObjectType

if TYPE_CHECKING:
    from vmigrate.qapi.schema import Schema


class SchemaViolation(AssertionError):
    """A value that does not conform to the schema; the message names the path."""


_INT_RANGES = {
    "int": (-(1 << 63), (1 << 63) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
    "int8": (-(1 << 7), (1 << 7) - 1),
    "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint8": (0, (1 << 8) - 1),
    "uint16": (0, (1 << 16) - 1),
    "uint32": (0, (1 << 32) - 1),
    "uint64": (0, (1 << 64) - 1),
    "size": (0, (1 << 64) - 1),
}

# The builtins that accept exactly one JSON kind (alternates pick a branch
# by kind); ``str`` admits subclasses such as ``enum.StrEnum`` members.
_JSON_KIND = {"str": str, "bool": bool, "null": type(None)}


def _fail(path: str, problem: str) -> SchemaViolation:
    return SchemaViolation(f"{path}: {problem}")


def _builtin_ok(name: str, value: Any) -> bool:
    if name == "any":
        return True
    if name in _JSON_KIND:
        return isinstance(value, _JSON_KIND[name])
    if isinstance(value, bool):
        return False
    if name == "number":
        return isinstance(value, (int, float))
    low, high = _INT_RANGES[name]
    return isinstance(value, int) and low <= value <= high


def _accepts_kind(schema: Schema, ref: str, value: Any) -> bool:
    """Whether ``value``'s JSON kind selects branch ``ref`` of an alternate."""
    t = schema.type(ref)
    if isinstance(t, BuiltinType):
        if t.name in _JSON_KIND:
            return isinstance(value, _JSON_KIND[t.name])
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(t, EnumType):
        return isinstance(value, str)
    return isinstance(value, dict)


def check_value(schema: Schema, ref: str, value: Any, path: str) -> None:
    if ref.startswith("["):
        if not isinstance(value, list):
            raise _fail(path, f"expected an array of {ref[1:-1]}, got {value!r}")
        for i, item in enumerate(value):
            check_value(schema, ref[1:-1], item, f"{path}[{i}]")
        return
    t = schema.type(ref)
    if isinstance(t, BuiltinType):
        if not _builtin_ok(t.name, value):
            raise _fail(path, f"expected {t.name}, got {value!r}")
    elif isinstance(t, EnumType):
        if not isinstance(value, str) or value not in t.values:
            raise _fail(path, f"{value!r} is not a value of enum {t.name}")
    elif isinstance(t, ObjectType):
        if not isinstance(value, dict):
            raise _fail(path, f"expected object {t.name}, got {value!r}")
        seen = _check_members(schema, t, value, path)
        unknown = [k for k in value if k not in seen]
        if unknown:
            raise _fail(path, f"unexpected member {unknown[0]!r} for {t.name}")
    else:
        _check_alternate(schema, t, value, path)


def _check_members(schema: Schema, t: ObjectType, value: dict, path: str) -> set[str]:
    seen = set()
    for m in t.members:
        if m.name in value:
            check_value(schema, m.type, value[m.name], f"{path}.{m.name}")
            seen.add(m.name)
        elif not m.optional:
            raise _fail(path, f"missing mandatory member {m.name!r} of {t.name}")
    if t.tag is not None:
        branch = schema.type(t.variant(value[t.tag]))
        assert isinstance(branch, ObjectType)
        seen |= _check_members(schema, branch, value, path)
    return seen


def _check_alternate(schema: Schema, t: AlternateType, value: Any, path: str) -> None:
    for _, ref in t.branches:
        if _accepts_kind(schema, ref, value):
            check_value(schema, ref, value, path)
            return
    raise _fail(path, f"{value!r} matches no branch of alternate {t.name}")
