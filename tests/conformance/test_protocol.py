"""The QMP protocol itself: greeting, negotiation, request shapes, JSON, OOB.

Everything here is a byte-level exchange on a fresh monitor connection of a
shared pair (QEMU allows one client per monitor, so connections are opened
one at a time), plus a few requests through the library's negotiated
connection.  None of it changes VM state.
"""

from __future__ import annotations

import json

import pytest
from harness import count

NEGOTIATE = {"execute": "qmp_capabilities"}
NEGOTIATE_OOB = {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}


def test_greeting(pair):
    with pair.raw() as raw:
        greeting = raw.monitors[0].greeting
    assert greeting["QMP"]["capabilities"] == ["oob"]
    assert list(greeting["QMP"]) == ["version", "capabilities"]


# -- negotiation ------------------------------------------------------------------

NEGOTIATION_SEQUENCES = {
    "commands-before-negotiation": [
        {"execute": "query-status"},
        {"execute": "query-status", "id": 1},
        {"execute": "nosuch", "id": "x"},
        {"execute": "quit", "id": [1, {"a": None}]},
        {"execute": "query-migrate", "arguments": {"bogus": 1}},
        {"execute": "migrate-set-capabilities", "arguments": {}},
        {"execute": "query-qmp-schema"},
        NEGOTIATE,
        {"execute": "query-name", "id": 2},
    ],
    "shape-errors-before-negotiation": [
        {"execute": 1}, {"foo": 1}, {}, {"id": 5}, {"execute": "query-status", "arguments": []},
        {"exec-oob": "migrate-pause", "id": 1}, {"execute": "qmp_capabilities", "exec-oob": "qmp_capabilities"},
        NEGOTIATE,
    ],
    "negotiate-twice": [NEGOTIATE, NEGOTIATE, {**NEGOTIATE, "id": 7}, NEGOTIATE_OOB],
    "negotiate-oob-then-again": [NEGOTIATE_OOB, NEGOTIATE_OOB, {"exec-oob": "qmp_capabilities", "id": "o"}],
    "oob-duplicates": [{"execute": "qmp_capabilities", "arguments": {"enable": ["oob", "oob"]}},
                       {"exec-oob": "migrate-pause", "id": 1}],
    "empty-enable": [{"execute": "qmp_capabilities", "arguments": {"enable": []}},
                     {"exec-oob": "migrate-pause", "id": 1}],
    "bad-capabilities": [
        {"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}},
        {"execute": "qmp_capabilities", "arguments": {"enable": ["oob", "foo"]}},
        {"execute": "qmp_capabilities", "arguments": {"enable": ["OOB"]}},
        {"execute": "qmp_capabilities", "arguments": {"enable": "oob"}},
        {"execute": "qmp_capabilities", "arguments": {"enable": [1]}},
        {"execute": "qmp_capabilities", "arguments": {"enable": None}},
        {"execute": "qmp_capabilities", "arguments": {"bogus": []}},
        {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"], "bogus": 1}},
        {"exec-oob": "qmp_capabilities", "id": 1},
        # still not negotiated after all of those:
        {"execute": "query-status", "id": "still"},
        NEGOTIATE,
        {"execute": "query-status", "id": "now"},
    ],
    "exec-oob-without-oob": [
        NEGOTIATE,
        {"exec-oob": "migrate-pause", "id": 1},
        {"exec-oob": "query-status"},
        {"execute": "migrate-pause", "exec-oob": "migrate-pause"},
    ],
}


@pytest.mark.parametrize("sequence", NEGOTIATION_SEQUENCES.values(), ids=NEGOTIATION_SEQUENCES.keys())
def test_negotiation(pair, sequence):
    with pair.raw() as raw:
        for message in sequence:
            answers = raw.same(message)
            assert len(answers) == 1


# -- request shapes ------------------------------------------------------------------

REQUEST_SHAPES = [
    {"execute": 1}, {"execute": None}, {"execute": ["query-status"]}, {"execute": {"a": 1}}, {"execute": True},
    {"foo": 1}, {"foo": 1, "bar": 2}, {"execute": "query-status", "foo": 1},
    {"a": 1, "b": 2, "c": 3, "execute": "query-status"}, {"zz": 1, "execute": 2, "arguments": 3},
    {"execute": "query-status", "arguments": []}, {"execute": "query-status", "arguments": None},
    {"execute": "query-status", "arguments": "x"}, {"execute": "query-status", "arguments": 0},
    {}, {"id": "x"}, {"arguments": {}}, {"arguments": {}, "id": 3},
    {"execute": "x", "exec-oob": "y"}, {"exec-oob": "y", "execute": "x"}, {"exec-oob": 1, "id": 1},
    {"exec-oob": "migrate-pause"}, {"exec-oob": "migrate-pause", "id": None},
    {"execute": "query-status", "arguments": {}}, {"execute": "query-status", "id": None},
    {"execute": "query-status", "control": {"run-oob": True}},
    [1, 2], [], "query-status", 42, -1.5, None, True, False,
]

IDS = [0, -1, 1 << 63, 18446744073709551615, 1.25, 0.1, 1e300, 1e-5, -0.0, 100000.0, "", "a b", "é✓", "\x7f",
       "😀", "\x00", "tab\t\"q\"\\", [], [1, [2]], {}, {"a": {"b": [None, True]}}, {"z": 1, "a": 2, "m": 3},
       None, True, False]


@pytest.fixture
def negotiated(pair):
    with pair.raw() as raw:
        assert raw.same(NEGOTIATE_OOB) == [{"return": {}}]
        yield raw


def test_request_shapes(negotiated):
    for message in REQUEST_SHAPES:
        negotiated.same(message)


def test_id_echo(negotiated):
    for ident in IDS:
        negotiated.same({"execute": "query-name", "id": ident})
        negotiated.same({"execute": "nosuch", "id": ident})
        negotiated.same({"execute": "query-migrate", "arguments": {"x": 1}, "id": ident})
        negotiated.same({"foo": 1, "id": ident})


def test_request_shapes_through_library(pair):
    for message in [{"execute": "query-status", "foo": 1}, {"execute": "query-status", "arguments": []},
                    {"id": "lacks-execute"}, {"execute": "query-status", "id": "ok"}, {"execute": 7, "id": "n"}]:
        qemu, vm = pair.send(message)
        assert vm == qemu, (message, qemu, vm)


# -- JSON parsing ---------------------------------------------------------------------

MALFORMED = [
    b"}", b"]", b":", b",", b"{}}", b"[]]",
    b'{"execute"}', b'{"execute":}', b'{"execute" "query-status"}', b"{,}", b'{"execute": "query-status",}',
    b'{"execute": "query-status" "id": 1}', b"[1,]", b"[1 2]", b"{1: 2}", b"{null: 2}", b'{"a": 1, "a": 2}',
    b'{"execute": "query-status", "execute": "query-name"}',
    b'{"execute": tru}', b'{"execute": nul}', b'{"execute": True}', b"{'execute': 'query-name', 'id': 'sq'}",
    b"{'execute': \"query-name\", \"id\": 'mixed'}", b"{'execute': 'query-name', 'id': 'it\\'s'}",
    b'{"execute": "query-\\u0073tatus"}', b'{"execute": "query-status", "id": "\\ud83d\\ude00"}',
    b'{"execute": "query-status", "id": "\\ud800"}', b'{"execute": "query-status", "id": "\\u0000"}',
    b'{"execute": "query-status", "id": "\\udc00x"}', b'{"execute": "query-status", "id": "\\u12"}',
    b'{"execute": "query-status", "id": "\\q"}', b'{"execute": "query-status", "id": "\\/"}',
    b'{"execute": "query-status", "id": "\xff"}', b'{"execute": "query-status", "id": "\xc3\xa9"}',
    b'{"execute": "query-status", "id": "\xc3"}', b'{"execute": "query-status", "id": "\xed\xa0\x80"}',
    b'{"execute": "query-status", "id": "tab\there"}', b'{"execute": "query-status", "id": "\x01"}',
    b'{"execute": "query-status", "id": 01}', b'{"execute": "query-status", "id": 1.}',
    b'{"execute": "query-status", "id": -}', b'{"execute": "query-status", "id": 1e}',
    b'{"execute": "query-status", "id": 1e5}', b'{"execute": "query-status", "id": -0}',
    b'{"execute": "query-status", "id": 1E+2}', b'{"execute": "query-status", "id": .5}',
    b'{"execute": "query-status", "id": 18446744073709551616}',
    b'{"execute": "query-status", "id": -9223372036854775809}',
    b'{"execute": "query-status", "id": 123456789012345678901234567890}',
    b'{"execute": "query-status", "id": 0x10}', b'{"execute": "query-status", "id": +1}',
    b'{"execute": "query-status", "id": 1e5}', b'{"execute": "query-status", "id": 0.1}',
    b'{"execute": "query-status", "id": "\xc0\x80"}', b'{"execute": "query-status", "id": "\xef\xbf\xbf"}',
    b'{"execute": "query-status", "id": "\\ufdd0"}', b'{"execute": "query-status", "id": "\\udbff\\udfff"}',
    b'{"execute": "query-status", "id": "\\ud83d"}', b'{"execute": "query-status", "id": "\\ud83d\\u0041"}',
    b'{"execute": "query-status", "id": "\xf8\x88\x80\x80\x80"}', b'{"execute": "query-status", "id": "\xe0\x80\xaf"}',
    b'{"execute": "query-status", "id": "\xe2\x82\x01"}', b'\xc3\x01', b'"abc\xe2\x82\x01"', b'"\\u1"',
    b'{"execute": "query-status", "id": "\x7f\\u007f"}', b"'\x01'", b'"a\x00b"',
    b"@", b"#", b"\x00", b"\xff", b"{\"execute\": \"query-status\"} @ {\"execute\": \"query-name\"}",
    b"42", b'"str"', b"null", b"true", b"[]", b"{}", b"  \t\r\n  ",
    b'{"execute": "query-status"}{"execute": "query-name"}{"execute": "nosuch", "id": 1}',
    b'{"execute": "query-status"} [1] "x" {"execute": "query-name"}',
    b'{"execute":\n"query-status",\n"id":\n"multi-line"}',
    b'{"execute": "query-status", "arguments": {"a": [1, {"b": [2, {"c": 3}]}]}}',
    b"[" * 1025 + b"]" * 1025, b"[" * 1024 + b"]" * 1024, b"{\"a\":" * 1100 + b"1" + b"}" * 1100,
    b'{"execute": "query-status", "id": "' + b"x" * 100000 + b'"}',
    b'{"execute": "query-name", "id": ' + b"[" * 400 + b"]" * 400 + b"}",
    b'{"execute": "query-name", "id": ' + b'{"a": ' * 400 + b"{}" + b"}" * 400 + b"}",
]


@pytest.mark.parametrize("data", MALFORMED, ids=[repr(d[:40]) for d in MALFORMED])
def test_malformed_json(negotiated, data):
    negotiated.same(data)


def test_malformed_json_before_negotiation(pair):
    with pair.raw() as raw:
        for data in MALFORMED[:20]:
            raw.same(data)
        raw.same(NEGOTIATE)


@pytest.mark.parametrize("first, rest", [
    (b'{"execute": "query-', b'status", "id": "split-string"}'),
    (b'{"execute": "query-status"', b', "id": "split-object"}'),
    (b'{"execute": "query-status", "arguments": {', b"}}"),
    (b'[{"execute"', b": 1}]"),
    (b'{"execute": "query-status", "id": 12', b"34}"),
    (b'{"execute": "query-status", "id": "\\u00', b'e9"}'),
    (b'{"execute": "query-status", "id": "\xc3', b'\xa9"}'),
    (b'{"execute": "query-status", "id": tr', b"ue}"),
    (b'{"execute": "query-status", "id": "line\n', b'"}'),
])
def test_partial_objects(negotiated, first, rest):
    negotiated.send(first)
    negotiated.same(rest)


# -- out-of-band ---------------------------------------------------------------------

OOB_REQUESTS = [
    {"exec-oob": "migrate-pause", "id": "p"},
    {"exec-oob": "migrate-pause"},
    {"exec-oob": "migrate-recover", "arguments": {"uri": "tcp:127.0.0.1:1"}, "id": "r"},
    {"exec-oob": "migrate-recover", "id": "r2"},
    {"exec-oob": "migrate-recover", "arguments": {"uri": 1}, "id": "r3"},
    {"exec-oob": "migrate-pause", "arguments": {"x": 1}, "id": "p2"},
    {"exec-oob": "query-status", "id": "s"},
    {"exec-oob": "migrate_cancel", "id": "c"},
    {"exec-oob": "nosuch", "id": "n"},
    {"exec-oob": "qmp_capabilities", "id": "q"},
    {"exec-oob": "migrate-pause", "arguments": [], "id": "a"},
    {"exec-oob": "migrate-pause", "execute": "migrate-pause", "id": "both"},
    {"execute": "migrate-pause", "id": "inband"},
]


def test_oob_through_library(pair):
    for message in OOB_REQUESTS:
        qemu, vm = pair.send(message)
        assert vm == qemu, (message, qemu, vm)


def test_oob_raw(negotiated):
    for message in OOB_REQUESTS:
        negotiated.same(message)


def test_oob_may_overtake(negotiated):
    """An OOB reply may come before an earlier in-band one (QEMU decides by timing), never the in-band order."""
    data = (b'{"exec-oob": "migrate-pause", "id": 1}{"execute": "query-status", "id": 2}'
            b'{"exec-oob": "migrate-pause", "id": 3}{"execute": "query-name", "id": 4}')
    answers = [m.exchange(data) for m in negotiated.monitors]
    count()
    by_id = [sorted(a, key=lambda lm: lm[1]["id"]) for a in answers]
    assert by_id[1] == by_id[0]
    for a in answers:
        assert [m["id"] for _, m in a if m["id"] in (2, 4)] == [2, 4]


# -- unknown and removed commands --------------------------------------------------------

UNKNOWN = ["migrate_set_speed", "migrate_set_downtime", "migrate-set-cache-size", "query-migrate-cache-size",
           "migrate_set_capability", "migrate_set_parameter", "info", "nosuch", "", " query-status",
           "QUERY-STATUS", "query_status", "query-status\n", "x" * 300, "é"]


@pytest.mark.parametrize("name", UNKNOWN, ids=[json.dumps(n)[:30] for n in UNKNOWN])
def test_unknown_commands(pair, name):
    pair.same(name)
    pair.same(name, {"value": 1})
    pair.same(name, [])
    pair.same(name, id="unknown")
