"""Self-announce on real links: what leaves a ``--nic`` in one namespace, captured with AF_PACKET.

* ``announce-self`` through a raw NIC on one veth end, captured on the other: count, bytes
  and gaps, and the ``interfaces`` filter;
* the same through a tap NIC, beside QEMU 7.2 doing it through its own tap.  QEMU's ``-M
  none`` has no bus for a NIC, so QEMU runs ``-M pc -S`` with an e1000 and no disk (the
  firmware finds nothing to boot).  Both start paused: QEMU holds what a stopped VM's NIC
  sends (net/net.c qemu_can_send_packet) and sends it at ``cont``, so both must be silent
  until ``cont``, then send every round at once; running, both captures must hold the same
  frames at the same gaps;
* an incoming vmigrate→vmigrate migration over the veth: the destination announces with its
  own ``announce-*`` parameters once it has loaded, the source never.

Gaps are compared with the kernel's receive timestamps, within GAP_TOLERANCE_MS: the timers
run on a shared, loaded machine.
"""

from __future__ import annotations

import ctypes
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from vmigrate.harness.launcher import QEMU, VMProcess, qmp_monitor
from vmigrate.machine.announce import AnnounceParameters, announce_delays, self_announce_frame
from vmigrate.machine.net import format_mac

ETH_P_RARP = 0x8035
SO_TIMESTAMPNS = 35
CLONE_NEWNET = 0x40000000
GAP_TOLERANCE_MS = 40
MAC = bytes.fromhex("525400a1b2c3")
MAC2 = bytes.fromhex("525400a1b2c4")
PARAMS = dict(initial=60, max=180, rounds=5, step=50)


def _socket_in(netns: str, ifname: str) -> socket.socket:
    """An AF_PACKET socket for RARP frames on *ifname* in *netns*, made by a thread that enters
    the namespace (setns moves only the calling thread); the socket stays in that namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            with open(f"/run/netns/{netns}") as ns:
                if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_RARP))
            sock.bind((ifname, ETH_P_RARP))
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            result.append(sock)
        except BaseException as err:
            result.append(err)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class Capture:
    """RARP frames arriving on one interface, with the kernel's receive times."""

    def __init__(self, netns: str, ifname: str) -> None:
        self.sock = _socket_in(netns, ifname)

    def frames(self, count: int, timeout: float) -> list[tuple[float, bytes]]:
        """Up to *count* frames, waiting *timeout* s at most for the next, then any extra ones."""
        out: list[tuple[float, bytes]] = []
        self.sock.settimeout(timeout)
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(2048, socket.CMSG_SPACE(16))
            except socket.timeout:
                return out
            stamp = next((struct.unpack("qq", d[:16]) for level, kind, d in anc
                          if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS), None)
            out.append((stamp[0] + stamp[1] / 1e9 if stamp else time.time(), data))
            if len(out) >= count:
                self.sock.settimeout(0.3)

    def close(self) -> None:
        self.sock.close()


def gaps_ms(frames: list[tuple[float, bytes]]) -> list[float]:
    return [(b[0] - a[0]) * 1000 for a, b in zip(frames, frames[1:])]


def check_schedule(frames, mac: bytes, params: dict) -> None:
    """*params*' rounds of *mac*'s frame (QEMU's 60 bytes, no FCS), at QEMU's gaps."""
    expected = list(announce_delays(AnnounceParameters(**params)))
    assert [data for _, data in frames] == [self_announce_frame(mac)] * params["rounds"]
    for got, want in zip(gaps_ms(frames), expected):
        assert abs(got - want) <= GAP_TOLERANCE_MS, (gaps_ms(frames), expected)


def nic_args(kind: str, ifname: str, mac: bytes, nic_id: str) -> tuple[str, str]:
    return "--nic", f"{kind},ifname={ifname},mac={format_mac(mac)},id={nic_id}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def test_announce_self_through_a_raw_nic(two_hosts, tmp_path):
    """Both NICs on the same veth end; ``interfaces`` picks one, then no filter sends both."""
    a, b = two_hosts
    capture = Capture(b.netns, b.link)
    vm = a.run(tmp_path / "vm.sock", tmp_path / "vm.log", *nic_args("raw", a.link, MAC, "net0"),
               *nic_args("raw", a.link, MAC2, "net1"))
    try:
        assert vm.cmd("announce-self", interfaces=["net0"], **PARAMS) == {}
        frames = capture.frames(PARAMS["rounds"], 3)
        check_schedule(frames, MAC, PARAMS)

        vm.cmd("announce-self", interfaces=["nothere"], **PARAMS)
        assert capture.frames(1, 1.5) == []

        vm.cmd("announce-self", initial=10, max=10, rounds=2, step=1, id="both")
        frames = capture.frames(4, 3)
        assert sorted(data for _, data in frames) == sorted([self_announce_frame(MAC), self_announce_frame(MAC2)] * 2)
    finally:
        vm.close()
        capture.close()


def _qemu_tap(netns: str, sock: Path, log: Path, ifname: str, mac: bytes) -> VMProcess:
    """QEMU 7.2, paused PC with one e1000 named nic0 on tap *ifname* (no ``-M none``: no bus)."""
    argv = ["ip", "netns", "exec", netns, QEMU, *qmp_monitor(sock), "-nodefaults", "-display", "none",
            "-M", "pc", "-accel", "tcg", "-m", "64M", "-S",
            "-netdev", f"tap,id=n0,ifname={ifname},script=no,downscript=no",
            "-device", f"e1000,netdev=n0,mac={format_mac(mac)},id=nic0"]
    return VMProcess(argv, sock, log)


@pytest.mark.skipif(shutil.which(QEMU) is None, reason="no QEMU 7.2")
def test_announce_self_through_a_tap_like_qemu(two_hosts, tmp_path):
    a, _ = two_hosts
    vm = a.run(tmp_path / "vm.sock", tmp_path / "vm.log", "-S", *nic_args("tap", "vmtap0", MAC, "nic0"))
    qemu = _qemu_tap(a.netns, tmp_path / "qemu.sock", tmp_path / "qemu.log", "qemutap0", MAC)
    try:
        results = {}
        for name, proc, ifname in (("vmigrate", vm, "vmtap0"), ("qemu", qemu, "qemutap0")):
            # A tap whose interface is down takes no frames (EIO): up first, as a bridge would have it.
            _ip("-n", a.netns, "link", "set", ifname, "up")
            capture = Capture(a.netns, ifname)
            try:
                assert proc.cmd("announce-self", **PARAMS) == {}
                assert capture.frames(1, 1.5) == [], name          # paused: held (all rounds are done)
                proc.cmd("cont")
                held = capture.frames(PARAMS["rounds"], 3)
                assert [d for _, d in held] == [self_announce_frame(MAC)] * PARAMS["rounds"], name
                assert max(gaps_ms(held)) < GAP_TOLERANCE_MS, (name, gaps_ms(held))
                assert proc.cmd("announce-self", interfaces=["nic0"], **PARAMS) == {}
                results[name] = capture.frames(PARAMS["rounds"], 3)
            finally:
                capture.close()
        check_schedule(results["vmigrate"], MAC, PARAMS)
        check_schedule(results["qemu"], MAC, PARAMS)
        assert [d for _, d in results["vmigrate"]] == [d for _, d in results["qemu"]]
        for mine, theirs in zip(gaps_ms(results["vmigrate"]), gaps_ms(results["qemu"])):
            assert abs(mine - theirs) <= GAP_TOLERANCE_MS, (results)
    finally:
        vm.close()
        qemu.close()


@pytest.mark.parametrize("paused", [False, True], ids=["autostart", "paused"])
def test_incoming_migration_announces(two_hosts, tmp_path, paused):
    """The destination announces after loading, with the parameters it has then; the source does
    not.  A destination without autostart (``-S``) announces too, but its frames leave at ``cont``."""
    a, b = two_hosts
    # Each VM's NIC sends out of its own end; the capture on the other end sees the other VM's frames.
    capture_at_b = Capture(b.netns, b.link)
    capture_at_a = Capture(a.netns, a.link)
    src_mac, dst_mac = MAC, MAC2
    src = a.run(tmp_path / "src.sock", tmp_path / "src.log", "-m", "32M", *nic_args("raw", a.link, src_mac, "n0"))
    dst = b.run(tmp_path / "dst.sock", tmp_path / "dst.log", "-m", "32M", *nic_args("raw", b.link, dst_mac, "n0"),
                "--incoming", f"tcp:{b.address}:4444", *(["-S"] if paused else []))
    try:
        params = dict(initial=30, max=100, rounds=4, step=40)
        dst.cmd("migrate-set-parameters", **{f"announce-{k}": v for k, v in params.items()})
        src.cmd("migrate", uri=f"tcp:{b.address}:4444")
        assert src.wait_migration({"completed", "failed"}, timeout=60)["status"] == "completed"
        assert dst.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
        if paused:
            assert capture_at_a.frames(1, 1.5) == []
            dst.cmd("cont")
            held = capture_at_a.frames(params["rounds"], 3)
            assert [d for _, d in held] == [self_announce_frame(dst_mac)] * params["rounds"]
        else:
            check_schedule(capture_at_a.frames(params["rounds"], 3), dst_mac, params)
        assert capture_at_b.frames(1, 0.5) == []
    finally:
        src.close()
        dst.close()
        capture_at_a.close()
        capture_at_b.close()
