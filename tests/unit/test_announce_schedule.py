"""Self-announce: the RARP frame's bytes, the schedule of net/announce.c, the timers, ``--nic``."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from vmigrate.machine.announce import AnnounceParameters, Announcer, announce_delays, self_announce_frame
from vmigrate.machine.net import NicError, NicSpec, parse_mac

MAC = bytes.fromhex("525400abcdef")


def test_frame_bytes():
    """announce_self_create for 52:54:00:ab:cd:ef, byte for byte (docs/qemu/misc.md §1.3)."""
    expected = bytes.fromhex(
        "ffffffffffff" "525400abcdef" "8035"          # broadcast, from the MAC, RARP
        "0001" "0800" "06" "04" "0003"               # Ethernet, IPv4, lengths, reverse request
        "525400abcdef" "00000000"                    # sender: the MAC, 0.0.0.0
        "525400abcdef" "00000000"                    # target: the MAC, 0.0.0.0
        + "00" * 18)                                 # padding to 60 bytes
    assert self_announce_frame(MAC) == expected
    assert len(expected) == 60


def test_frame_needs_six_bytes():
    with pytest.raises(ValueError):
        self_announce_frame(b"\1\2\3")


def params(initial=50, max=550, rounds=5, step=100, **kw) -> AnnounceParameters:
    return AnnounceParameters(initial, max, rounds, step, **kw)


@pytest.mark.parametrize("p, delays", [
    (params(), [50, 150, 250, 350]),                         # defaults: bursts at 0, 50, 200, 450, 800
    (params(rounds=1), []),
    (params(rounds=0), []),
    (params(initial=100, max=250, rounds=6, step=100), [100, 200, 250, 250, 250]),
    (params(initial=-300, max=40, rounds=4, step=100), [40, 40, 40]),   # negative: max
    (params(initial=0, max=0, rounds=3, step=1), [0, 0]),
])
def test_schedule(p, delays):
    assert list(announce_delays(p)) == delays


def test_negative_rounds_never_end():
    """``rounds: -1`` (announce-self checks no range): the gaps grow by step, then stay at max."""
    first = list(itertools.islice(announce_delays(params(initial=10, max=35, rounds=-1, step=10)), 6))
    assert first == [10, 20, 30, 35, 35, 35]


class FakeNic:
    def __init__(self, nic_id: str, mac: bytes) -> None:
        self.id, self.mac = nic_id, mac
        self.sent: list[tuple[float, bytes]] = []
        self.lock = threading.Lock()

    def send(self, frame: bytes) -> None:
        with self.lock:
            self.sent.append((time.monotonic(), frame))


def wait_count(nic: FakeNic, n: int, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while len(nic.sent) < n and time.monotonic() < deadline:
        time.sleep(0.005)


def test_announcer_rounds_and_filter():
    a, b = FakeNic("n0", MAC), FakeNic("n1", bytes.fromhex("525400000001"))
    announcer = Announcer([a, b])
    try:
        start = time.monotonic()
        announcer.announce_self(params(initial=20, max=100, rounds=3, step=20, interfaces=("n1",)))
        wait_count(b, 3)
        time.sleep(0.1)
        assert a.sent == []
        assert [frame for _, frame in b.sent] == [self_announce_frame(b.mac)] * 3
        times = [t - start for t, _ in b.sent]
        assert times[0] < 0.05                                     # the first burst at once
        assert 0.015 < times[1] - times[0] < 0.2 and 0.035 < times[2] - times[1] < 0.3
    finally:
        announcer.close()


def test_same_id_restarts_other_ids_run_alongside():
    nic = FakeNic("n0", MAC)
    announcer = Announcer([nic])
    try:
        announcer.announce_self(params(initial=10_000, rounds=2))     # a second burst far away
        wait_count(nic, 1)
        announcer.announce_self(params(initial=10_000, rounds=2))     # same id "": restarted
        wait_count(nic, 2)
        announcer.announce_self(params(rounds=1, id="other"))
        announcer.after_migration(params(rounds=1))
        wait_count(nic, 4)
        time.sleep(0.05)
        assert len(nic.sent) == 4
    finally:
        announcer.close()


def test_nic_spec():
    spec = NicSpec.parse("raw,ifname=veth0,mac=52:54:00:AB:cd:ef,id=net0", 0)
    assert (spec.kind, spec.ifname, spec.mac, spec.id) == ("raw", "veth0", MAC, "net0")
    default = NicSpec.parse("tap,ifname=tap7", 2)
    assert default.mac == bytes.fromhex("525400123458") and default.id == "nic2"
    for bad in ("vde,ifname=x", "tap", "tap,ifname=x,mac=1:2:3", "tap,ifname=x,model=e1000",
                "tap,ifname=" + "x" * 16):
        with pytest.raises(NicError):
            NicSpec.parse(bad, 0)
    with pytest.raises(NicError):
        parse_mac("52:54:00:ab:cd:zz")


def test_a_stopped_vm_holds_its_frames_until_it_runs():
    """net/net.c: nothing leaves a stopped VM's NIC; its frames leave, in order, when it starts."""
    import socket

    from vmigrate.machine.net import Nic

    out, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.setblocking(False)
    nic = Nic(NicSpec.parse("raw,ifname=x", 0), out.detach())
    try:
        nic.send(b"one")
        nic.send(b"two")
        with pytest.raises(BlockingIOError):
            peer.recv(64)
        nic.set_running(True)
        nic.send(b"three")
        assert [peer.recv(64) for _ in range(3)] == [b"one", b"two", b"three"]
    finally:
        nic.close()
        peer.close()
