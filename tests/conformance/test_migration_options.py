"""Migration capabilities and parameters, case by case against QEMU 7.2.

The parameter list and each parameter's probe values come from vmigrate's
schema (``MigrateSetParameters``) and the type of each member, never from a
hand-written list, so a parameter added to the schema is probed at once.
Cross-rule cases are derived from QEMU's own answers to the single-member
cases.
"""

from __future__ import annotations

import itertools

import pytest

from vmigrate.qapi.model import AlternateType, BuiltinType, EnumType
from vmigrate.qapi.schema import load

SCHEMA = load()
PARAMS = SCHEMA.members("MigrateSetParameters")
CAPS = SCHEMA.enum_values("MigrationCapability")

#: Deliberate, documented differences (vmigrate/migration/options.py module
#: docstring): QEMU 7.2 accepts and silently drops these two parameters in
#: migrate-set-parameters; vmigrate validates (0..9 / 0..20) and stores them.
DELIBERATE = {
    "multifd-zlib-level": ("validated 0..9 and stored, QEMU 7.2 drops it", 9),
    "multifd-zstd-level": ("validated 0..20 and stored, QEMU 7.2 drops it", 20),
}

INT_PROBES = [0, 1, 2, 9, 10, 20, 21, 99, 100, 101, 255, 256, 1000, 1001, 4095, 4096, 4097, 8192, 10000, 10001,
              100000, 100001, 2000000, 2000001, (1 << 32) - 1, 1 << 32, 1 << 53, (1 << 63) - 1, 1 << 63,
              (1 << 64) - 1, 1 << 64, -1, -5, -(1 << 63), -(1 << 63) - 1, 1.5, 1.0, "1", True, None, [], {}]
BOOL_PROBES = [True, False, 0, 1, "true", None, []]
STR_OR_NULL_PROBES = ["", "x", "tls0", "é", "a" * 300, None, 1, True, [], {}]
MAPPING_PROBES = [
    [], [{"node-name": "disk0", "alias": "a0", "bitmaps": []}],
    [{"node-name": "disk0", "alias": "a0", "bitmaps": [{"name": "b0", "alias": "x0"}]}],
    [{"node-name": "disk0", "alias": "0bad", "bitmaps": []}],
    [{"node-name": "disk0", "alias": "a" * 256, "bitmaps": []}],
    [{"node-name": "n" * 32, "alias": "a0", "bitmaps": []}],
    [{"node-name": "disk0", "alias": "a0", "bitmaps": []}, {"node-name": "disk0", "alias": "a1", "bitmaps": []}],
    [{"node-name": "disk0", "alias": "a0", "bitmaps": []}, {"node-name": "disk1", "alias": "a0", "bitmaps": []}],
    [{"node-name": "disk0", "alias": "a0", "bitmaps": [{"name": "b0", "alias": "x" * 256}]}],
    [{"node-name": "disk0", "alias": "a0", "bitmaps": [{"name": "b" * 1024, "alias": "x0"}]}],
    [{"node-name": "disk0", "alias": "a0", "bitmaps": [{"name": "b0", "alias": "x0"}, {"name": "b0", "alias": "x1"}]}],
    [{"node-name": "disk0", "alias": "a0", "bitmaps": [{"name": "b0", "alias": "x0"}, {"name": "b1", "alias": "x0"}]}],
    [{"node-name": "disk0", "alias": "a0"}], [{"node-name": "disk0", "bitmaps": []}],
    [{"node-name": "disk0", "alias": "a0", "bitmaps": [{"name": "b0"}]}],
    [{"node-name": "disk0", "alias": "a0", "bitmaps": [], "x": 1}],
    [{"node-name": "disk0", "alias": "a0", "bitmaps": [{"name": "b0", "alias": "x0", "transform": {}}]}],
    [{"node-name": "disk0", "alias": "a0", "bitmaps": [{"name": "b0", "alias": "x0",
                                                          "transform": {"persistent": True}}]}],
    None, {}, [1], "x",
]


def probes(member) -> list:
    """Probe values for one parameter, chosen by its schema type."""
    if member.type.startswith("["):
        return MAPPING_PROBES
    t = SCHEMA.type(member.type)
    if isinstance(t, EnumType):
        return [*t.values, "bogus", "", 1, None]
    if isinstance(t, AlternateType):
        return STR_OR_NULL_PROBES
    assert isinstance(t, BuiltinType), member
    if t.name == "bool":
        return BOOL_PROBES
    assert t.json_type == "int", member
    return INT_PROBES


SCALAR_PARAMS = [m for m in PARAMS if not m.type.startswith("[")]
LIST_PARAMS = [m for m in PARAMS if m.type.startswith("[")]


@pytest.fixture(scope="module")
def defaults(pair):
    reply = pair.same("query-migrate-parameters")["return"]
    return reply


def _reset(pair, defaults):
    pair.same("migrate-set-parameters", defaults)


# -- parameters -----------------------------------------------------------------------


def test_parameter_defaults(pair, defaults):
    assert set(defaults) == {m.name for m in PARAMS} - {"block-bitmap-mapping"}


@pytest.mark.parametrize("member", [m for m in SCALAR_PARAMS if m.name not in DELIBERATE], ids=lambda m: m.name)
def test_parameter_values(pair, defaults, member):
    for value in probes(member):
        reply = pair.same("migrate-set-parameters", {member.name: value})
        if "return" in reply:
            pair.same("query-migrate-parameters")
            _reset(pair, defaults)
    assert pair.same("query-migrate-parameters")["return"] == defaults


@pytest.mark.parametrize("member", DELIBERATE)
def test_deliberate_deviations(pair, defaults, member):
    """QEMU accepts anything and keeps the old value; vmigrate checks and stores."""
    _, top = DELIBERATE[member]
    rule = f"Parameter '{member.replace('-', '_')}' expects a value between 0 and {top}"
    for value in probes(next(m for m in PARAMS if m.name == member)):
        qemu, vm = pair.send({"execute": "migrate-set-parameters", "arguments": {member: value}})
        if "error" in qemu:
            assert vm == qemu, value
            continue
        assert qemu == {"return": {}}
        if value > top:
            assert vm == {"error": {"class": "GenericError", "desc": rule}}, value
        else:
            assert vm == {"return": {}}, value
            qemu, vm = pair.send({"execute": "query-migrate-parameters"})
            assert qemu["return"][member] == defaults[member]
            assert vm["return"] == {**qemu["return"], member: value}
            _reset(pair, defaults)


def _rule_errors(pair, defaults) -> dict[str, object]:
    """For each parameter, one value QEMU refuses with a range rule (not a type error)."""
    found = {}
    for member in SCALAR_PARAMS:
        if member.name in DELIBERATE:
            continue
        for value in probes(member):
            reply = pair.same("migrate-set-parameters", {member.name: value})
            if "return" in reply:
                _reset(pair, defaults)
            elif reply["error"]["desc"].startswith(f"Parameter '{member.name.replace('-', '_')}' expects"):
                found[member.name] = value
                break
    return found


def test_parameter_rule_order(pair, defaults):
    """Every pair of rule violations in one request: QEMU's check order decides which is reported."""
    bad = _rule_errors(pair, defaults)
    assert len(bad) >= 12, bad
    for (a, va), (b, vb) in itertools.combinations(bad.items(), 2):
        pair.same("migrate-set-parameters", {a: va, b: vb})
        pair.same("migrate-set-parameters", {b: vb, a: va})
    type_error = {"compress-threads": 256}
    for name, value in bad.items():
        pair.same("migrate-set-parameters", {name: value, **type_error})
        pair.same("migrate-set-parameters", {name: value, "bogus": 1})
    assert pair.same("query-migrate-parameters")["return"] == defaults


@pytest.mark.parametrize("steps", [
    [{"max-cpu-throttle": 50}, {"cpu-throttle-initial": 60}, {"cpu-throttle-initial": 60, "max-cpu-throttle": 70},
     {"max-cpu-throttle": 59}, {"cpu-throttle-initial": 99, "max-cpu-throttle": 99}, {"max-cpu-throttle": 100}],
    [{"compress-level": 9, "compress-threads": 0}, {"compress-level": 10, "compress-threads": 0},
     {"compress-level": 9, "compress-threads": 1}],
    [{"announce-initial": 100000, "announce-max": 1}, {"announce-step": 0}, {"announce-step": 10000}],
    [{"xbzrle-cache-size": 4096}, {"xbzrle-cache-size": 6144}, {"xbzrle-cache-size": 1 << 40}],
    [{"max-bandwidth": -1}, {"max-postcopy-bandwidth": -5}, {"downtime-limit": -1}, {"max-bandwidth": 0}],
    [{"tls-creds": None, "tls-hostname": None, "tls-authz": None}, {"tls-creds": "c", "tls-hostname": "h"},
     {"tls-authz": "z"}, {"tls-creds": "", "tls-authz": None}],
    [{}, {"bogus": 1, "zz": 2, "compress-level": 1}, {"a": 1, "b": 2, "c": 3, "d": 4}],
], ids=["throttle-coupling", "compress-order", "announce", "xbzrle-cache", "negative-sizes", "tls", "members"])
def test_parameter_sequences(pair, defaults, steps):
    for arguments in steps:
        pair.same("migrate-set-parameters", arguments)
        pair.same("query-migrate-parameters")
    _reset(pair, defaults)
    assert pair.same("query-migrate-parameters")["return"] == defaults


@pytest.mark.parametrize("member", LIST_PARAMS, ids=lambda m: m.name)
def test_list_parameter(fresh_pair, member):
    """Once set, a mapping can be replaced but not removed: a fresh pair of its own."""
    p = fresh_pair()
    for value in probes(member):
        p.same("migrate-set-parameters", {member.name: value})
        p.same("query-migrate-parameters")
        p.same("migrate-set-parameters", {"compress-level": 2})


# -- capabilities ------------------------------------------------------------------------


def _caps(**states: bool) -> dict:
    return {"capabilities": [{"capability": k, "state": v} for k, v in states.items()]}


ALL_OFF = {"capabilities": [{"capability": c, "state": False} for c in CAPS]}


def test_capability_defaults(pair):
    reply = pair.same("query-migrate-capabilities")["return"]
    assert [c["capability"] for c in reply] == CAPS and not any(c["state"] for c in reply)


@pytest.mark.parametrize("cap", CAPS)
def test_capability_alone(pair, cap):
    if "return" in pair.same("migrate-set-capabilities", _caps(**{cap: True})):
        pair.same("query-migrate-capabilities")
    pair.same("migrate-set-capabilities", _caps(**{cap: False}))
    pair.same("query-migrate-capabilities")


def test_capability_pairs(pair):
    for a, b in itertools.combinations(CAPS, 2):
        if "return" in pair.same("migrate-set-capabilities", _caps(**{a: True, b: True})):
            pair.same("migrate-set-capabilities", ALL_OFF)
    assert not any(c["state"] for c in pair.same("query-migrate-capabilities")["return"])


@pytest.mark.parametrize("steps", [
    # zero-copy-send needs multifd and rejects compression/xbzrle/TLS, also on later commands
    [("caps", {"multifd": True, "zero-copy-send": True}), ("caps", {"xbzrle": True}), ("caps", {"compress": True}),
     ("params", {"multifd-compression": "zlib"}), ("params", {"tls-creds": "x"}), ("params", {"compress-level": 3}),
     ("caps", {"multifd": False}), ("caps", {"zero-copy-send": False, "multifd": False})],
    [("params", {"multifd-compression": "zstd"}), ("caps", {"multifd": True, "zero-copy-send": True}),
     ("params", {"multifd-compression": "none"}), ("params", {"tls-creds": "t"}),
     ("caps", {"multifd": True, "zero-copy-send": True}), ("params", {"tls-creds": ""})],
    [("caps", {"postcopy-preempt": True}), ("caps", {"postcopy-ram": True, "postcopy-preempt": True, "compress": True}),
     ("caps", {"postcopy-ram": True, "postcopy-preempt": True}), ("caps", {"postcopy-ram": False}),
     ("caps", {"x-ignore-shared": True})],
    [("caps", {"background-snapshot": True, "events": True, "zero-blocks": True, "block": True,
               "x-ignore-shared": True})],
    [("raw", [{"capability": "xbzrle", "state": True},
                                                           {"capability": "xbzrle", "state": False}])],
], ids=["zero-copy", "zero-copy-params", "postcopy-preempt", "background-snapshot-allowed", "last-wins"])
def test_capability_sequences(pair, defaults, steps):
    for kind, arguments in steps:
        if kind == "caps":
            pair.same("migrate-set-capabilities", _caps(**arguments))
        elif kind == "raw":
            pair.same("migrate-set-capabilities", {"capabilities": arguments})
        else:
            pair.same("migrate-set-parameters", arguments)
        pair.same("query-migrate-capabilities")
        pair.same("query-migrate-parameters")
    pair.same("migrate-set-capabilities", ALL_OFF)
    _reset(pair, defaults)


CAPABILITY_ARGUMENT_ERRORS = [
    {}, {"capabilities": []}, {"capabilities": None}, {"capabilities": {}}, {"capabilities": [1]},
    {"capabilities": [{"capability": "foo", "state": True}]}, {"capabilities": [{"capability": "xbzrle"}]},
    {"capabilities": [{"state": True}]}, {"capabilities": [{"capability": "xbzrle", "state": 1}]},
    {"capabilities": [{"capability": "xbzrle", "state": True, "x": 1}]},
    {"capabilities": [{"capability": "xbzrle", "state": True}, {"capability": "x"}]},
    {"capabilities": [], "bogus": 1}, {"caps": []},
]


def test_capability_argument_errors(pair):
    for arguments in CAPABILITY_ARGUMENT_ERRORS:
        pair.same("migrate-set-capabilities", arguments)
    pair.same("query-migrate-capabilities", {"x": 1})
    pair.same("query-migrate-parameters", {"x": 1})


# -- on a destination -------------------------------------------------------------------------


def test_capabilities_on_destination(fresh_pair):
    """inmigrate: the postcopy host probe runs, and multifd follows the incoming transport."""
    p = fresh_pair(incoming="defer")
    for cap in CAPS:
        if "return" in p.same("migrate-set-capabilities", _caps(**{cap: True})):
            p.same("migrate-set-capabilities", ALL_OFF)
    p.same("migrate-set-capabilities", _caps(multifd=True))
    p.same("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    assert p.wait_events(["MIGRATION"]) == [("MIGRATION", {"status": "setup"})]
    p.same("migrate-set-capabilities", _caps(multifd=False))
    p.same("migrate-set-capabilities", _caps(multifd=True, **{"postcopy-ram": True}))
    p.same("query-migrate-capabilities")


def test_multifd_after_single_channel_incoming(fresh_pair):
    p = fresh_pair(incoming="defer")
    p.same("migrate-incoming", {"uri": "exec:sleep 30"})
    assert p.wait_events(["MIGRATION"]) == [("MIGRATION", {"status": "setup"})]
    p.same("migrate-set-capabilities", _caps(multifd=True))
    p.same("migrate-set-capabilities", _caps(xbzrle=True))
    p.same("query-migrate-capabilities")
