"""Run state, identity and version: query-status, stop/cont and their events,
query-name/-uuid/-version, quit.  State-changing scenarios get fresh pairs."""

from __future__ import annotations

import pytest

STATUS = "query-status"


def test_running(pair):
    assert pair.same(STATUS)["return"]["status"] == "running"
    assert pair.same_events() == []


def test_query_version_shape(pair):
    reply = pair.same("query-version")["return"]
    assert list(reply) == ["qemu", "package"] and list(reply["qemu"]) == ["micro", "minor", "major"]


def test_stop_cont_events(fresh_pair):
    p = fresh_pair()
    steps = [
        ("stop", "paused", [("STOP", None)]),
        ("stop", "paused", []),
        ("cont", "running", [("RESUME", None)]),
        ("cont", "running", []),
        ("stop", "paused", [("STOP", None)]),
        ("cont", "running", [("RESUME", None)]),
    ]
    for command, status, events in steps:
        p.same(command)
        assert p.same_events() == events, command
        assert p.same(STATUS)["return"]["status"] == status


def test_prelaunch(fresh_pair):
    p = fresh_pair(paused=True)
    assert p.same(STATUS)["return"] == {"status": "prelaunch", "singlestep": False, "running": False}
    p.same("stop")
    assert p.same_events() == []
    assert p.same(STATUS)["return"]["status"] == "prelaunch"
    p.same("cont")
    assert p.same_events() == [("RESUME", None)]
    assert p.same(STATUS)["return"]["status"] == "running"


def test_incoming_defer(fresh_pair):
    p = fresh_pair(incoming="defer")
    assert p.same(STATUS)["return"]["status"] == "inmigrate"
    for command in ("stop", "cont", "stop", "cont"):
        p.same(command)
        assert p.same_events() == []
        assert p.same(STATUS)["return"]["status"] == "inmigrate"
    p.same("query-migrate")


def test_incoming_listening(fresh_pair):
    p = fresh_pair(incoming="tcp:127.0.0.1:0")
    assert p.same(STATUS)["return"]["status"] == "inmigrate"
    info = p.same("query-migrate")["return"]
    assert info["socket-address"][0]["type"] == "inet"


@pytest.mark.parametrize("name, uuid", [
    (None, None), ("conformance-vm", "12345678-9abc-def0-1234-56789abcdef0"),
    ("vm with spaces", "ABCDEF01-2345-6789-ABCD-EF0123456789"), ("é", None),
])
def test_query_name_and_uuid(fresh_pair, name, uuid):
    p = fresh_pair(name=name, uuid=uuid)
    assert p.same("query-name")["return"] == ({} if name is None else {"name": name})
    assert p.same("query-uuid")["return"] == {"UUID": (uuid or "00000000-0000-0000-0000-000000000000").lower()}


def test_identity_arguments(pair):
    for command in ("query-name", "query-uuid", "query-version", STATUS, "stop", "cont", "quit"):
        pair.same(command, {"x": 1})
        pair.same(command, {"a": 1, "b": 2, "c": 3})
    assert pair.same(STATUS)["return"]["status"] == "running"


def test_quit(fresh_pair):
    p = fresh_pair()
    p.same("quit")
    assert p.wait_events(["SHUTDOWN"]) == [("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})]
    for side in p.sides():
        side.proc.proc.wait(timeout=10)
        assert side.proc.proc.returncode == 0, side.kind
