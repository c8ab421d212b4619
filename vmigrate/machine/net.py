"""The VM's NICs: a MAC address on a host network backend, used only to announce the VM.

The guest programs send nothing on the network, so a NIC here is the part of QEMU's NIC +
netdev pair that self-announce uses (net/announce.c: qemu_send_packet_raw on the NIC's queue,
which the backend writes out).  Two backends:

* ``tap``: a tap interface, made (or attached to) through /dev/net/tun with TUNSETIFF, as
  QEMU's ``-netdev tap,ifname=NAME`` (net/tap-linux.c), without a vnet header;
* ``raw``: an AF_PACKET socket bound to an existing interface (a veth end, say), which sends
  frames out of it as they are.

``--nic KIND,ifname=NAME[,mac=MAC][,id=ID]``: *id* is what ``announce-self``'s
``interfaces`` names (QEMU's NIC name); it defaults to ``nicN`` and the MAC to QEMU's
default series 52:54:00:12:34:56 + N (net/net.c qemu_macaddr_default_if_unset).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
DEFAULT_MAC = bytes.fromhex("525400123456")
#: Frames a stopped VM's NIC holds at most (net/net.c: a netdev's queue of 10000 packets);
#: beyond it they are dropped.
HELD_MAX = 10000


class NicError(ValueError):
    """A ``--nic`` that cannot be parsed or opened."""


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        raise NicError(f"invalid MAC address '{text}'")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise NicError(f"invalid MAC address '{text}'") from None


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


@dataclass(frozen=True)
class NicSpec:
    """One ``--nic``, parsed."""

    kind: str
    ifname: str
    mac: bytes
    id: str

    @classmethod
    def parse(cls, text: str, index: int) -> "NicSpec":
        kind, *pairs = text.split(",")
        if kind not in ("tap", "raw"):
            raise NicError(f"--nic: unknown kind '{kind}' (this build has: tap, raw)")
        options: dict[str, str] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in ("ifname", "mac", "id"):
                raise NicError(f"--nic: invalid parameter '{pair}'")
            options[key] = value
        ifname = options.get("ifname", "")
        if not ifname or len(ifname.encode()) >= IFNAMSIZ:
            raise NicError("--nic: ifname= must name an interface (at most 15 bytes)")
        if "mac" in options:
            mac = parse_mac(options["mac"])
        else:
            mac = DEFAULT_MAC[:5] + bytes([(DEFAULT_MAC[5] + index) & 0xFF])
        return cls(kind, ifname, mac, options.get("id", f"nic{index}"))


class Nic:
    """An open NIC: frames given to :meth:`send` leave through its backend while the VM runs.

    While it does not, QEMU holds them (net/net.c qemu_can_send_packet is false when the VM is
    not running; net/queue.c queues the packet) and sends them when the VM starts
    (net_vm_change_state_handler): an announcement on a stopped VM leaves at ``cont``, at once.
    """

    def __init__(self, spec: NicSpec, fd: int) -> None:
        self.spec = spec
        self._fd = fd
        self._lock = threading.Lock()
        self._running = False
        self._held: list[bytes] = []

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def mac(self) -> bytes:
        return self.spec.mac

    def send(self, frame: bytes) -> None:
        """One frame out, or held while the VM is stopped; OSError where the backend refuses it
        (a tap whose interface is down answers EIO)."""
        with self._lock:
            if not self._running:
                if len(self._held) < HELD_MAX:
                    self._held.append(frame)
                return
            os.write(self._fd, frame)

    def set_running(self, running: bool) -> None:
        """The VM started or stopped; on start the held frames go out, in order."""
        with self._lock:
            self._running = running
            held, self._held = (self._held, []) if running else ([], self._held)
            for frame in held:
                try:
                    os.write(self._fd, frame)
                except OSError as err:
                    log.debug("NIC %s: a held frame dropped: %s", self.id, err)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _open_tap(ifname: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    os.set_blocking(fd, False)
    return fd


def _open_raw(ifname: str) -> int:
    # Protocol 0: the socket receives nothing, it only sends.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.bind((ifname, 0))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock.detach()


def open_nic(spec: NicSpec) -> Nic:
    """Open *spec*'s backend; NicError with the reason where the host refuses."""
    opener = _open_tap if spec.kind == "tap" else _open_raw
    try:
        fd = opener(spec.ifname)
    except OSError as err:
        raise NicError(f"--nic {spec.kind},ifname={spec.ifname}: {err.strerror or err}") from None
    log.info("NIC %s: %s %s, MAC %s", spec.id, spec.kind, spec.ifname, format_mac(spec.mac))
    return Nic(spec, fd)
