"""The order of object members in what QEMU 7.2 sends on a monitor.

QEMU builds every reply and event as a QDict and serialises it in the
QDict's bucket order (:func:`~vmigrate.qapi.keyorder.qdict_key_order`), which
depends on the order the members were inserted: schema member order for
values produced by the QAPI output visitor, text order for values QEMU parsed
(an echoed ``id``), and a fixed sequence for the envelopes.  Reproducing it
lets clients that compare bytes, or print replies, see QEMU's output.

Ordering is applied exactly once, to values built in any order: the schema,
not the handler's dict, decides the insertion order.
"""

from __future__ import annotations

from typing import Any

from vmigrate.qapi.keyorder import qdict_key_order
from vmigrate.qapi.model import AlternateType, ObjectType
from vmigrate.qapi.schema import Schema


def qdict(pairs: list[tuple[str, Any]]) -> dict:
    """A dict whose iteration order is QEMU's for members inserted in this order."""
    values = dict(pairs)
    return {k: values[k] for k in qdict_key_order([k for k, _ in pairs])}


def _shell(value: Any) -> Any:
    if isinstance(value, dict):
        return {}
    if isinstance(value, list):
        return []
    return value


def parsed_order(value: Any) -> Any:
    """A value QEMU parsed from JSON text and sends back (the request ``id``).

    Iterative: a parsed value may nest 1024 levels deep.
    """
    root = _shell(value)
    work = [(value, root)] if root is not value else []
    while work:
        source, copy = work.pop()
        if isinstance(source, dict):
            items = [(k, source[k]) for k in qdict_key_order(source)]
        else:
            items = list(enumerate(source))
        for key, child in items:
            shell = _shell(child)
            if isinstance(copy, dict):
                copy[key] = shell
            else:
                copy.append(shell)
            if shell is not child:
                work.append((child, shell))
    return root


def output_order(schema: Schema, ref: str, value: Any) -> Any:
    """A value of schema type ``ref`` as QEMU's output visitor would lay it out.

    Members the type does not declare keep their place after the declared
    ones (the reply checker reports them; reordering must not hide them).
    """
    if ref.startswith("["):
        if not isinstance(value, list):
            return value
        return [output_order(schema, ref[1:-1], v) for v in value]
    t = schema.type(ref)
    if isinstance(t, AlternateType):
        if isinstance(value, dict):
            for _, branch in t.branches:
                if isinstance(schema.type(branch), ObjectType):
                    return output_order(schema, branch, value)
        return value
    if not isinstance(t, ObjectType) or not isinstance(value, dict):
        return value
    members = list(t.members)
    if t.tag is not None and value.get(t.tag) in dict(t.variants):
        branch = schema.type(t.variant(value[t.tag]))
        assert isinstance(branch, ObjectType)
        members += branch.members
    declared = [(m.name, output_order(schema, m.type, value[m.name])) for m in members if m.name in value]
    names = {m.name for m in members}
    ordered = qdict(declared)
    ordered.update((k, v) for k, v in value.items() if k not in names)
    return ordered
