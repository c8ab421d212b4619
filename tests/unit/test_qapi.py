"""The QAPI layer against behaviour recorded from the real QEMU 7.2 binary.

Vectors come from ``tools/record_qemu_qapi.py``: QEMU's ``query-qmp-schema``
reply, its answers to a few hundred argument cases, and real replies/events.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from vmigrate.qapi.keyorder import GKeySet, qdict_key_order
from vmigrate.qapi.reply_check import SchemaViolation
from vmigrate.qapi.schema import load
from vmigrate.qmp.errors import QMPError

VECTORS = Path(__file__).parent / "vectors"


def _json(name: str):
    path = VECTORS / name
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


ARG_CASES = _json("qemu72-qmp-args.json")["cases"]
REPLIES = _json("qemu72-qmp-replies.json")
QEMU_SCHEMA = _json("qemu72-qmp-schema.json.gz")


@pytest.fixture(scope="module")
def schema():
    return load()


def _check(schema, command, arguments):
    try:
        return schema.check_args(command, arguments), None
    except QMPError as e:
        assert e.cls == "GenericError"
        return None, e.desc


# -- arguments ------------------------------------------------------------------


@pytest.mark.parametrize("case", ARG_CASES, ids=lambda c: f"{c['execute']}:{json.dumps(c['arguments'])[:60]}")
def test_argument_check_matches_qemu(schema, case):
    normalised, error = _check(schema, case["execute"], case["arguments"])
    expected = case["reply"].get("error", {}).get("desc")
    assert error == expected
    for member, stored in case.get("stored", {}).items():
        if member.startswith("tls-") and stored == "":
            continue  # null -> "" is the parameter code's rewrite, not QAPI's
        assert normalised[member] == stored


@pytest.mark.parametrize(
    "command, arguments, desc",
    [
        ("migrate", {}, "Parameter 'uri' is missing"),
        ("migrate", {"bogus": 1}, "Parameter 'uri' is missing"),
        ("migrate", {"uri": 1}, "Invalid parameter type for 'uri', expected: string"),
        ("query-migrate", {"a": 1}, "Parameter 'a' is unexpected"),
        ("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle"}]},
         "Parameter 'capabilities[0].state' is missing"),
        ("migrate-set-capabilities", {"capabilities": [{"capability": "x", "state": True}]},
         "Parameter 'capability' does not accept value 'x'"),
        ("qmp_capabilities", {"enable": ["foo"]}, "Parameter 'null' does not accept value 'foo'"),
        ("migrate-set-parameters", {"compress-threads": -1}, "Parameter 'compress-threads' expects uint8_t"),
        ("migrate-set-parameters", {"x-checkpoint-delay": 1 << 32}, "Parameter 'x-checkpoint-delay' expects uint32_t"),
        ("migrate-set-parameters", {"compress-level": "1"}, "Parameter 'compress-level' expects uint64"),
        ("migrate-set-parameters", {"tls-authz": 1}, "Invalid parameter type for 'tls-authz', expected: StrOrNull"),
        ("yank", {"instances": [{"type": "chardev"}]}, "Parameter 'instances[0].id' is missing"),
        ("calc-dirty-rate", {"calc-time": 1 << 63}, "Invalid parameter type for 'calc-time', expected: integer"),
    ],
)
def test_argument_error_texts(schema, command, arguments, desc):
    with pytest.raises(QMPError) as info:
        schema.check_args(command, arguments)
    assert info.value.desc == desc


def test_arguments_are_normalised(schema):
    args = schema.check_args("migrate-set-parameters", {
        "max-bandwidth": -1, "tls-creds": None, "multifd-compression": "zstd",
        "block-bitmap-mapping": [{"node-name": "n", "alias": "a", "bitmaps": []}],
    })
    assert args == {
        "tls-creds": None, "max-bandwidth": (1 << 64) - 1, "multifd-compression": "zstd",
        "block-bitmap-mapping": [{"node-name": "n", "alias": "a", "bitmaps": []}],
    }
    assert schema.check_args("query-status", None) == {}
    assert schema.check_args("yank", {"instances": [{"id": "c", "type": "chardev"}]}) == {
        "instances": [{"type": "chardev", "id": "c"}]}


def test_unexpected_key_choice_needs_hash_table_emulation():
    """The recorded cases pin down GLib's order: naive JSON order disagrees."""
    cases = [c for c in ARG_CASES if c["execute"] == "query-status" and len(c["arguments"] or {}) > 1]
    reported = [c["reply"]["error"]["desc"].split("'")[1] for c in cases]
    assert [GKeySet(qdict_key_order(c["arguments"])).first() for c in cases] == reported
    assert sum(next(iter(c["arguments"])) != r for c, r in zip(cases, reported)) > len(cases) // 2


# -- replies and events -------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(REPLIES["replies"]))
def test_real_qemu_replies_conform(schema, command):
    for reply in REPLIES["replies"][command]:
        schema.check_return(command, reply)


def test_real_qemu_events_conform(schema):
    assert {e["event"] for e in REPLIES["events"]} >= {"STOP", "RESUME", "SHUTDOWN", "MIGRATION"}
    for event in REPLIES["events"]:
        schema.check_event(event["event"], event.get("data"))


def _completed_migration():
    return json.loads(json.dumps(REPLIES["replies"]["query-migrate"][-1]))


@pytest.mark.parametrize(
    "mutate, path",
    [
        (lambda r: r["ram"].pop("transferred"), "query-migrate: return.ram: missing mandatory member 'transferred'"),
        (lambda r: r["ram"].update(transferred="1"), "query-migrate: return.ram.transferred: expected int"),
        (lambda r: r["ram"].update(mbps=True), "query-migrate: return.ram.mbps: expected number"),
        (lambda r: r.update(status="running"), "query-migrate: return.status: 'running' is not a value"),
        (lambda r: r.update(bogus=1), "query-migrate: return: unexpected member 'bogus'"),
        (lambda r: r["ram"].update(**{"multifd-bytes": -1}), "query-migrate: return.ram.multifd-bytes: expected uint64"),
        (lambda r: r.update(**{"postcopy-vcpu-blocktime": [1 << 32]}),
         "query-migrate: return.postcopy-vcpu-blocktime[0]: expected uint32"),
        (lambda r: r.update(**{"socket-address": [{"type": "inet", "host": "h"}]}),
         "query-migrate: return.socket-address[0]: missing mandatory member 'port'"),
        (lambda r: r.update(**{"socket-address": [{"type": "fd", "str": "x", "path": "p"}]}),
         "query-migrate: return.socket-address[0]: unexpected member 'path'"),
    ],
)
def test_check_return_catches_bad_replies(schema, mutate, path):
    reply = _completed_migration()
    schema.check_return("query-migrate", reply)
    mutate(reply)
    with pytest.raises(SchemaViolation) as info:
        schema.check_return("query-migrate", reply)
    assert str(info.value).startswith(path)


def test_check_return_and_event_edge_cases(schema):
    schema.check_return("migrate", {})
    with pytest.raises(SchemaViolation):
        schema.check_return("migrate", {"x": 1})
    schema.check_return("query-migrate-parameters",
                        {**REPLIES["replies"]["query-migrate-parameters"][0], "tls-authz": "a"})
    with pytest.raises(SchemaViolation, match="tls-creds"):
        schema.check_return("query-migrate-parameters",
                            {**REPLIES["replies"]["query-migrate-parameters"][0], "tls-creds": None})
    schema.check_event("STOP", None)
    with pytest.raises(SchemaViolation, match="MIGRATION: data: missing mandatory member 'status'"):
        schema.check_event("MIGRATION", {})
    with pytest.raises(SchemaViolation, match="SHUTDOWN: data.reason"):
        schema.check_event("SHUTDOWN", {"guest": False, "reason": "bored"})


# -- introspection ------------------------------------------------------------------


def _resolver(entries):
    """Signatures with masked type names replaced by their structure."""
    by_name = {e["name"]: e for e in entries}

    def resolve(ref, stack=()):
        if ref.startswith("["):
            return ["array", resolve(ref[1:-1], stack)]
        e = by_name[ref]
        if ref in stack:
            return ["recursive", stack.index(ref)]
        stack += (ref,)
        meta, feats = e["meta-type"], e.get("features", [])
        if meta == "builtin":
            return [meta, e["name"], e["json-type"]]
        if meta == "enum":
            return [meta, e["values"], [m.get("features", []) for m in e["members"]], feats]
        if meta == "array":
            return [meta, resolve(e["element-type"], stack)]
        if meta == "alternate":
            return [meta, [resolve(m["type"], stack) for m in e["members"]], feats]
        assert meta == "object"
        members = [[m["name"], resolve(m["type"], stack), m.get("default", "mandatory"), m.get("features", [])]
                   for m in e["members"]]
        variants = [[v["case"], resolve(v["type"], stack)] for v in e.get("variants", [])]
        return [meta, members, e.get("tag"), variants, feats]

    def signature(name):
        e = by_name[name]
        sig = {k: v for k, v in e.items() if k not in ("arg-type", "ret-type")}
        sig["arg-type"] = resolve(e["arg-type"])
        if "ret-type" in e:
            sig["ret-type"] = resolve(e["ret-type"])
        return sig

    return by_name, signature


def test_commands_and_events_match_qemu_introspection(schema):
    ours = schema.introspect()
    theirs_by_name, theirs = _resolver(QEMU_SCHEMA)
    _, mine = _resolver(ours)
    names = [e["name"] for e in ours if e["meta-type"] in ("command", "event")]
    compared = [n for n in names if n in theirs_by_name]
    # query-migrationthreads is QEMU 8.0's; the seed (and vmigrate) has it.
    assert sorted(set(names) - set(compared)) == ["query-migrationthreads"]
    assert len(compared) == 69
    for name in compared:
        assert mine(name) == theirs(name), name
    qemu_order = [e["name"] for e in QEMU_SCHEMA if e["name"] in set(compared)]
    assert compared == qemu_order


def test_introspection_shape(schema):
    info = schema.introspect()
    schema.check_return("query-qmp-schema", info)
    metas = [e["meta-type"] for e in info]
    first_type = next(i for i, m in enumerate(metas) if m not in ("command", "event"))
    assert set(metas[first_type:]) <= {"builtin", "enum", "array", "object", "alternate"}
    assert len({e["name"] for e in info}) == len(info)
    by_name = {e["name"]: e for e in info}
    assert by_name["query-status"] == {"name": "query-status", "ret-type": "1", "meta-type": "command", "arg-type": "0"}
    assert by_name["0"] == {"name": "0", "members": [], "meta-type": "object"}
    assert by_name["yank"]["allow-oob"] is True
    assert by_name["x-colo-lost-heartbeat"]["features"] == ["unstable"]
    builtins = {e["name"] for e in info if e["meta-type"] == "builtin"}
    assert builtins == {"str", "int", "bool", "number", "null", "any"}
    for entry in info:
        assert list(entry) == qdict_key_order(sorted(entry))


def test_qdict_key_order_matches_qemu_serialisation():
    def dicts(value):
        if isinstance(value, dict):
            yield value
            for v in value.values():
                yield from dicts(v)
        elif isinstance(value, list):
            for v in value:
                yield from dicts(v)

    checked = 0
    for d in dicts(QEMU_SCHEMA):
        assert list(d) == qdict_key_order(sorted(d))
        checked += 1
    assert checked > 3000
    assert list(REPLIES["replies"]["query-version"][0]["qemu"]) == qdict_key_order(["major", "minor", "micro"])


# -- model ----------------------------------------------------------------------


def test_query_commands_order_follows_qemu(schema):
    ours = [c["name"] for c in schema.query_commands()]
    assert sorted(ours) == sorted(schema.command_names())
    qemu = [c["name"] for c in REPLIES["replies"]["query-commands"][0]]
    common = set(ours) & set(qemu)
    assert [n for n in ours if n in common] == [n for n in qemu if n in common]


def test_schema_lookups(schema):
    assert load() is schema
    caps = schema.enum_values("MigrationCapability")
    assert caps[0] == "xbzrle" and "x-colo" in caps and len(caps) == 21
    assert schema.enum_values("MultiFDCompression") == ["none", "zlib", "zstd"]
    params = [m.name for m in schema.members("MigrationParameters")]
    assert params == [m.name for m in schema.members("MigrateSetParameters")]
    delay = next(m for m in schema.members("MigrationParameters") if m.name == "x-checkpoint-delay")
    assert (delay.type, delay.optional, delay.features) == ("uint32", True, ("unstable",))
    migrate = schema.command("migrate")
    assert (migrate.arg_type, migrate.ret_type, migrate.allow_oob, migrate.boxed) == ("q_obj_migrate-arg", None, False, False)
    assert schema.command("migrate-set-parameters").boxed
    assert schema.command("migrate-pause").allow_oob
    assert schema.command("query-qmp-schema").ret_type == "[SchemaInfo]"
    assert schema.command("nosuch") is None
    assert schema.event("STOP").arg_type is None
    assert "query-migrationthreads" in schema.command_names()
    assert [m.name for m in schema.members("SocketAddress")] == ["type"]
    assert [m.name for m in schema.members("InetSocketAddress")][:3] == ["host", "port", "numeric"]
