"""The QMP JSON splitter: independent of how input is cut, and QEMU's limits to the byte.

The lexer scans runs of bytes with regular expressions (vmigrate/qmp/jsonstream.py),
so a run may be cut anywhere by a read; every cut must give the answers one
read gives.  The limits' boundaries follow qobject/json-streamer.c and
qobject/json-lexer.c (docs/qmp-limits.md).
"""

from __future__ import annotations

import random

import pytest

from vmigrate.qmp.errors import QMPError
from vmigrate.qmp.jsonstream import MAX_TOKEN_SIZE, JSONMessageStream

INPUTS = [
    b'{"execute": "query-status", "id": "a\\"b\\\\c\\u00e9\\n"}',
    b"{'execute': 'query-name', 'id': 'it\\'s \"q\"'}",
    b'{"id": [1, -0, 2.5e+3, 0.1, 1E5, -12, true, false, null]} 42 "s" @ #x {"a": 1}',
    b'"abc\xe2\x82\x01" \xc3\x01 "\xc3\xa9\xef\xbf\xbf" [01] [1.] [-] {"a": tru} nul',
    b'"line\nbreak" ]] }} {"execute": "query-status"}\t\r\n{"x": "\\q"}',
    b"[" * 1030 + b"]" * 1030 + b' {"execute": "x"}',
]


def results(stream: JSONMessageStream, pieces: list[bytes]) -> list:
    out = []
    for piece in pieces:
        out += [(type(r).__name__, str(r)) if isinstance(r, QMPError) else r for r in stream.feed(piece)]
    return out


@pytest.mark.parametrize("data", INPUTS, ids=range(len(INPUTS)))
def test_any_cut_gives_the_same_messages(data):
    whole = results(JSONMessageStream(), [data])
    assert whole == results(JSONMessageStream(), [data[i:i + 1] for i in range(len(data))])
    rng = random.Random(data)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(data)), min(5, len(data) - 1)))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        assert results(JSONMessageStream(), pieces) == whole


def test_largest_string_message():
    """A message's tokens may total MAX_TOKEN_SIZE - 1 bytes (json-streamer.c counts a NUL)."""
    stream = JSONMessageStream()
    assert stream.feed(b'"' + b"x" * (MAX_TOKEN_SIZE - 3) + b'"') == ["x" * (MAX_TOKEN_SIZE - 3)]
    assert stream.buffered() == 0
    answers = stream.feed(b'"' + b"x" * (MAX_TOKEN_SIZE - 2) + b'" 7 ')
    assert [str(a) for a in answers] == ["JSON token size limit exceeded", "7"]


def test_token_cut_at_limit_across_reads():
    """The lexer's cap counts the whole token, however many reads brought it."""
    stream = JSONMessageStream()
    chunk = b"x" * (1 << 20)
    assert stream.feed(b'{"id": "') == []
    for _ in range(63):
        assert stream.feed(chunk) == []
    assert stream.buffered() == 6 + 1 + (63 << 20)
    answers = stream.feed(chunk + b'yz"}')
    assert [str(a) for a in answers] == ["JSON token size limit exceeded", "JSON parse error, invalid keyword 'yz'"]
    assert stream.buffered() == 2  # the '"}' that opened a new string

