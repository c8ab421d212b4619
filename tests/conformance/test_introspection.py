"""query-commands and query-qmp-schema against the live QEMU 7.2.

QEMU has far more commands than vmigrate; the comparison is restricted to
what vmigrate's schema defines, and vmigrate may not announce anything QEMU
lacks except ``query-migrationthreads`` (QEMU 8.0's, served ahead of time).
Introspection masks type names with numbers that depend on the whole
schema, so entries are compared after replacing every type reference by the
structure it names.
"""

from __future__ import annotations

import pytest

from vmigrate.qapi.schema import load

SCHEMA = load()
EXTENSIONS = {"query-migrationthreads"}


@pytest.fixture(scope="module")
def introspection(pair):
    qemu, vm = pair.send({"execute": "query-qmp-schema"})
    return qemu["return"], vm["return"]


def test_query_commands(pair):
    qemu, vm = pair.send({"execute": "query-commands"})
    qemu_names = [c["name"] for c in qemu["return"]]
    vm_names = [c["name"] for c in vm["return"]]
    assert all(list(c) == ["name"] for c in vm["return"])
    assert len(vm_names) == len(set(vm_names))
    assert set(vm_names) == set(SCHEMA.command_names())
    assert set(vm_names) - set(qemu_names) == EXTENSIONS
    common = set(vm_names) & set(qemu_names)
    assert common == set(vm_names) - EXTENSIONS
    assert [n for n in vm_names if n in common] == [n for n in qemu_names if n in common]


def _resolver(entries: list[dict]):
    """``signature(name)``: an entry with every masked type name replaced by its structure."""
    by_name = {e["name"]: e for e in entries}

    def resolve(ref: str, stack: tuple = ()) -> list:
        if ref.startswith("["):
            return ["array", resolve(ref[1:-1], stack)]
        if ref in stack:
            return ["recursive", stack.index(ref)]
        entry = by_name[ref]
        stack += (ref,)
        meta, features = entry["meta-type"], entry.get("features", [])
        if meta == "builtin":
            return [meta, entry["name"], entry["json-type"]]
        if meta == "enum":
            return [meta, entry["values"], entry["members"], features]
        if meta == "array":
            return [meta, resolve(entry["element-type"], stack)]
        if meta == "alternate":
            return [meta, [resolve(m["type"], stack) for m in entry["members"]], features]
        assert meta == "object", entry
        members = [[m["name"], resolve(m["type"], stack), "default" in m, m.get("default"), m.get("features", []),
                    list(m)] for m in entry["members"]]
        variants = [[v["case"], resolve(v["type"], stack), list(v)] for v in entry.get("variants", [])]
        return [meta, members, entry.get("tag"), variants, features, list(entry)]

    def signature(name: str) -> dict:
        entry = by_name[name]
        sig = {k: v for k, v in entry.items() if k not in ("arg-type", "ret-type")}
        sig["keys"] = list(entry)
        for key in ("arg-type", "ret-type"):
            if key in entry:
                sig[key] = resolve(entry[key])
        return sig

    return by_name, signature


@pytest.mark.parametrize("meta", ["command", "event"])
def test_schema_entries(introspection, meta):
    qemu, vm = introspection
    qemu_by_name, qemu_sig = _resolver(qemu)
    _, vm_sig = _resolver(vm)
    names = [e["name"] for e in vm if e["meta-type"] == meta]
    assert names == (SCHEMA.command_names() if meta == "command" else SCHEMA.event_names())
    compared = [n for n in names if n in qemu_by_name]
    assert set(names) - set(compared) == (EXTENSIONS if meta == "command" else set())
    for name in compared:
        assert vm_sig(name) == qemu_sig(name), name
    assert compared == [e["name"] for e in qemu if e["name"] in set(compared)]


def test_schema_shape(introspection):
    _, vm = introspection
    metas = [e["meta-type"] for e in vm]
    first_type = next(i for i, m in enumerate(metas) if m not in ("command", "event"))
    assert set(metas[first_type:]) <= {"builtin", "enum", "array", "object", "alternate"}
    assert len({e["name"] for e in vm}) == len(vm)


def test_introspection_arguments(pair):
    pair.same("query-qmp-schema", {"x": 1})
    pair.same("query-commands", {"x": 1})
