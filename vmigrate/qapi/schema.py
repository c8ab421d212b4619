"""The QAPI schema vmigrate serves, loaded from the JSON shipped in this package.

It is the single source of truth for command, event and type names: the QMP
server dispatches on it, argument checking and reply checking walk it, and
option code derives capability and parameter lists from it.  The files use
QAPI's own dialect (``struct``/``enum``/``union``/``alternate``/``command``/
``event``, ``*optional`` members, ``if`` conditions, ``features``) as plain
JSON; ``core.json`` is the top-level file and includes ``migration.json``.

Type references are strings: a type name, or ``"[T]"`` for an array of T.
Implicit types get QAPI's internal names (``q_obj_migrate-arg`` for a
command's inline arguments, ``q_obj_SocketAddress-base`` for a union's inline
base, ``q_empty`` for "no members").
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from vmigrate.qapi.input_visitor import visit_arguments
from vmigrate.qapi.introspect import schema_info
from vmigrate.qapi.model import (
    BUILTIN_JSON_TYPES,
    EMPTY,
    AlternateType,
    BuiltinType,
    CommandDef,
    EnumType,
    EventDef,
    Member,
    ObjectType,
    TypeDef,
)
from vmigrate.qapi.reply_check import check_value

# Truth of every ``if`` condition our schema files use: a standard Debian
# x86-64 Linux build (zstd, replication and MPTCP available).  A symbol not
# listed here is an error, so a new condition cannot be resolved by accident.
BUILD_CONFIG: dict[str, bool] = {
    "CONFIG_LINUX": True,
    "CONFIG_POSIX": True,
    "CONFIG_ZSTD": True,
    "CONFIG_REPLICATION": True,
    "HAVE_IPPROTO_MPTCP": True,
    "CONFIG_WIN32": False,
}


def condition_holds(cond: Any) -> bool:
    """Evaluate a QAPI ``if``: a symbol, or ``{"all"|"any": [...]}``/``{"not": c}``."""
    if cond is None:
        return True
    if isinstance(cond, str):
        if cond not in BUILD_CONFIG:
            raise ValueError(f"unknown build condition {cond!r}: add it to BUILD_CONFIG")
        return BUILD_CONFIG[cond]
    if "all" in cond:
        return all(condition_holds(c) for c in cond["all"])
    if "any" in cond:
        return any(condition_holds(c) for c in cond["any"])
    if "not" in cond:
        return not condition_holds(cond["not"])
    raise ValueError(f"malformed condition {cond!r}")


def _type_ref(ref: Any) -> str:
    if isinstance(ref, list):
        return f"[{ref[0]}]"
    return ref


def _features(raw: list | None) -> tuple[str, ...]:
    out = []
    for f in raw or ():
        if isinstance(f, str):
            out.append(f)
        elif condition_holds(f.get("if")):
            out.append(f["name"])
    return tuple(out)


def _members(data: dict) -> list[Member]:
    out = []
    for key, spec in data.items():
        if isinstance(spec, dict):
            if not condition_holds(spec.get("if")):
                continue
            typ, feats = _type_ref(spec["type"]), _features(spec.get("features"))
        else:
            typ, feats = _type_ref(spec), ()
        optional = key.startswith("*")
        out.append(Member(key[1:] if optional else key, typ, optional, feats))
    return out


def _branches(data: dict) -> list[tuple[str, str]]:
    out = []
    for case, spec in data.items():
        if isinstance(spec, dict):
            if not condition_holds(spec.get("if")):
                continue
            spec = spec["type"]
        out.append((case, _type_ref(spec)))
    return out


def _read(directory: Path, filename: str, seen: set[str]) -> list[dict]:
    """Definitions of ``filename`` with includes expanded in place (once each)."""
    seen.add(filename)
    out: list[dict] = []
    with open(directory / filename, encoding="utf-8") as f:
        for expr in json.load(f):
            if "include" in expr:
                if expr["include"] not in seen:
                    out.extend(_read(directory, expr["include"], seen))
            elif "pragma" not in expr:
                out.append(expr)
    return out


class Schema:
    """The resolved schema: types, commands and events by name."""

    def __init__(self, exprs: list[dict]) -> None:
        self._types: dict[str, TypeDef] = {n: BuiltinType(n) for n in BUILTIN_JSON_TYPES}
        self._types[EMPTY] = ObjectType(EMPTY, ())
        self._commands: dict[str, CommandDef] = {}
        self._events: dict[str, EventDef] = {}
        # Entities in definition order: what introspection walks first.
        self.entities: list[CommandDef | EventDef] = []
        self._raw_objects: dict[str, dict] = {}
        for expr in exprs:
            if condition_holds(expr.get("if")):
                self._define(expr)
        for name in list(self._raw_objects):
            self._resolve_object(name)
        self._check_references()

    # -- construction -------------------------------------------------------

    def _define(self, expr: dict) -> None:
        feats = _features(expr.get("features"))
        if "enum" in expr:
            values, vfeats = [], {}
            for v in expr["data"]:
                if isinstance(v, str):
                    values.append(v)
                elif condition_holds(v.get("if")):
                    values.append(v["name"])
                    if v.get("features"):
                        vfeats[v["name"]] = _features(v["features"])
            self._add_type(EnumType(expr["enum"], tuple(values), vfeats, feats))
        elif "struct" in expr:
            self._raw_objects[expr["struct"]] = expr
        elif "union" in expr:
            base = expr["base"]
            if isinstance(base, dict):
                base_name = f"q_obj_{expr['union']}-base"
                self._raw_objects[base_name] = {"struct": base_name, "data": base}
                expr = {**expr, "base": base_name}
            self._raw_objects[expr["union"]] = expr
        elif "alternate" in expr:
            self._add_type(AlternateType(expr["alternate"], tuple(_branches(expr["data"])), feats))
        elif "command" in expr:
            name = expr["command"]
            cmd = CommandDef(
                name,
                self._arg_type(name, expr.get("data")),
                _type_ref(expr["returns"]) if "returns" in expr else None,
                boxed=expr.get("boxed", False),
                allow_oob=expr.get("allow-oob", False),
                allow_preconfig=expr.get("allow-preconfig", False),
                success_response=expr.get("success-response", True),
                features=feats,
            )
            self._commands[name] = cmd
            self.entities.append(cmd)
        elif "event" in expr:
            name = expr["event"]
            ev = EventDef(name, self._arg_type(name, expr.get("data")), expr.get("boxed", False), feats)
            self._events[name] = ev
            self.entities.append(ev)
        else:
            raise ValueError(f"unknown schema expression {expr!r}")

    def _arg_type(self, owner: str, data: Any) -> str | None:
        if data is None:
            return None
        if isinstance(data, str):
            return data
        name = f"q_obj_{owner}-arg"
        self._raw_objects[name] = {"struct": name, "data": data}
        return name

    def _add_type(self, t: TypeDef) -> None:
        if t.name in self._types:
            raise ValueError(f"type {t.name} defined twice")
        self._types[t.name] = t

    def _resolve_object(self, name: str) -> ObjectType:
        done = self._types.get(name)
        if done is not None:
            assert isinstance(done, ObjectType)
            return done
        expr = self._raw_objects[name]
        members: list[Member] = []
        if "base" in expr:
            members.extend(self._resolve_object(expr["base"]).members)
        tag, variants = None, ()
        if "union" in expr:
            tag = expr["discriminator"]
            branches = _branches(expr["data"])
            tag_type = next(m.type for m in members if m.name == tag)
            covered = {case for case, _ in branches}
            enum = self._types[tag_type]
            assert isinstance(enum, EnumType)
            branches += [(v, EMPTY) for v in enum.values if v not in covered]
            variants = tuple(branches)
        else:
            members.extend(_members(expr.get("data", {})))
        obj = ObjectType(name, tuple(members), tag, variants, _features(expr.get("features")))
        self._types[name] = obj
        return obj

    def _check_references(self) -> None:
        refs: list[str] = []
        for t in self._types.values():
            if isinstance(t, ObjectType):
                refs += [m.type for m in t.members] + [v for _, v in t.variants]
            elif isinstance(t, AlternateType):
                refs += [b for _, b in t.branches]
        for c in self._commands.values():
            refs += [r for r in (c.arg_type, c.ret_type) if r]
        refs += [e.arg_type for e in self._events.values() if e.arg_type]
        for ref in refs:
            self.type(ref)

    # -- lookup ---------------------------------------------------------------

    def type(self, ref: str) -> TypeDef:
        """The definition behind a type reference (for ``[T]``: T's)."""
        name = ref[1:-1] if ref.startswith("[") else ref
        try:
            return self._types[name]
        except KeyError:
            raise KeyError(f"type {name!r} is not in the schema") from None

    def command(self, name: str) -> CommandDef | None:
        return self._commands.get(name)

    def command_names(self) -> list[str]:
        return list(self._commands)

    def event(self, name: str) -> EventDef | None:
        return self._events.get(name)

    def event_names(self) -> list[str]:
        return list(self._events)

    def enum_values(self, name: str) -> list[str]:
        t = self.type(name)
        if not isinstance(t, EnumType):
            raise TypeError(f"{name} is not an enum")
        return list(t.values)

    def members(self, name: str) -> list[Member]:
        """Members of an object type (a union's common members only)."""
        t = self.type(name)
        if not isinstance(t, ObjectType):
            raise TypeError(f"{name} is not an object type")
        return list(t.members)

    # -- behaviour --------------------------------------------------------------

    def check_args(self, name: str, args: dict | None) -> dict:
        """Check a command's ``arguments`` exactly as QEMU 7.2 does; return
        them normalised (QEMU's stored integer values, floats for numbers).
        Raises ``QMPError`` with QEMU's text on the first problem."""
        cmd = self._commands[name]
        return visit_arguments(self, cmd.arg_type, {} if args is None else args)

    def check_return(self, name: str, value: Any) -> None:
        """Raise ``SchemaViolation`` if ``value`` is not a valid reply of
        command ``name`` (``{}`` for commands without a return type)."""
        cmd = self._commands[name]
        check_value(self, cmd.ret_type or EMPTY, value, f"{name}: return")

    def check_event(self, name: str, data: dict | None) -> None:
        """Raise ``SchemaViolation`` if ``data`` is not valid for event
        ``name``; ``None`` stands for an omitted ``data`` member."""
        ev = self._events[name]
        check_value(self, ev.arg_type or EMPTY, {} if data is None else data, f"{name}: data")

    def introspect(self) -> list[dict]:
        """The ``query-qmp-schema`` reply (SchemaInfo list) for this schema."""
        return schema_info(self)

    def query_commands(self) -> list[dict]:
        """The ``query-commands`` reply: QEMU lists the newest registration
        first, and registers commands in schema order."""
        return [{"name": n} for n in reversed(self._commands)]


@lru_cache(maxsize=None)
def load() -> Schema:
    directory = Path(__file__).parent
    return Schema(_read(directory, "core.json", set()))
