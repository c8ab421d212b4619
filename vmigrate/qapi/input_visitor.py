"""Command-argument checking with the observable behaviour of QEMU 7.2's
QObject input visitor and generated QAPI visitors.

Clients see the *first* error QEMU hits, so the walk follows QEMU's order:
members in declaration order (base first, then the union branch chosen by the
tag), each checked where it is read; unknown members only after all declared
ones, reporting the first key left in GLib's hash table of unvisited keys.
The texts and their naming quirks are QEMU's:

* most errors name the full path (``capabilities[0].state``);
* enum values, alternates and ranged integers (``uint8``, ``uint32``...) name
  only the member itself, or ``null`` for a list element;
* ``uint64``/``size`` accept negative numbers and store them modulo 2**64.

QEMU's JSON parser keeps integers in int64 or uint64 and turns anything
larger into a float; Python integers are classified the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmigrate.qapi.keyorder import GKeySet, qdict_key_order
from vmigrate.qapi.model import AlternateType, BuiltinType, EnumType, ObjectType
from vmigrate.qmp.errors import QMPError

if TYPE_CHECKING:
    from vmigrate.qapi.schema import Schema

_INT64 = (-(1 << 63), (1 << 63) - 1)
_U64 = 1 << 64
_MISSING = object()

_SIGNED = {"int8": 8, "int16": 16, "int32": 32}
_UNSIGNED = {"uint8": 8, "uint16": 16, "uint32": 32}

# QObject type of each JSON value kind, as alternates dispatch on it.
_QTYPE_OF_BUILTIN = {
    "str": "string", "number": "num", "bool": "bool", "null": "null",
    **{t: "num" for t in ("int", "int8", "int16", "int32", "int64",
                          "uint8", "uint16", "uint32", "uint64", "size")},
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _qtype(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "num"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "dict"
    return "list"


class _Frame:
    """An object or array being visited: QEMU's StackObject."""

    __slots__ = ("name", "value", "unvisited", "index", "next")

    def __init__(self, name: str | None, value: dict | list) -> None:
        self.name = name
        self.value = value
        self.unvisited = GKeySet(qdict_key_order(value)) if isinstance(value, dict) else None
        self.index = -1
        self.next = 0


class _Visitor:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.stack: list[_Frame] = []

    # -- naming and access ----------------------------------------------------

    def full_name(self, name: str | None) -> str:
        path = ""
        for frame in reversed(self.stack):
            if isinstance(frame.value, dict):
                path = "." + (name or "<anonymous>") + path
            else:
                path = f"[{frame.index & 0xFFFFFFFF}]" + path
            name = frame.name
        if name:
            return name + path
        if path.startswith("."):
            return path[1:]
        return path or "<anonymous>"

    def get(self, name: str | None, consume: bool = True) -> Any:
        top = self.stack[-1]
        value = _MISSING
        if isinstance(top.value, dict):
            if name in top.value:
                value = top.value[name]
                if consume:
                    top.unvisited.discard(name)
        else:
            if top.next < len(top.value):
                value = top.value[top.next]
                if consume:
                    top.next += 1
            if consume:
                top.index += 1
        if value is _MISSING:
            raise QMPError(f"Parameter '{self.full_name(name)}' is missing")
        return value

    def type_error(self, name: str | None, expected: str) -> QMPError:
        return QMPError(f"Invalid parameter type for '{self.full_name(name)}', expected: {expected}")

    # -- types ------------------------------------------------------------------

    def visit(self, ref: str, name: str | None) -> Any:
        if ref.startswith("["):
            return self.visit_list(ref[1:-1], name)
        t = self.schema.type(ref)
        if isinstance(t, BuiltinType):
            return self.visit_builtin(t.name, name)
        if isinstance(t, EnumType):
            value = self.visit_builtin("str", name)
            if value not in t.values:
                raise QMPError(f"Parameter '{name or 'null'}' does not accept value '{value}'")
            return value
        if isinstance(t, ObjectType):
            return self.visit_object(t, name)
        return self.visit_alternate(t, name)

    def visit_object(self, t: ObjectType, name: str | None) -> dict:
        value = self.get(name)
        if not isinstance(value, dict):
            raise self.type_error(name, "object")
        self.stack.append(_Frame(name, value))
        out = self.visit_members(t)
        self.check_struct()
        self.stack.pop()
        return out

    def check_struct(self) -> None:
        leftover = self.stack[-1].unvisited.first()
        if leftover is not None:
            raise QMPError(f"Parameter '{self.full_name(leftover)}' is unexpected")

    def visit_members(self, t: ObjectType) -> dict:
        present = self.stack[-1].value
        out = {}
        for m in t.members:
            if not m.optional or m.name in present:
                out[m.name] = self.visit(m.type, m.name)
        if t.tag is not None:
            branch = self.schema.type(t.variant(out[t.tag]))
            out.update(self.visit_members(branch))
        return out

    def visit_list(self, element: str, name: str | None) -> list:
        value = self.get(name)
        if not isinstance(value, list):
            raise self.type_error(name, "array")
        self.stack.append(_Frame(name, value))
        out = [self.visit(element, None) for _ in range(len(value))]
        self.stack.pop()
        return out

    def visit_alternate(self, t: AlternateType, name: str | None) -> Any:
        qtype = _qtype(self.get(name, consume=False))
        for _, ref in t.branches:
            branch = self.schema.type(ref)
            if isinstance(branch, BuiltinType):
                accepts = _QTYPE_OF_BUILTIN[branch.name]
            else:
                accepts = "string" if isinstance(branch, EnumType) else "dict"
            if accepts == qtype:
                return self.visit(ref, name)
        raise QMPError(f"Invalid parameter type for '{name or 'null'}', expected: {t.name}")

    def visit_builtin(self, tname: str, name: str | None) -> Any:
        value = self.get(name)
        if tname == "str":
            if not isinstance(value, str):
                raise self.type_error(name, "string")
        elif tname == "bool":
            if not isinstance(value, bool):
                raise self.type_error(name, "boolean")
        elif tname == "null":
            if value is not None:
                raise self.type_error(name, "null")
        elif tname == "number":
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise self.type_error(name, "number")
            return _to_float(value)
        elif tname in ("int", "int64") or tname in _SIGNED:
            if not _is_int(value) or not _INT64[0] <= value <= _INT64[1]:
                raise self.type_error(name, "integer")
            bits = _SIGNED.get(tname)
            if bits and not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
                raise QMPError(f"Parameter '{name or 'null'}' expects {tname}_t")
        elif tname in ("uint64", "size") or tname in _UNSIGNED:
            if not _is_int(value) or not _INT64[0] <= value < _U64:
                raise QMPError(f"Parameter '{self.full_name(name)}' expects uint64")
            value %= _U64
            bits = _UNSIGNED.get(tname)
            if bits and value >= 1 << bits:
                raise QMPError(f"Parameter '{name or 'null'}' expects {tname}_t")
        return value


def _to_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


def visit_arguments(schema: Schema, arg_type: str | None, args: Any) -> dict:
    """Check ``args`` against the command's argument type (``None``: no
    arguments allowed) and return them normalised."""
    visitor = _Visitor(schema)
    if not isinstance(args, dict):
        raise visitor.type_error(None, "object")
    visitor.stack.append(_Frame(None, args))
    out = visitor.visit_members(schema.type(arg_type)) if arg_type else {}
    visitor.check_struct()
    return out
