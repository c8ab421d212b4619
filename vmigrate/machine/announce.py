"""Self-announce: RARP broadcasts from each NIC's MAC, so switches relearn where the VM now is.

QEMU 7.2's net/announce.c (docs/qemu/misc.md §1): a burst is one 60-byte RARP frame per NIC,
sent at once and then ``rounds - 1`` more times, the gaps growing from ``initial`` by ``step``
and capped at ``max`` (qemu_announce_timer_step).  It runs on a destination once an incoming
migration has loaded (process_incoming_migration_bh, loadvm_postcopy_handle_run_bh) with the
migration parameters ``announce-*`` of that moment, and on ``announce-self``, whose ``id``
names a timer of its own (calling again with the same id restarts it).

The frame builder and the schedule are pure; :class:`Announcer` runs each timer on a thread
of its own so that neither the QMP loop nor the incoming thread waits for the rounds.
"""

from __future__ import annotations

import itertools
import logging
import struct
import threading
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

log = logging.getLogger(__name__)

ETH_P_RARP = 0x8035
ARP_HTYPE_ETH = 0x0001
ARP_PTYPE_IP = 0x0800
ARP_OP_REQUEST_REV = 3
#: Ethernet's minimum frame without the FCS, which the hardware adds.
FRAME_LEN = 60


class AnnounceNic(Protocol):
    """What announcing needs of a NIC (vmigrate/machine/net.py): its name, its MAC, a way out."""

    @property
    def id(self) -> str: ...

    @property
    def mac(self) -> bytes: ...

    def send(self, frame: bytes) -> None: ...


@dataclass(frozen=True)
class AnnounceParameters:
    """QAPI's AnnounceParameters (qapi/net.json): times in ms; ``rounds < 0`` never ends."""

    initial: int
    max: int
    rounds: int
    step: int
    #: Only the NICs named here; None: every NIC.
    interfaces: tuple[str, ...] | None = None
    #: The timer's name; QEMU's qmp_announce_self makes an absent id "".
    id: str = ""

    @classmethod
    def from_qmp(cls, args: dict) -> "AnnounceParameters":
        interfaces = args.get("interfaces")
        return cls(args["initial"], args["max"], args["rounds"], args["step"],
                   None if interfaces is None else tuple(interfaces), args.get("id", ""))

    def includes(self, nic_id: str) -> bool:
        return self.interfaces is None or nic_id in self.interfaces


def self_announce_frame(mac: bytes) -> bytes:
    """The RARP reverse request QEMU sends for *mac* (announce_self_create), padded to 60 bytes."""
    if len(mac) != 6:
        raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
    frame = (b"\xff" * 6 + mac + struct.pack("!HHHBBH", ETH_P_RARP, ARP_HTYPE_ETH, ARP_PTYPE_IP, 6, 4,
                                             ARP_OP_REQUEST_REV)
             + mac + bytes(4) + mac + bytes(4))
    return frame.ljust(FRAME_LEN, b"\0")


def announce_delays(params: AnnounceParameters) -> Iterator[int]:
    """The ms between consecutive bursts: ``rounds - 1`` of them (endless for ``rounds < 0``).

    qemu_announce_timer_step: ``initial + k * step`` before the k+1-th re-arm, and ``max`` where
    that is negative or above ``max``.
    """
    if params.rounds == 0:
        return
    gaps = itertools.count() if params.rounds < 0 else range(params.rounds - 1)
    for k in gaps:
        delay = params.initial + k * params.step
        yield params.max if delay < 0 or delay > params.max else delay


class _Timer:
    """One running schedule: a thread that sends the bursts until done or stopped."""

    def __init__(self, nics: Sequence[AnnounceNic], params: AnnounceParameters) -> None:
        self.params = params
        self._nics = nics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="announce", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self.params.rounds == 0:
            return
        self._burst()
        for delay in announce_delays(self.params):
            if self._stop.wait(max(delay, 0) / 1000):
                return
            self._burst()

    def _burst(self) -> None:
        """qemu_announce_self_iter over every NIC the parameters name."""
        for nic in self._nics:
            if not self.params.includes(nic.id):
                continue
            try:
                nic.send(self_announce_frame(nic.mac))
            except OSError as err:
                # QEMU drops what its backend cannot take; the next round tries again.
                log.debug("announce on %s: %s", nic.id, err)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


#: The incoming migration's timer (QEMU's MigrationIncomingState.announce_timer), apart from
#: the named ones of ``announce-self``.
MIGRATION_TIMER = object()


class Announcer:
    """A VM's announce timers: the incoming migration's, and ``announce-self``'s by id."""

    def __init__(self, nics: Sequence[AnnounceNic]) -> None:
        self._nics = tuple(nics)
        self._timers: dict[object, _Timer] = {}
        self._lock = threading.Lock()

    def announce_self(self, params: AnnounceParameters) -> None:
        """``announce-self``: (re)start the timer named ``params.id``."""
        self._restart(params.id, params)

    def after_migration(self, params: AnnounceParameters) -> None:
        """An incoming migration loaded: (re)start the migration's timer, on every NIC."""
        self._restart(MIGRATION_TIMER, params)

    def _restart(self, key: object, params: AnnounceParameters) -> None:
        with self._lock:
            old = self._timers.pop(key, None)
            if old is not None:
                old.stop()
            if self._nics:
                self._timers[key] = _Timer(self._nics, params)

    def close(self) -> None:
        with self._lock:
            for timer in self._timers.values():
                timer.stop()
            self._timers.clear()
