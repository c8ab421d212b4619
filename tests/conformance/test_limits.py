"""QEMU's bounds on one QMP message, and what reaching them may cost the other monitors.

QEMU 7.2 caps a message at 64 MiB of token text, 2 Mi tokens and 1024
levels of nesting (qobject/json-streamer.c, qobject/json-lexer.c); see
docs/qmp-limits.md.  QEMU reads a monitor a byte at a time (about 4 µs a
byte here), so the limits reachable with a few MiB are compared with QEMU
directly, while the 64 MiB token limit (six minutes of QEMU's time) is
checked on vmigrate alone, against the answers QEMU 7.2 gave to the same
bytes in a one-off run recorded in docs/qmp-limits.md.  The rest is what
vmigrate promises beyond QEMU: a huge message does not stall the other
monitors nor keep its memory, and a burst of connections is served.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from harness import RAW_TIMEOUT, RawPair

from vmigrate.qmp.jsonstream import MAX_TOKEN_SIZE

NEGOTIATE = b'{"execute": "qmp_capabilities"}\n'


def send_big(raw: RawPair, data: bytes, timeout: float = 120.0) -> None:
    """Send ``data`` to both monitors at once; QEMU takes seconds per MiB to read it."""
    def send(monitor) -> None:
        monitor.client.sock.settimeout(timeout)
        try:
            monitor.send(data)
        finally:
            monitor.client.sock.settimeout(RAW_TIMEOUT)

    threads = [threading.Thread(target=send, args=(m,)) for m in raw.monitors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- compared with QEMU ---------------------------------------------------------------

def test_token_count_limit(pair):
    """Token 2 Mi + 1 is refused, the message dropped, and what follows lexed afresh."""
    with pair.raw() as raw:
        send_big(raw, b"[" + b"1," * (1 << 20) + b"]")
        answers = raw.same(b"")
    assert answers[0]["error"]["desc"] == "JSON token count limit exceeded"


NESTING = [
    b"[" * 1024 + b"]" * 1024 + b'{"execute": "query-name"}',
    b'{"a": ' * 512 + b"[" * 513 + b"]" * 513 + b"}" * 512,
    b'{"execute": "query-name", "id": ' + b"[{\"a\": " * 512 + b"1" + b"}]" * 512 + b"}",
]


@pytest.mark.parametrize("data", NESTING, ids=["1024-then-request", "1025-mixed", "1025-in-id"])
def test_nesting_limit(pair, data):
    with pair.raw() as raw:
        raw.same(data)


#: Messages well under the limits whose answers could quote them: QEMU echoes
#: an id, an unknown command's name and a stray token whole, never a member
#: name or value it refuses.
ECHO_SIZE = 256 << 10
ECHOES = {
    "stray-after-long-string": b'{"execute": "query-name", "id": "' + b"x" * ECHO_SIZE + b'\x01"}',
    "unknown-command": b'{"execute": "' + b"x" * ECHO_SIZE + b'"}',
    "bogus-member": b'{"execute": "query-name", "bogus": "' + b"x" * ECHO_SIZE + b'"}',
    "bogus-member-name": b'{"execute": "query-name", "' + b"x" * ECHO_SIZE + b'": 1}',
    "id": b'{"execute": "query-name", "id": "' + b"x" * ECHO_SIZE + b'"}',
}


@pytest.mark.parametrize("data", ECHOES.values(), ids=ECHOES.keys())
def test_large_message_echo(pair, data):
    with pair.raw() as raw:
        raw.same(NEGOTIATE)
        send_big(raw, data)
        raw.same(b"")


# -- vmigrate alone ----------------------------------------------------------------------

def vmigrate_monitor(pair) -> socket.socket:
    """A raw, un-negotiated connection to vmigrate's second monitor, greeting read."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(str(pair.vmigrate.raw_path))
    assert read_until(sock, b"\r\n").startswith(b'{"QMP"')
    return sock


def read_until(sock: socket.socket, end: bytes) -> bytes:
    data = bytearray()
    while not data.endswith(end):
        chunk = sock.recv(1 << 16)
        assert chunk, bytes(data[-200:])
        data += chunk
    return bytes(data)


def exchange(sock: socket.socket, data: bytes) -> list[dict]:
    """Send ``data`` and a marker request; the answers before the marker's."""
    sock.sendall(data + b'\n{"execute": "marker", "id": "marker"}\n')
    lines = read_until(sock, b'"id": "marker", "error": {"class": "CommandNotFound", "desc": '
                             b'"Expecting capabilities negotiation with \'qmp_capabilities\'"}}\r\n')
    return [json.loads(line) for line in lines.split(b"\r\n")[:-2]]


def size_error(rest: list[dict]) -> list[dict]:
    return [{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}, *rest]


def parse_error(detail: str) -> dict:
    return {"error": {"class": "GenericError", "desc": f"JSON parse error, {detail}"}}


# Answers of QEMU 7.2 to the same bytes (docs/qmp-limits.md): the lexer gives up
# after 64 MiB + 1 bytes of a token and lexes the rest of it as new input.
OVERSIZE = {
    "string": (b'"' + b"x" * (MAX_TOKEN_SIZE + 10) + b'"',
               size_error([parse_error("invalid keyword 'xxxxxxxxxx'"), parse_error("stray '\"\n'")])),
    "string-in-request": (b'{"execute": "query-name", "id": "' + b"x" * (MAX_TOKEN_SIZE + 10) + b'"}',
                          size_error([parse_error("invalid keyword 'xxxxxxxxxx'"),
                                      parse_error("stray '\"}\n'")])),
    "number": (b"1" * (MAX_TOKEN_SIZE + 5) + b" ",
               size_error([{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}])),
}


@pytest.mark.parametrize("data, expected", OVERSIZE.values(), ids=OVERSIZE.keys())
def test_oversize_token(pair, data, expected):
    with vmigrate_monitor(pair) as sock:
        assert exchange(sock, data) == expected


def rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) >> 10


def test_huge_message_blocks_no_other_monitor(pair):
    """A 64 MiB request on one monitor: another keeps answering, and the memory is given back.

    The bound is generous (a stalled loop took 5 to 35 s here); the memory
    check allows for the allocator keeping some, not for the message's.
    """
    library = pair.vmigrate.proc.qmp
    pid = pair.vmigrate.proc.proc.pid
    before = rss_mib(pid)
    data = b'{"execute": "query-name", "bogus": "' + b"x" * (MAX_TOKEN_SIZE - 100) + b'"}'
    answers: list[list[dict]] = []
    with vmigrate_monitor(pair) as sock:
        sender = threading.Thread(target=lambda: answers.append(exchange(sock, data)))
        sender.start()
        worst = 0.0
        while sender.is_alive():
            start = time.monotonic()
            assert library.request({"execute": "query-status"})["return"]["status"] == "running"
            worst = max(worst, time.monotonic() - start)
        sender.join()
    assert answers == [[{"error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}}]]
    assert worst < 2.0, f"query-status took {worst:.2f}s while the other monitor parsed 64 MiB"
    deadline = time.monotonic() + 5
    while rss_mib(pid) > before + 32 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rss_mib(pid) <= before + 32, (before, rss_mib(pid))


def test_connection_burst(pair):
    """50 connects at once are all greeted (QEMU's chardev listens with a backlog of 1)."""
    socks = []
    try:
        for _ in range(50):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setblocking(False)
            sock.connect(str(pair.vmigrate.raw_path))
        for sock in socks:
            sock.settimeout(10)
            assert read_until(sock, b"\r\n").startswith(b'{"QMP"')
    finally:
        for sock in socks:
            sock.close()
    with vmigrate_monitor(pair) as sock:
        assert exchange(sock, b"") == []
