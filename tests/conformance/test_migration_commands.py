"""Migration commands and their error paths, plus the commands around them
(COLO, Xen, dirty rate and limit, SPICE, yank, snapshots, announce), all
answered as QEMU 7.2 answers them on this machine.
"""

from __future__ import annotations

import json
import random
import time
import weakref

import pytest
from harness import Options, Pair, assert_same, count, event_layout, wait_for

from vmigrate.migration import rdma


def _caps(**states: bool) -> dict:
    return {"capabilities": [{"capability": k.replace("_", "-"), "state": v} for k, v in states.items()]}


# -- cases both must answer identically (no state change) ------------------------------

SAME = [
    ("query-migrate", None), ("query-migrate", {"x": 1}),
    ("migrate-continue", {"state": "pre-switchover"}), ("migrate-continue", {"state": "none"}),
    ("migrate-continue", {"state": "active"}), ("migrate-continue", {"state": "bogus"}),
    ("migrate-continue", {}), ("migrate-continue", {"state": 1}),
    ("migrate_cancel", None), ("migrate_cancel", {"x": 1}),
    ("migrate-start-postcopy", None), ("migrate-start-postcopy", {"x": 1}),
    ("migrate-pause", None), ("migrate-pause", {"x": 1}),
    ("migrate-recover", {"uri": "tcp:127.0.0.1:1"}), ("migrate-recover", {}), ("migrate-recover", {"uri": None}),
    ("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}), ("migrate-incoming", {"uri": "bogus"}),
    ("migrate-incoming", {}), ("migrate-incoming", {"uri": 5}),
    ("migrate", {}), ("migrate", {"uri": 1}), ("migrate", {"uri": "exec:true", "bogus": 1}),
    ("migrate", {"uri": "exec:true", "resume": True}), ("migrate", {"uri": "exec:true", "blk": "yes"}),
    ("query-colo-status", None), ("query-colo-status", {"x": 1}),
    ("x-colo-lost-heartbeat", None), ("x-colo-lost-heartbeat", {"x": 1}),
    ("client_migrate_info", {"protocol": "spice", "hostname": "localhost"}),
    ("client_migrate_info", {"protocol": "spice", "hostname": "h", "port": 1, "tls-port": 2, "cert-subject": "x"}),
    ("client_migrate_info", {"protocol": "vnc", "hostname": "h"}),
    ("client_migrate_info", {"protocol": "spice"}), ("client_migrate_info", {"hostname": "h"}),
    ("client_migrate_info", {"protocol": "spice", "hostname": "h", "port": "1"}),
    ("xen-set-global-dirty-log", {"enable": True}), ("xen-set-global-dirty-log", {"enable": False}),
    ("xen-set-global-dirty-log", {}), ("xen-set-global-dirty-log", {"enable": 1}),
    ("xen-save-devices-state", {}), ("xen-save-devices-state", {"filename": 1}),
    ("xen-save-devices-state", {"filename": "f", "live": "yes"}),
    ("xen-load-devices-state", {}), ("xen-load-devices-state", {"filename": None}),
    ("xen-set-replication", {}), ("xen-set-replication", {"enable": True}),
    ("xen-set-replication", {"enable": "x", "primary": True}),
    ("query-xen-replication-status", {"x": 1}), ("xen-colo-do-checkpoint", {"x": 1}),
    ("calc-dirty-rate", {}), ("calc-dirty-rate", {"calc-time": "1"}), ("calc-dirty-rate", {"calc-time": 1 << 63}),
    ("calc-dirty-rate", {"calc-time": 1, "mode": "bogus"}), ("calc-dirty-rate", {"calc-time": 1, "sample-pages": "1"}),
    ("query-dirty-rate", {"x": 1}),
    ("set-vcpu-dirty-limit", {}), ("set-vcpu-dirty-limit", {"dirty-rate": "x"}),
    ("set-vcpu-dirty-limit", {"dirty-rate": 1, "cpu-index": "0"}),
    ("cancel-vcpu-dirty-limit", {"cpu-index": "x"}), ("query-vcpu-dirty-limit", {"x": 1}),
    ("announce-self", {"initial": "x"}), ("announce-self", {"interfaces": "eth0"}),
    ("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100}),
    ("announce-self", {"initial": 1, "max": 2, "rounds": 1, "step": 1, "id": "a", "interfaces": ["eth0"]}),
    ("announce-self", {"initial": 1, "max": 2, "rounds": 1}),
    ("query-yank", {"x": 1}), ("yank", {}), ("yank", {"instances": [{"type": "bogus"}]}),
    ("yank", {"instances": [{"type": "chardev"}]}), ("yank", {"instances": []}),
    ("yank", {"instances": [{"type": "migration"}]}), ("yank", {"instances": [{"type": "chardev", "id": "nosuch"}]}),
    ("yank", {"instances": [{"type": "block-node", "node-name": "nosuch"}]}),
    ("snapshot-save", {}), ("snapshot-save", {"job-id": "j", "tag": "t", "vmstate": "v"}),
    ("snapshot-load", {"job-id": 1, "tag": "t", "vmstate": "v", "devices": []}),
    ("snapshot-delete", {"job-id": "j", "tag": "t", "devices": "d"}),
    ("getfd", {}), ("getfd", {"fdname": "x"}), ("closefd", {"fdname": "x"}), ("closefd", {}),
]


@pytest.mark.parametrize("command, arguments", SAME, ids=[f"{c}:{json.dumps(a)}" for c, a in SAME])
def test_same_answer(pair, command, arguments):
    pair.same(command, arguments)
    assert pair.same_events() == []


def test_query_migrate_before_any_migration(pair):
    assert pair.same("query-migrate")["return"] == {}


def test_start_postcopy_needs_migration(pair):
    for cap in ("postcopy-ram", "dirty-bitmaps"):
        pair.same("migrate-set-capabilities", _caps(**{cap: True}))
        pair.same("migrate-start-postcopy")
        pair.same("migrate-set-capabilities", _caps(**{cap: False}))


def test_dirty_rate(fresh_pair):
    """calc-dirty-rate's checks and a whole page-sampling measurement of an idle guest.

    Modes dirty-ring and dirty-bitmap are not sent: QEMU 7.2 under TCG
    dereferences the absent KVM state in both and segfaults.
    """
    p = fresh_pair()
    p.same("query-dirty-rate")
    for arguments in ({"calc-time": 0}, {"calc-time": 61}, {"calc-time": -1}, {"calc-time": 1, "sample-pages": 1},
                      {"calc-time": 1, "sample-pages": 127}, {"calc-time": 1, "sample-pages": 100000},
                      {"calc-time": 1, "sample-pages": -1}):
        p.same("calc-dirty-rate", arguments)
    p.same("query-dirty-rate")
    p.same("calc-dirty-rate", {"calc-time": 1, "sample-pages": 128, "mode": "page-sampling"})
    # The measuring thread itself moves the state to "measuring" (get_dirtyrate_thread in QEMU's
    # migration/dirtyrate.c, and vmigrate's alike): until both threads have, a request races with them.
    wait_for(lambda: all(r["return"]["status"] == "measuring" for r in p.send({"execute": "query-dirty-rate"})),
             5, "both sides measuring", interval=0.01)
    p.same("calc-dirty-rate", {"calc-time": 1})
    masked = _masked_dirty_rate(p)
    assert masked["status"] == "measuring"
    deadline = time.monotonic() + 10
    while masked["status"] != "measured" and time.monotonic() < deadline:
        time.sleep(0.2)
        masked = _masked_dirty_rate(p)
    assert masked["status"] == "measured"
    p.same("calc-dirty-rate", {"calc-time": 1, "sample-pages": 4096})
    for command, arguments in (("set-vcpu-dirty-limit", {"dirty-rate": 100}),
                               ("set-vcpu-dirty-limit", {"dirty-rate": 100, "cpu-index": 5}),
                               ("cancel-vcpu-dirty-limit", None), ("cancel-vcpu-dirty-limit", {"cpu-index": 0}),
                               ("query-vcpu-dirty-limit", None)):
        p.same(command, arguments)
    assert p.same_events() == []


def _masked_dirty_rate(p: Pair) -> dict:
    """query-dirty-rate on both, start-time masked (seconds since each process's clock origin)."""
    qemu, vm = p.send({"execute": "query-dirty-rate"})
    for reply in (qemu, vm):
        if "start-time" in reply["return"]:
            reply["return"]["start-time"] = "<time>"
    assert_same("query-dirty-rate", qemu, vm)
    return qemu["return"]


def test_query_yank_lists_monitors(pair):
    pair.same("query-yank")


def test_query_migrationthreads_is_an_extension(pair):
    """QEMU 8.0's command, served by vmigrate ahead of time (the only extra command)."""
    qemu, vm = pair.send({"execute": "query-migrationthreads"})
    assert qemu == {"error": {"class": "CommandNotFound",
                              "desc": "The command query-migrationthreads has not been found"}}
    assert vm == {"return": []}


def _timer_masked(stream: bytes) -> bytes:
    """The stream with the timer section's clock offsets (24 bytes, per-process values) zeroed."""
    start = stream.index(b"\x05timer") + len(b"\x05timer") + 8  # instance id, version
    return stream[:start] + bytes(24) + stream[start + 24:]


def test_xen_device_state(fresh_pair, tmp_path):
    """xen-save-devices-state: STOP/RESUME around a device-only stream, byte-identical files."""
    p = fresh_pair()
    for live in (None, False):
        files = []
        replies = []
        for side in p.sides():
            path = tmp_path / f"{side.kind}-{live}.bin"
            arguments: dict = {"filename": str(path)}
            if live is not None:
                arguments["live"] = live
            replies.append(side.proc.qmp.request({"execute": "xen-save-devices-state", "arguments": arguments}))
            files.append(_timer_masked(path.read_bytes()))
        assert_same("xen-save-devices-state", *replies)
        count()
        assert p.same_events() == [("STOP", None), ("RESUME", None)]
        assert files[1] == files[0]
    p.same("xen-save-devices-state", {"filename": "/nonexistent/dir/f"})
    p.same_events()
    p.same("xen-load-devices-state", {"filename": "/nonexistent/dir/f"})
    p.same("stop")
    p.same_events()
    p.same("xen-load-devices-state", {"filename": "/nonexistent/dir/f"})
    p.same("query-status")
    p.same_events()


def test_xen_replication(fresh_pair):
    """Start, stop and checkpoint replication, with no replication node: the status stays clean."""
    p = fresh_pair()
    p.same("query-xen-replication-status")
    for arguments in ({"enable": True, "primary": True}, {"enable": True, "primary": True, "failover": True},
                      {"enable": True, "primary": False, "failover": False}, {"enable": False, "primary": False},
                      {"enable": False, "primary": True, "failover": True},
                      {"enable": False, "primary": False, "failover": False}):
        p.same("xen-set-replication", arguments)
        p.same("query-xen-replication-status")
        p.same("xen-colo-do-checkpoint")
    assert p.same_events() == []
    p.same("query-status")


# -- bad migration URIs --------------------------------------------------------------------

#: URIs QEMU 7.2 handles in surprising ways (once vmigrate bugs, fixed in
#: vmigrate/migration/channel.py); each says what QEMU does, and vmigrate must
#: answer the same.
ODD_URIS = {
    "tcp:127.0.0.1:99999": "QEMU accepts ports > 65535 (getaddrinfo keeps the low 16 bits: 99999 -> 34463) and "
                           "listens/connects; vmigrate refuses \"Port '99999' out of range\"",
    "tcp:127.0.0.1:65536": "QEMU accepts it (port 0 after truncation: an ephemeral listener / connection refused); "
                           "vmigrate refuses \"Port '65536' out of range\"",
    "tcp:127.0.0.1:abc": "QEMU: 'address resolution failed for 127.0.0.1:abc: Servname not supported for "
                         "ai_socktype' (migrate: returns {} and fails asynchronously); vmigrate: \"error parsing "
                         "address '127.0.0.1:abc'\", synchronously",
    "tcp:127.0.0.1:-1": "QEMU: 'address resolution failed for 127.0.0.1:-1: Servname not supported for ai_socktype' "
                        "(migrate: asynchronously); vmigrate: \"Port '-1' out of range\"",
    "tcp::": "QEMU: \"error parsing port in address ':'\"; vmigrate: \"error parsing address ':'\"",
    "tcp:[::1": "QEMU: \"error parsing IPv6 address '[::1'\", synchronously in both directions; vmigrate's "
                "migrate-incoming: 'address resolution failed for [::1: Name or service not known', its migrate "
                "returns {} and fails later",
    "tcp:127.0.0.1:1,to=5": "QEMU accepts inet options after ',' (to=, ipv4=, ipv6=, keep-alive=...); vmigrate: "
                            "\"error parsing address '127.0.0.1:1,to=5'\"",
    "tcp:127.0.0.1:0,ipv6=on": "QEMU applies the option: 'address resolution failed for 127.0.0.1:0: Address family "
                               "for hostname not supported' (migrate: asynchronously); vmigrate: \"error parsing "
                               "address '127.0.0.1:0,ipv6=on'\"",
    "unix:": "QEMU: 'invalid Unix socket address', synchronously in both directions; vmigrate's migrate-incoming "
             "returns {} and listens on path '' (query-migrate shows it), its migrate fails later with "
             "\"Failed to connect to '': Invalid argument\"",
}

#: migrate-incoming only (its outgoing form matches QEMU).
ODD_INCOMING_URIS = {
    "unix:/nonexistent/dir/sock": "QEMU: 'Failed to bind socket to /nonexistent/dir/sock: No such file or "
                                  "directory'; vmigrate: 'Failed to bind socket: No such file or directory'",
    "exec": "QEMU needs the ':' of 'exec:' and answers 'unknown migration protocol: exec'; vmigrate's incoming.py "
            "accepts the bare word and parse_uri answers \"Parameter 'uri' expects a valid migration protocol\"",
}

#: vsock: addresses that no listener answers here (CID 2 is the host, 1 the local loopback,
#: which times out after 2 s without the vsock_loopback transport), and malformed ones.
VSOCK_URIS = ["vsock:", "vsock:1", "vsock::1", "vsock:1:", "vsock:1:1,x", "vsock:x:1", "vsock:-1:1", "vsock:1:x",
              "vsock:2:99999999999", "vsock:2:1234", "vsock:1:12345"]
#: rdma: addresses; without an RDMA device the connection manager cannot even be opened.
RDMA_URIS = ["rdma:127.0.0.1:1", "rdma:127.0.0.1:0", "rdma:", "rdma:x", "rdma:127.0.0.1", "rdma::1", "rdma:[::1",
             "rdma:[::1]:1", "rdma:h:1,to=x", "rdma:nosuchhost:1"]
no_rdma_device = pytest.mark.skipif(rdma.device_present(), reason="an RDMA device exists: vmigrate does not "
                                                                  "implement RDMA migration, QEMU would try it")

BAD_URIS = ["bogus:x", "x", "", "tcp:", "tcp:127.0.0.1", "tcp:127.0.0.1:", "fd:nosuch", "fd:", "exec"]
BAD_INCOMING_URIS = ["bogus:x", "x", "", "tcp:", "tcp:127.0.0.1", "tcp:127.0.0.1:", "fd:nosuch", "fd:"]


@pytest.fixture(scope="module")
def destination(tmp_path_factory):
    """A ``-incoming defer`` pair; failed migrate-incoming attempts leave it unchanged."""
    p = Pair.start(tmp_path_factory.mktemp("destination"), Options(incoming="defer"))
    yield p
    p.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A pair whose outgoing migrations fail; each attempt starts from ``failed`` again."""
    p = Pair.start(tmp_path_factory.mktemp("source"))
    p.same("migrate-set-capabilities", _caps(events=True))
    yield p
    p.close()


def _incoming_refused(p: Pair, uri: str) -> None:
    """Every attempt emits MIGRATION setup first, even a refused one, and may be retried.

    Both answers are collected before anything is asserted, so a case that
    fails leaves no event behind for the next one on a shared pair.
    """
    qemu, vm = p.send({"execute": "migrate-incoming", "arguments": {"uri": uri}})
    events = [side.proc.events() for side in p.sides()]
    infos = p.send({"execute": "query-migrate"})
    assert_same(uri, qemu, vm)
    assert "error" in qemu
    assert_same("events", *[[event_layout(e) for e in seen] for seen in events])
    assert [e["event"] for e in events[0]] == ["MIGRATION"]
    assert_same("query-migrate", *infos)


def _migrate_fails(p: Pair, uri: str) -> None:
    """migrate, synchronously refused or failing later; drained before asserting, as above."""
    qemu, vm = p.send({"execute": "migrate", "arguments": {"uri": uri}})
    events = p.events_until(_completed("failed"), compare=False)
    infos = p.send({"execute": "query-migrate"})
    assert_same(uri, qemu, vm)
    assert events[1] == events[0]
    assert_same("query-migrate", *infos)


@pytest.mark.parametrize("uri", BAD_INCOMING_URIS, ids=lambda u: u or "empty")
def test_migrate_incoming_bad_uri(destination, uri):
    _incoming_refused(destination, uri)


@pytest.mark.parametrize("uri", BAD_URIS, ids=lambda u: u or "empty")
def test_migrate_bad_uri(source, uri):
    _migrate_fails(source, uri)


#: Odd URIs where one side *starts* listening: later attempts on that pair
#: would only meet "already started", so these get a pair of their own.
INCOMING_ACCEPTED = {"tcp:127.0.0.1:99999", "tcp:127.0.0.1:65536", "tcp:127.0.0.1:1,to=5", "unix:"}
ODD_INCOMING = {**ODD_URIS, **ODD_INCOMING_URIS}


#: Both processes would listen on port 34463 (99999 truncated): the second cannot, whichever it is.
SAME_PORT_TWICE = {"tcp:127.0.0.1:99999"}


@pytest.mark.parametrize("uri", [pytest.param(u, id=u) for u in ODD_INCOMING
                                 if u not in INCOMING_ACCEPTED | SAME_PORT_TWICE])
def test_migrate_incoming_odd_uri(destination, uri):
    _incoming_refused(destination, uri)


@pytest.mark.parametrize("uri", sorted(INCOMING_ACCEPTED - {"unix:"} - SAME_PORT_TWICE))
def test_migrate_incoming_odd_uri_accepted(fresh_pair, uri):
    """Ports past 65535 keep their low 16 bits and ``,to=`` options apply, in both."""
    p = fresh_pair(incoming="defer")
    p.same("migrate-incoming", {"uri": uri})
    p.same("query-migrate")


def test_migrate_incoming_empty_unix_path(fresh_pair):
    _incoming_refused(fresh_pair(incoming="defer"), "unix:")


@pytest.mark.parametrize("uri", [pytest.param(u, id=u) for u in ODD_URIS])
def test_migrate_odd_uri(source, uri):
    _migrate_fails(source, uri)


@pytest.mark.parametrize("uri", VSOCK_URIS)
def test_migrate_vsock_fails(source, uri):
    """Syntax errors fail the command, bad numbers and connect errors the migration (error-desc)."""
    _migrate_fails(source, uri)


@pytest.mark.parametrize("uri", [u for u in VSOCK_URIS if u != "vsock:1:12345"])
def test_migrate_incoming_vsock_refused(destination, uri):
    _incoming_refused(destination, uri)


def test_migrate_incoming_vsock_any_cid(fresh_pair):
    """Listening on every CID (VMADDR_CID_ANY): each side its own port, the answers otherwise equal."""
    p = fresh_pair(incoming="defer")
    first = random.randrange(20000, 60000)
    replies = []
    for side, port in zip(p.sides(), (first, first + 1)):
        uri = f"vsock:4294967295:{port}"
        answer = side.proc.qmp.request({"execute": "migrate-incoming", "arguments": {"uri": uri}})
        info = side.proc.qmp.request({"execute": "query-migrate"})["return"]
        assert info["socket-address"][0]["port"] == str(port), info
        info["socket-address"][0]["port"] = "<port>"
        replies.append((answer, info))
    count(2)
    assert_same("migrate-incoming vsock:4294967295:PORT", *replies)
    p.same_events()
    p.same("migrate-incoming", {"uri": "vsock:4294967295:1"})


@no_rdma_device
@pytest.mark.parametrize("uri", RDMA_URIS)
def test_migrate_rdma_fails(source, uri):
    _migrate_fails(source, uri)


@no_rdma_device
@pytest.mark.parametrize("uri", RDMA_URIS)
def test_migrate_incoming_rdma_refused(destination, uri):
    _incoming_refused(destination, uri)


def test_migrate_incoming_once(fresh_pair):
    p = fresh_pair(incoming="defer")
    p.same("migrate-incoming", {"uri": "bogus"})
    p.same_events()
    p.same("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    assert p.wait_events(["MIGRATION"]) == [("MIGRATION", {"status": "setup"})]
    info = p.same("query-migrate")["return"]
    assert info["socket-address"][0]["host"] == "127.0.0.1"
    p.same("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    p.same("migrate-incoming", {"uri": "bogus"})
    assert p.same_events() == []
    p.same("query-status")
    p.same("migrate", {"uri": "exec:true"})
    p.same("migrate-recover", {"uri": "tcp:127.0.0.1:0"})
    p.same("migrate-pause")


def test_migrate_incoming_unix(fresh_pair, tmp_path):
    p = fresh_pair(incoming="defer")
    qemu, vm = p.send({"execute": "migrate-incoming", "arguments": {"uri": f"unix:{tmp_path}/q.sock"}})
    assert qemu == vm == {"return": {}}
    p.same_events()


def test_query_migrate_listening_destination(fresh_pair):
    p = fresh_pair(incoming="tcp:127.0.0.1:0")
    info = p.same("query-migrate")["return"]
    assert [a["type"] for a in info["socket-address"]] == ["inet"]
    p.same("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    p.same("migrate-set-capabilities", _caps(multifd=True))
    p.same("query-migrate")


# -- outgoing migration: failures and a completed one ------------------------------------------

def test_migrate_failures(fresh_pair):
    p = fresh_pair()
    p.same("migrate-set-capabilities", _caps(events=True))
    p.same("migrate", {"uri": "tcp:127.0.0.1:1"})
    p.events_until(lambda seen: ("MIGRATION", {"status": "failed"}) in seen)
    p.same("query-migrate")
    p.same("migrate", {"uri": "exec:true", "resume": True})
    p.same("migrate_cancel")
    p.same("query-status")


def _same_migration_info(p: Pair) -> dict:
    """query-migrate on both, timing-dependent values masked; everything else exact.

    Both sides cut a RAM iteration after 50 ms and update the switchover
    threshold every 100 ms, so a slower first pass can take two iterations
    (one more 8-byte end-of-section marker) and one more dirty sync: those
    counters may differ a little, and each side's sync count must match the
    MIGRATION_PASS events it sent (see _migration_events).
    """
    qemu, vm = p.send({"execute": "query-migrate"})
    sent = []
    for reply, side in ((qemu, p.qemu), (vm, p.vmigrate)):
        info = reply["return"]
        for key in ("setup-time", "downtime", "total-time"):
            if key in info:
                info[key] = "<ms>"
        if "ram" in info:
            ram = info["ram"]
            ram["mbps"] = ram["pages-per-second"] = "<rate>"
            sent.append(ram["transferred"])
            assert ram["precopy-bytes"] == ram["transferred"]
            ram["transferred"] = ram["precopy-bytes"] = "<bytes>"
            assert ram["dirty-sync-count"] == _passes[side.proc], side.kind
            ram["dirty-sync-count"] = "<syncs>"
    if sent:
        assert abs(sent[1] - sent[0]) % 8 == 0 and abs(sent[1] - sent[0]) <= 64, sent
    assert_same("query-migrate", qemu, vm)
    return qemu["return"]


#: The last MIGRATION_PASS number each process announced.
_passes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _migration_events(p: Pair, status: str) -> list[tuple]:
    """Events up to MIGRATION ``status``: equal on both sides except how many
    dirty-sync passes happened (timing), which must count up from 1."""
    both = p.events_until(_completed(status), compare=False)
    rest = []
    for side, seen in zip(p.sides(), both):
        passes = [data["pass"] for name, data in seen if name == "MIGRATION_PASS"]
        first = _passes.get(side.proc, 0) + 1
        assert passes == list(range(first, first + len(passes))), (side.kind, seen)
        if passes:
            _passes[side.proc] = passes[-1]
        rest.append([e for e in seen if e[0] != "MIGRATION_PASS"])
    assert rest[1] == rest[0], f"events:\n  qemu:     {both[0]}\n  vmigrate: {both[1]}"
    return rest[0]


def _completed(status: str):
    return lambda seen: ("MIGRATION", {"status": status}) in seen


def _settle(p: Pair) -> None:
    """Let vmigrate leave finish-migrate (see test_postmigrate_when_completed_is_announced)."""
    wait_for(lambda: p.vmigrate.proc.status() != "finish-migrate", 10, "vmigrate to leave finish-migrate")


def test_migrate_completed(fresh_pair):
    """A whole migration to a sink: events, final statistics, the postmigrate state."""
    p = fresh_pair()
    p.same("migrate-set-capabilities", _caps(events=True))
    p.same("migrate", {"uri": "exec:cat > /dev/null"})
    assert _migration_events(p, "completed") == [
        ("MIGRATION", {"status": "setup"}), ("MIGRATION", {"status": "active"}), ("STOP", None),
        ("MIGRATION", {"status": "completed"})]
    _settle(p)
    assert _same_migration_info(p)["status"] == "completed"
    assert p.same("query-status")["return"]["status"] == "postmigrate"
    p.same("migrate", {"uri": "exec:cat > /dev/null"})
    p.same("migrate-set-capabilities", _caps(xbzrle=True))
    p.same("migrate-continue", {"state": "completed"})
    p.same("migrate_cancel")
    p.same("cont")
    assert p.same_events() == [("RESUME", None)]
    assert p.same("query-status")["return"]["status"] == "running"


def test_migrate_from_destination(fresh_pair):
    p = fresh_pair(incoming="defer")
    p.same("migrate", {"uri": "exec:cat > /dev/null"})
    p.same("query-migrate")
    p.same("migrate-start-postcopy")


@pytest.mark.parametrize("finish", ["continue", "cancel"])
def test_pause_before_switchover(fresh_pair, finish):
    """The pre-switchover stop: what is refused there, then continue or cancel."""
    p = fresh_pair()
    p.same("migrate-set-capabilities", _caps(events=True, pause_before_switchover=True))
    p.same("migrate", {"uri": "exec:cat > /dev/null"})
    assert _migration_events(p, "pre-switchover")[-2:] == [("STOP", None), ("MIGRATION", {"status": "pre-switchover"})]
    assert _same_migration_info(p)["status"] == "pre-switchover"
    assert p.same("query-status")["return"]["status"] == "finish-migrate"
    p.same("migrate-set-capabilities", _caps(xbzrle=True))
    p.same("migrate-set-parameters", {"downtime-limit": 500})
    p.same("migrate-continue", {"state": "active"})
    p.same("migrate", {"uri": "exec:cat > /dev/null"})
    p.same("migrate-start-postcopy")
    p.same("migrate-pause")
    if finish == "continue":
        p.same("migrate-continue", {"state": "pre-switchover"})
        assert _migration_events(p, "completed") == [
            ("MIGRATION", {"status": "device"}), ("MIGRATION", {"status": "completed"})]
        _settle(p)
        assert p.same("query-status")["return"]["status"] == "postmigrate"
    else:
        p.same("migrate_cancel")
        # Who wins the race between the woken migration thread (pre-switchover ->
        # device) and the cancel (-> cancelling) is timing; QEMU usually reports
        # device first, vmigrate cancelling: compare what is certain.
        qemu, vm = p.events_until(_completed("cancelled"), compare=False)
        for seen in (qemu, vm):
            assert [e for e in seen if e != ("MIGRATION", {"status": "device"})] == [
                ("MIGRATION", {"status": "cancelling"}), ("RESUME", None), ("MIGRATION", {"status": "cancelled"})]
        assert p.same("query-status")["return"]["status"] == "running"
    _same_migration_info(p)
    p.same("migrate-continue", {"state": "pre-switchover"})


def test_postmigrate_when_completed_is_announced(fresh_pair):
    p = fresh_pair()
    p.same("migrate-set-capabilities", _caps(events=True))
    p.same("migrate", {"uri": "exec:cat > /dev/null; sleep 1"})
    p.events_until(_completed("completed"))
    assert p.same("query-status")["return"]["status"] == "postmigrate"
