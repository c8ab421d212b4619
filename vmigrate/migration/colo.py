"""COLO checkpointing between a primary and a secondary (QEMU 7.2's migration/colo.c, docs/colo.md).

After the first precopy, the primary keeps running its guest and, every
``x-checkpoint-delay`` ms, stops it, sends what changed since the last
checkpoint (the live sections' END records, then the device state behind
``vmstate-size``) and resumes it once the secondary has loaded it.  The
messages are docs/qemu/colo.md §2's raw be32 values over the main channel
and its reverse direction.

The secondary's guest runs between checkpoints, as QEMU's does (lock-step).
It keeps a checkpoint's records until the whole checkpoint, device state
included, has arrived: only then, with its guest stopped, does it put back
what its guest wrote since the last one (:class:`RamCache`) and apply them, so
a checkpoint cut off by the primary's death is never half applied.  A
failover (``x-colo-lost-heartbeat``) lets it run on alone.

:class:`ColoState` is the process's COLO mode and failover state
(colo-failover.c), shared by both directions and by the QMP commands.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from vmigrate.machine.memory import RAMBlock
from vmigrate.machine.runstate import RunState
from vmigrate.machine.vcpus import VcpuBackend
from vmigrate.migration.channel import Channel, ChannelError
from vmigrate.migration.errors import MigrationError
from vmigrate.migration.qemu_file import QEMUFileOut
from vmigrate.migration.savevm import LoadContext, LoadError, SaveVM, SaveVMHandlers, SectionRegistry
from vmigrate.migration.wire import NEED_DATA, WireError, colo as wire_colo, stream
from vmigrate.migration.wire.colo import ColoMessage
from vmigrate.trace import trace

log = logging.getLogger(__name__)

#: What ends the COLO loop: the channel broke, a message was wrong, the secondary refused a load.
COLO_ERRORS = (ChannelError, WireError, LoadError, OSError)
#: The secondary's dirty-log client: pages its own guest wrote since the last checkpoint.
DIRTY_CLIENT = "colo"


class Failover(enum.Enum):
    """QAPI's FailoverStatus (colo-failover.c); ``relaunch`` is not needed here (see apply lock)."""

    NONE = "none"
    REQUIRE = "require"
    ACTIVE = "active"
    COMPLETED = "completed"


class ColoState:
    """The COLO mode, last mode and failover state of this process, and the failover request.

    The engine of the running direction registers its failover work
    (:meth:`engaged`); ``x-colo-lost-heartbeat`` runs it on the monitor's
    thread, as QEMU's failover bottom half runs on the main loop.
    """

    def __init__(self, emit: Callable[[str, dict | None], None]) -> None:
        self._emit = emit
        self._lock = threading.Lock()
        self.mode = "none"
        self.last_mode = "none"
        self.failover = Failover.NONE
        self._do_failover: Callable[[], None] | None = None
        self._completed = threading.Event()

    def engaged(self, mode: str, do_failover: Callable[[], None]) -> None:
        """The status became ``colo`` in *mode* (primary/secondary)."""
        with self._lock:
            self.mode = mode
            self.failover = Failover.NONE
            self._do_failover = do_failover
            self._completed.clear()

    def disengaged(self) -> None:
        """The status never became ``colo`` after all (the attempt was cancelled at its end)."""
        with self._lock:
            self.mode = "none"
            self._do_failover = None

    def query(self) -> dict:
        """query-colo-status: the reason follows the failover state (qmp_query_colo_status)."""
        failover = self.failover
        if failover == Failover.NONE:
            reason = "none"
        elif failover == Failover.COMPLETED:
            reason = "request"
        else:
            reason = "processing" if self.mode != "none" else "error"
        return {"mode": self.mode, "last-mode": self.last_mode, "reason": reason}

    def lost_heartbeat(self) -> None:
        """x-colo-lost-heartbeat: none -> require -> active, the engine's failover, completed."""
        with self._lock:
            if self.mode == "none":
                raise MigrationError("The feature 'colo' is not enabled")
            if self.failover != Failover.NONE:
                raise MigrationError("COLO failover is already activated")
            self.failover = Failover.ACTIVE
            do_failover = self._do_failover
            self.last_mode = self.mode
        trace("colo_failover", mode=self.last_mode)
        do_failover()
        with self._lock:
            self.failover = Failover.COMPLETED
            self.mode = "none"
        self._completed.set()

    def wait_failover(self, timeout: float | None) -> bool:
        """Wait for a failover (QEMU's checkpoint timer wait and colo_exit_sem); True once done."""
        return self._completed.wait(timeout)

    def exit_event(self, mode: str) -> None:
        """COLO_EXIT when the loop ends: ``request`` when a failover ended it (the failover may
        still be finishing on the monitor's thread), else ``error``."""
        reason = "error" if self.failover == Failover.NONE else "request"
        self._emit("COLO_EXIT", {"mode": mode, "reason": reason})


class MessageReader:
    """Reads COLO messages and byte counts from a channel, after bytes already received."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._pending = bytearray()

    def unread(self, data: bytes) -> None:
        self._pending[:0] = data

    def read_exact(self, n: int) -> bytes:
        while len(self._pending) < n:
            data = self.channel.read(max(n - len(self._pending), 65536))
            if not data:
                raise ChannelError("COLO: the peer closed the channel")
            self._pending += data
        out = bytes(self._pending[:n])
        del self._pending[:n]
        return out

    def read_some(self) -> bytes:
        """What is buffered, or the next read of the channel."""
        if self._pending:
            out = bytes(self._pending)
            self._pending.clear()
            return out
        data = self.channel.read(4 * 1024 * 1024)
        if not data:
            raise ChannelError("COLO: the peer closed the channel")
        return data

    def expect(self, msg: ColoMessage) -> None:
        wire_colo.decode_message(self.read_exact(4), msg)
        trace("colo_receive_message", msg=msg.qapi_name)


@dataclass
class CheckpointStats:
    """Beyond QEMU: the primary's checkpoint figures (``x-vmigrate-colo`` in query-migrate)."""

    checkpoints: int = 0
    last_downtime_ms: float = 0.0
    last_bytes: int = 0
    total_bytes: int = 0

    def to_qmp(self) -> dict:
        return {"checkpoints": self.checkpoints, "last-downtime-ms": round(self.last_downtime_ms, 3),
                "last-bytes": self.last_bytes, "total-bytes": self.total_bytes}


class ColoPrimary:
    """The primary's COLO thread body (colo_process_checkpoint), run by the migration thread."""

    def __init__(self, state: ColoState, channel: Channel, f: QEMUFileOut, saver: SaveVM, runstate: RunState,
                 delay_ms: Callable[[], int], on_failover: Callable[[], None], stats: CheckpointStats,
                 sent_bytes: Callable[[], int]) -> None:
        """*on_failover* ends the migration (status ``colo`` -> ``completed``); *delay_ms* is the
        current ``x-checkpoint-delay``, read before each wait as QEMU does; *stats* get the figures,
        with bytes from *sent_bytes* (main and multifd channels)."""
        self.state = state
        self.channel = channel
        self.f = f
        self.saver = saver
        self.runstate = runstate
        self.delay_ms = delay_ms
        self.on_failover = on_failover
        self.stats = stats
        self.sent_bytes = sent_bytes

    def cancel(self) -> None:
        """migrate_cancel in ``colo``: QEMU 7.2 only shuts the channel (migrate_fd_cancel's
        return-path shutdown; the status is not a running one), so the next checkpoint fails
        and the primary, its guest still running, waits for its failover."""
        self.channel.shutdown()

    def _failover(self) -> None:
        """primary_vm_do_failover: end the migration, wake the thread blocked on the channel."""
        self.on_failover()
        self.channel.shutdown()

    def engage(self) -> None:
        """Primary mode, before the status shows ``colo`` (query-colo-status agrees with it)."""
        self.state.engaged("primary", self._failover)

    def run(self, ready: bool) -> None:
        """*ready*: the secondary's CHECKPOINT_READY was already read (by the return-path reader)."""
        reader = MessageReader(self.channel)
        try:
            if not ready:
                reader.expect(ColoMessage.CHECKPOINT_READY)
            self.runstate.start()
            while not self.state.wait_failover(self.delay_ms() / 1000):
                self._checkpoint(reader)
        except COLO_ERRORS as err:
            if self.state.failover == Failover.NONE:
                log.error("COLO primary: %s", err)
        self.state.exit_event("primary")
        self.state.wait_failover(None)
        # The failover may have caught a checkpoint with the guest stopped: the primary goes on alone.
        if not self.runstate.running:
            self.runstate.start()

    def _send(self, msg: ColoMessage) -> None:
        self.f.put(wire_colo.message(msg))
        self.f.flush()

    def _checkpoint(self, reader: MessageReader) -> None:
        """colo_do_checkpoint_transaction: the guest is stopped from the reply to the load."""
        trace("colo_checkpoint", n=self.stats.checkpoints + 1)
        self._send(ColoMessage.CHECKPOINT_REQUEST)
        reader.expect(ColoMessage.CHECKPOINT_REPLY)
        start = time.monotonic()
        sent = self.sent_bytes()
        self.runstate.force_stop("colo")
        self._send(ColoMessage.VMSTATE_SEND)
        self.saver.colo_live_state()
        devices = self.saver.colo_device_state()
        self.f.put(wire_colo.vmstate_size(len(devices)))
        self.f.put(devices)
        self.f.flush()
        reader.expect(ColoMessage.VMSTATE_RECEIVED)
        reader.expect(ColoMessage.VMSTATE_LOADED)
        self.runstate.start()
        stats = self.stats
        stats.checkpoints += 1
        stats.last_downtime_ms = (time.monotonic() - start) * 1000
        stats.last_bytes = self.sent_bytes() - sent
        stats.total_bytes += stats.last_bytes


class RamCache:
    """The secondary's copy of the primary's RAM as of the last checkpoint (QEMU's colo_cache,
    colo_init_ram_cache / colo_flush_ram_cache in ram.c), while its own guest runs ahead of it.

    At a checkpoint, with the guest stopped, :meth:`revert` puts back what the secondary's
    guest wrote since the last one (the dirty log); the checkpoint is then loaded into guest
    RAM as usual, which then equals the primary's, and :meth:`commit` copies the pages it
    loaded into the cache.  Costs a second copy of guest RAM, as in QEMU.
    """

    def __init__(self, blocks: list[RAMBlock], dirty_log: VcpuBackend) -> None:
        self.blocks = blocks
        self.dirty_log = dirty_log
        self.copies = {b.idstr: b.pages.copy() for b in blocks}
        #: The pages each checkpoint loaded, marked by the RAM loader (LoadContext.colo_received).
        self.received = {b.idstr: np.zeros(b.npages, dtype=np.bool_) for b in blocks}
        for block in blocks:
            block.dirty.start(DIRTY_CLIENT)
        dirty_log.dirty_log_start()

    def revert(self) -> int:
        """The guest is stopped: its writes since the last checkpoint go; returns how many pages."""
        self.dirty_log.dirty_log_sync()
        reverted = 0
        for block in self.blocks:
            written = np.zeros(block.npages, dtype=np.bool_)
            block.dirty.collect_into(DIRTY_CLIENT, written)
            pages = np.flatnonzero(written)
            block.pages[pages] = self.copies[block.idstr][pages]
            reverted += pages.size
        return reverted

    def commit(self) -> None:
        """The checkpoint is in guest RAM: its pages become the cache's."""
        for block in self.blocks:
            received = self.received[block.idstr]
            pages = np.flatnonzero(received)
            self.copies[block.idstr][pages] = block.pages[pages]
            received[:] = False

    def close(self) -> None:
        self.dirty_log.dirty_log_stop()
        for block in self.blocks:
            block.dirty.stop(DIRTY_CLIENT)
        self.copies.clear()


class ColoSecondary:
    """The secondary's COLO incoming thread body (colo_process_incoming_thread)."""

    def __init__(self, state: ColoState, channel: Channel, registry: SectionRegistry, ctx: LoadContext,
                 sections: dict, bodies: dict, runstate: RunState, cache: RamCache) -> None:
        """*sections* are the stream's sections by id from the first load (END records name
        them by id) and *bodies* its body decoders, which go on from where it stopped (QEMU's
        last received block persists too).  The guest runs between checkpoints (*runstate*),
        *cache* keeps the primary's RAM.  The caller ends the incoming migration once
        :meth:`run` returns, after starting the guest."""
        self.state = state
        self.channel = channel
        self.registry = registry
        self.ctx = ctx
        self.sections = sections
        self.bodies = bodies
        self.runstate = runstate
        self.cache = cache
        self.checkpoints = 0
        #: Held while a checkpoint is applied: a failover waits for it rather than relaunching.
        self._apply = threading.Lock()

    def _failover(self) -> None:
        """secondary_vm_do_failover's wake-up of the thread, after any checkpoint being applied."""
        with self._apply:
            self.channel.shutdown()

    def engage(self) -> None:
        """Secondary mode, before the status shows ``colo`` (query-colo-status agrees with it)."""
        self.state.engaged("secondary", self._failover)

    def run(self) -> None:
        """Checkpoints until a failover; returns once one is complete (the caller starts the guest)."""
        reader = MessageReader(self.channel)
        live = [s for s in self.registry.live if s.is_active(self.ctx.config)]
        self.ctx.colo_received = self.cache.received
        try:
            for s in live:
                s.load_setup(self.ctx)
            self.runstate.start()
            self.channel.write(wire_colo.message(ColoMessage.CHECKPOINT_READY))
            while True:
                reader.expect(ColoMessage.CHECKPOINT_REQUEST)
                self.runstate.force_stop("colo")
                self.channel.write(wire_colo.message(ColoMessage.CHECKPOINT_REPLY))
                reader.expect(ColoMessage.VMSTATE_SEND)
                cache = self._receive_live(reader)
                wire_colo.decode_message(reader.read_exact(4), ColoMessage.VMSTATE_SIZE)
                devices = reader.read_exact(wire_colo.decode_size(reader.read_exact(8)))
                self.channel.write(wire_colo.message(ColoMessage.VMSTATE_RECEIVED))
                with self._apply:
                    if self.state.failover != Failover.NONE:
                        break
                    self._load(live, cache, devices)
                    self.runstate.start()
                self.checkpoints += 1
                self.channel.write(wire_colo.message(ColoMessage.VMSTATE_LOADED))
        except COLO_ERRORS as err:
            if self.state.failover == Failover.NONE:
                log.error("COLO secondary: %s", err)
        finally:
            self.ctx.colo = False
            self.ctx.colo_received = None
            for s in live:
                s.load_cleanup()
            self.cache.close()
        self.state.exit_event("secondary")
        self.state.wait_failover(None)

    def _receive_live(self, reader: MessageReader) -> list[tuple[str, object]]:
        """The live sections' END records up to EOF, cached, not applied (the RAM cache of
        colo_init_ram_cache); what follows EOF goes back to *reader*."""
        decoder = stream.StreamDecoder(self.bodies, header=False, require_configuration=False,
                                       sections_seen=self.sections)
        cache: list[tuple[str, object]] = []
        section: str | None = None
        while True:
            decoder.feed(reader.read_some())
            while (event := decoder.next_event()) is not NEED_DATA:
                if isinstance(event, stream.EOF):
                    reader.unread(decoder.take_rest())
                    return cache
                if isinstance(event, stream.SectionEnd):
                    section = event.idstr
                elif isinstance(event, stream.SectionFooter):
                    section = None
                elif section is not None:
                    cache.append((section, event))
                else:
                    raise WireError(f"COLO: unexpected {type(event).__name__} in a checkpoint")

    def _load(self, live: list[SaveVMHandlers], cache: list[tuple[str, object]], devices: bytes) -> None:
        """colo_flush_ram_cache and the device state: the checkpoint is complete."""
        reverted = self.cache.revert()
        by_name = {s.idstr: s for s in live}
        for idstr, event in cache:
            by_name[idstr].load_state(event)
        self.cache.commit()
        self.registry.load_device_state(devices, header=False)
        trace("colo_flush_ram_cache", reverted=reverted)

