"""The ``query-qmp-schema`` reply, rendered the way QEMU 7.2 renders its own.

QEMU lists every command and event in schema order, then every type they use,
in order of first use (a breadth-first work queue).  Type names other than
builtins and arrays are masked as decimal strings numbered by first mention;
every integer type is shown as ``int``; optional members carry
``"default": null``; union branches without members point at the empty object
type.  Object keys come out in QDict order, so a serialiser that keeps dict
order produces QEMU's bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmigrate.qapi.keyorder import qdict_key_order
from vmigrate.qapi.model import (
    BUILTIN_JSON_TYPES,
    EMPTY,
    AlternateType,
    BuiltinType,
    CommandDef,
    EnumType,
    ObjectType,
)

if TYPE_CHECKING:
    from vmigrate.qapi.schema import Schema


def _qdict(obj: dict[str, Any]) -> dict[str, Any]:
    """Reorder like QEMU's QLIT conversion: keys inserted sorted, read in
    QDict bucket order."""
    return {k: obj[k] for k in qdict_key_order(sorted(obj))}


class _Renderer:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.used: list[str] = []
        self.masks: dict[str, str] = {}
        self.out: list[dict] = []

    def mask(self, name: str) -> str:
        return self.masks.setdefault(name, str(len(self.masks)))

    def json_type(self, ref: str) -> str:
        if ref.startswith("["):
            return "array"
        t = self.schema.type(ref)
        return t.json_type

    def use(self, ref: str) -> str:
        if ref.startswith("["):
            if self.json_type(ref[1:-1]) == "int":
                ref = "[int]"
        elif self.json_type(ref) == "int":
            ref = "int"
        if ref not in self.used:
            self.used.append(ref)
        if ref.startswith("["):
            return "[" + self.use(ref[1:-1]) + "]"
        if ref in BUILTIN_JSON_TYPES:
            return ref
        return self.mask(ref)

    def emit(self, name: str, meta: str, obj: dict, features: tuple[str, ...] = ()) -> None:
        if meta not in ("command", "event", "builtin", "array"):
            name = self.mask(name)
        obj["name"] = name
        obj["meta-type"] = meta
        if features:
            obj["features"] = list(features)
        self.out.append(_qdict(obj))

    def entity(self, ent) -> None:
        if isinstance(ent, CommandDef):
            obj = {"arg-type": self.use(ent.arg_type or EMPTY), "ret-type": self.use(ent.ret_type or EMPTY)}
            if ent.allow_oob:
                obj["allow-oob"] = True
            self.emit(ent.name, "command", obj, ent.features)
        else:
            self.emit(ent.name, "event", {"arg-type": self.use(ent.arg_type or EMPTY)}, ent.features)

    def type_entry(self, ref: str) -> None:
        if ref.startswith("["):
            element = self.use(ref[1:-1])
            self.emit("[" + element + "]", "array", {"element-type": element})
            return
        t = self.schema.type(ref)
        if isinstance(t, BuiltinType):
            self.emit(t.name, "builtin", {"json-type": t.json_type})
        elif isinstance(t, EnumType):
            members = []
            for v in t.values:
                member = {"name": v}
                if t.value_features.get(v):
                    member["features"] = list(t.value_features[v])
                members.append(_qdict(member))
            self.emit(t.name, "enum", {"members": members, "values": list(t.values)}, t.features)
        elif isinstance(t, ObjectType):
            members = []
            for m in t.members:
                member: dict[str, Any] = {"name": m.name, "type": self.use(m.type)}
                if m.optional:
                    member["default"] = None
                if m.features:
                    member["features"] = list(m.features)
                members.append(_qdict(member))
            obj: dict[str, Any] = {"members": members}
            if t.tag is not None:
                obj["tag"] = t.tag
                obj["variants"] = [_qdict({"case": c, "type": self.use(r)}) for c, r in t.variants]
            self.emit(t.name, "object", obj, t.features)
        else:
            assert isinstance(t, AlternateType)
            members = [_qdict({"type": self.use(r)}) for _, r in t.branches]
            self.emit(t.name, "alternate", {"members": members}, t.features)


def schema_info(schema: Schema) -> list[dict]:
    renderer = _Renderer(schema)
    for ent in schema.entities:
        renderer.entity(ent)
    i = 0
    while i < len(renderer.used):
        renderer.type_entry(renderer.used[i])
        i += 1
    return renderer.out
