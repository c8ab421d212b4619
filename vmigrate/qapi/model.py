"""The resolved QAPI type model: what the schema files declare, after ``if``
conditions, bases and implicit types are resolved.

Plain data shared by the schema loader and the code that walks it (argument
checking, reply checking, introspection).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

EMPTY = "q_empty"

# Builtin types and the JSON type introspection reports for each.
BUILTIN_JSON_TYPES: dict[str, str] = {
    "str": "string",
    "number": "number",
    "int": "int",
    "int8": "int",
    "int16": "int",
    "int32": "int",
    "int64": "int",
    "uint8": "int",
    "uint16": "int",
    "uint32": "int",
    "uint64": "int",
    "size": "int",
    "bool": "boolean",
    "null": "null",
    "any": "value",
}


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    type: str
    optional: bool = False
    features: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BuiltinType:
    name: str

    @property
    def json_type(self) -> str:
        return BUILTIN_JSON_TYPES[self.name]


@dataclass(frozen=True, slots=True)
class EnumType:
    name: str
    values: tuple[str, ...]
    value_features: dict[str, tuple[str, ...]] = field(default_factory=dict)
    features: tuple[str, ...] = ()
    json_type = "string"


@dataclass(frozen=True, slots=True)
class ObjectType:
    """A struct, a union (``tag`` + ``variants``) or an implicit object.

    ``members`` is flattened: base members first, like QAPI's own model.
    ``variants`` covers every tag value; values without a branch map to
    ``q_empty``, as QAPI does.
    """

    name: str
    members: tuple[Member, ...]
    tag: str | None = None
    variants: tuple[tuple[str, str], ...] = ()
    features: tuple[str, ...] = ()
    json_type = "object"

    def variant(self, case: str) -> str:
        return dict(self.variants)[case]


@dataclass(frozen=True, slots=True)
class AlternateType:
    name: str
    branches: tuple[tuple[str, str], ...]
    features: tuple[str, ...] = ()
    json_type = "value"


TypeDef = Union[BuiltinType, EnumType, ObjectType, AlternateType]


@dataclass(frozen=True, slots=True)
class CommandDef:
    name: str
    arg_type: str | None
    ret_type: str | None
    boxed: bool = False
    allow_oob: bool = False
    allow_preconfig: bool = False
    success_response: bool = True
    features: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EventDef:
    name: str
    arg_type: str | None
    boxed: bool = False
    features: tuple[str, ...] = ()
