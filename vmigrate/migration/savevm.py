"""The section registry and both directions of the section loop (QEMU's migration/savevm.c).

A VM registers what it migrates in one :class:`SectionRegistry`, in stream
order: live sections (:class:`SaveVMHandlers`, QEMU's ``SaveVMHandlers``:
block, RAM, dirty bitmaps) and device models saved whole in the downtime
(QEMU's vmstate registrations).  A ``-M none`` vmigrate VM registers what
``qemu-system-x86_64 -M none`` does with the same section ids, so its
stream is what a QEMU 7.2 destination of that machine expects: ``timer``
(id 0), ``block`` (id 1, live, only with the ``block`` capability), ``ram``
(id 2, live), ``dirty-bitmap`` (id 3, live, only with ``dirty-bitmaps``),
``globalstate`` (id 4).

:class:`SaveVM` writes one outgoing attempt's stream (docs/qemu/stream.md
§6 order: header, configuration, START sections, PART sections, END
sections, FULL sections, EOF, vmdesc); :class:`LoadVM` reads an incoming
stream and hands each section's records to the section that owns them.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Callable, Protocol

from vmigrate.machine.memory import PAGE_SIZE
from vmigrate.migration.channel import Channel, ChannelError
from vmigrate.migration.config import Capabilities, MigrationConfig
from vmigrate.migration.qemu_file import QEMUFileIn, QEMUFileOut
from vmigrate.migration.rate_limit import RateLimiter
from vmigrate.migration.stats import CompressionStats, RamStats, XbzrleStats
from vmigrate.migration.wire import WireError, stream, vmstate
from vmigrate.trace import trace

if TYPE_CHECKING:
    import numpy as np

    from vmigrate.machine.devices import DeviceModel
    from vmigrate.machine.write_tracking import WriteTracking
    from vmigrate.migration.multifd import MultifdSender
    from vmigrate.migration.postcopy import PageRequests
    from vmigrate.migration.postcopy_incoming import PostcopyIncoming

log = logging.getLogger(__name__)

#: x86's target page: 4 KiB.
TARGET_PAGE_BITS = 12
#: Capability names a configuration section may carry (QEMU's get_capability knows its enum).
KNOWN_CAPABILITIES = frozenset(f.name.replace("_", "-") for f in fields(Capabilities))


class LoadError(Exception):
    """A stream that is valid on the wire but not acceptable for this VM."""


@dataclass
class SaveContext:
    """What one outgoing attempt lends its live sections (QEMU hands them the MigrationState)."""

    config: MigrationConfig
    file: QEMUFileOut
    limiter: RateLimiter
    stats: RamStats
    xbzrle_stats: XbzrleStats
    compression_stats: CompressionStats
    multifd: "MultifdSender | None"
    #: 'precopy', 'downtime' or 'postcopy': which byte counter the bytes sent now go to.
    phase: Callable[[], str]
    #: A dirty-log sync ended a pass (``MIGRATION_PASS``); gets the sync count.
    on_sync: Callable[[int], None]
    #: A ≥1 s dirty-rate period ended (auto-converge); gets (dirty bytes, transferred bytes).
    on_period: Callable[[int, int], None]
    #: A postcopy destination's page requests (None without ``postcopy-ram``).
    page_requests: "PageRequests | None" = None
    #: The postcopy-preempt channel, for requested pages (None without ``postcopy-preempt``).
    preempt: QEMUFileOut | None = None
    #: A background snapshot's write protection (None otherwise): no dirty log, faults first.
    write_tracking: "WriteTracking | None" = None


@dataclass
class LoadContext:
    """What one incoming attempt lends its sections."""

    config: MigrationConfig
    #: The multifd channels, in channel-id order (empty without multifd).
    multifd_channels: list[Channel] = field(default_factory=list)
    #: The postcopy state of an attempt with ``postcopy-ram`` (None without).
    postcopy: "PostcopyIncoming | None" = None
    #: False when the guest has run before this load (snapshot-load): its RAM holds data, so
    #: no page of anonymous memory can be assumed zero.
    ram_fresh: bool = True
    #: The stream carried ENABLE_COLO: COLO's checkpoints follow the load, over its multifd
    #: channels too; cleared when COLO ends, so the last cleanup closes them.
    colo: bool = False
    #: A COLO secondary's checkpoints: the pages each one loaded, by block (docs/colo.md).
    colo_received: "dict[str, np.ndarray] | None" = None
    #: Ends the load from another thread with a reason (a multifd channel failed): the main
    #: channel's reads stop, which the source's stream may not do for a long time.
    abort: Callable[[str], None] = lambda desc: None


class SaveVMHandlers(Protocol):
    """A live section: sent in START/PART/END pieces while the guest runs, loaded piece by piece."""

    idstr: str
    instance_id: int
    section_id: int
    version_id: int

    def is_active(self, config: MigrationConfig) -> bool: ...  # takes part in this attempt (QEMU's is_active)

    def is_active_iterate(self, ctx: SaveContext) -> bool: ...  # gets a PART now (QEMU's is_active_iterate)

    def save_setup(self, ctx: SaveContext) -> None: ...  # the START body

    def save_iterate(self, ctx: SaveContext) -> bool: ...  # a PART body; True when nothing was left

    def pending_estimate(self) -> int: ...  # bytes still to send, cheaply

    def pending_exact(self) -> int: ...  # bytes still to send, after syncing the dirty log

    @property
    def first_copy_done(self) -> bool: ...  # every byte went out once

    def save_complete(self, ctx: SaveContext) -> None: ...  # the END body, guest stopped

    #: Whether the section goes on after the switch to postcopy (QEMU's has_postcopy).
    supports_postcopy: bool

    def save_postcopy_switch(self, ctx: SaveContext) -> None: ...  # guest stopped, before the device state

    def save_complete_postcopy(self, ctx: SaveContext) -> None: ...  # the END body after postcopy

    def save_postcopy_resume(self, ctx: SaveContext,
                             received: dict[str, "np.ndarray"]) -> None: ...  # a recovery's received bitmaps

    def save_cleanup(self) -> None: ...  # any outcome

    def load_setup(self, ctx: LoadContext) -> stream.BodyDecoder: ...

    def load_state(self, event: object) -> None: ...  # one record of this section's body

    def load_cleanup(self) -> None: ...  # any outcome


class SectionSaver(Protocol):
    """One attempt's source side of a section held by a :class:`SaverSection`."""

    def setup(self) -> None: ...

    def iterate(self) -> bool: ...  # True when nothing was left

    def pending(self) -> int: ...

    def complete(self) -> None: ...

    def cleanup(self) -> None: ...


class SaverSection:
    """A live section whose source side is one :class:`SectionSaver` per attempt.

    ``block`` and ``dirty-bitmap`` share this shape (QEMU's block.c and
    block-dirty-bitmap.c keep their per-migration state in one struct too);
    a subclass makes the saver and says what happens in postcopy.
    """

    supports_postcopy = False

    def __init__(self) -> None:
        self._saver: SectionSaver | None = None

    def make_saver(self, ctx: SaveContext) -> SectionSaver:
        raise NotImplementedError

    def save_setup(self, ctx: SaveContext) -> None:
        self._saver = self.make_saver(ctx)
        self._saver.setup()

    def save_iterate(self, ctx: SaveContext) -> bool:
        return self._saver.iterate()

    def pending_estimate(self) -> int:
        return self._saver.pending()

    def pending_exact(self) -> int:
        return self._saver.pending()

    def save_complete(self, ctx: SaveContext) -> None:
        self._saver.complete()

    def save_postcopy_switch(self, ctx: SaveContext) -> None:
        return None

    def save_complete_postcopy(self, ctx: SaveContext) -> None:
        return None

    def save_postcopy_resume(self, ctx: SaveContext, received: dict) -> None:
        return None

    def save_cleanup(self) -> None:
        saver, self._saver = self._saver, None
        if saver is not None:
            saver.cleanup()


class SectionRegistry:
    """QEMU's ``savevm_state.handlers``: everything that migrates, in stream order."""

    def __init__(self) -> None:
        self.live: list[SaveVMHandlers] = []
        self.devices: list[DeviceModel] = []
        self._before_vm_start: list[Callable[[], None]] = []

    def register_live(self, handlers: SaveVMHandlers) -> None:
        self.live.append(handlers)

    def on_before_vm_start(self, hook: Callable[[], None]) -> None:
        """Run *hook* when an incoming migration hands the guest over to this side."""
        self._before_vm_start.append(hook)

    def before_vm_start(self) -> None:
        """What QEMU runs before starting a migrated guest (dirty_bitmap_mig_before_vm_start)."""
        for hook in self._before_vm_start:
            hook()

    def register_device(self, device: "DeviceModel") -> None:
        self.devices.append(device)

    def device_sections(self) -> list[vmstate.DeviceSection]:
        """Every device's FULL section, its state read now."""
        return [vmstate.DeviceSection(d.section_id, d.idstr, d.instance_id, d.description, d.save())
                for d in self.devices]

    def device_bodies(self) -> dict[str, vmstate.VMStateBodyDecoder]:
        """Body decoders for the device sections, keyed by idstr (one per idstr, all its instances)."""
        instances: dict[str, set[int]] = {}
        descriptions: dict[str, vmstate.Description] = {}
        for d in self.devices:
            instances.setdefault(d.idstr, set()).add(d.instance_id)
            descriptions[d.idstr] = d.description
        return {idstr: vmstate.VMStateBodyDecoder(descriptions[idstr], frozenset(ids))
                for idstr, ids in instances.items()}

    def load_device(self, event: vmstate.DeviceState) -> None:
        for d in self.devices:
            if d.idstr == event.idstr and d.instance_id == event.instance_id:
                d.load(event.values)
                return
        raise LoadError(f"Unknown savevm section or instance '{event.idstr}' {event.instance_id}")

    # -- device-only streams (xen-save-devices-state, docs/qemu/misc.md §5) ---------------------

    def device_state_stream(self) -> bytes:
        """Header, FULL sections, EOF: no configuration section and no RAM (Xen moves the memory)."""
        return b"".join([stream.header(), *(s.encode() for s in self.device_sections()), stream.eof()])

    def load_device_state(self, data: bytes, header: bool = True) -> None:
        """Apply a device-only stream (``xen-load-devices-state``; a COLO checkpoint's has no
        *header*); raises WireError or LoadError."""
        decoder = stream.StreamDecoder(self.device_bodies(), header=header, require_configuration=False)
        decoder.feed(data)
        decoder.close()
        while (event := decoder.next_event()) is not stream.NEED_DATA:
            if isinstance(event, vmstate.DeviceState):
                self.load_device(event)
            elif isinstance(event, stream.EOF):
                return
        raise WireError("device state stream ends before EOF")


class SaveVM:
    """The outgoing section loop of one attempt (QEMU's qemu_savevm_state_*)."""

    def __init__(self, registry: SectionRegistry, ctx: SaveContext, machine_type: str, uuid: str | None) -> None:
        self.registry = registry
        self.ctx = ctx
        self.f = ctx.file
        self.machine_type = machine_type
        self.uuid = uuid
        self._header_sent = False
        self._set_up: list[SaveVMHandlers] = []

    def _live(self) -> list[SaveVMHandlers]:
        """The live sections taking part now: QEMU asks is_active before each use, and the
        dirty-bitmap section drops out after its setup when there was nothing to migrate."""
        return [s for s in self.registry.live if s.is_active(self.ctx.config)]

    def set_file(self, f: QEMUFileOut, preempt: QEMUFileOut | None) -> None:
        """A postcopy recovery's new connections."""
        self.f = self.ctx.file = f
        self.ctx.preempt = preempt

    def postcopy_resume(self, received: dict[str, "np.ndarray"]) -> None:
        """The destination's received bitmaps (block -> one bool per page) after a recovery."""
        for s in self._live():
            if s.supports_postcopy:
                s.save_postcopy_resume(self.ctx, received)

    def _header(self) -> None:
        if self._header_sent:
            return
        self._header_sent = True
        caps = self.ctx.config.caps
        send_uuid = uuidlib.UUID(self.uuid).bytes if self.uuid and caps.validate_uuid else None
        self.f.put(stream.header())
        self.f.put(stream.configuration(self.machine_type, caps=["x-ignore-shared"] if caps.x_ignore_shared else [],
                                        uuid=send_uuid))

    def open_return_path(self) -> None:
        """Header, configuration, then OPEN_RETURN_PATH and PING(1), as QEMU orders them."""
        self._header()
        self.f.put(stream.open_return_path())
        self.f.put(stream.ping(1))
        self.f.flush()

    def setup(self) -> None:
        """Header (unless already sent), POSTCOPY_ADVISE with ``postcopy-ram``, every live section's START."""
        f = self.f
        trace("savevm_state_setup")
        self._header()
        caps = self.ctx.config.caps
        if caps.postcopy_ram:
            f.put(stream.postcopy_advise(PAGE_SIZE, PAGE_SIZE))
        elif caps.dirty_bitmaps:
            # migrate_postcopy() is postcopy-ram or dirty-bitmaps; without RAM postcopy the advise is empty.
            f.put(stream.postcopy_advise(None))
        if caps.x_colo:
            f.put(stream.enable_colo())
        for s in self._live():
            trace("savevm_section_start", id=s.idstr, section_id=s.section_id)
            f.put(stream.section_start(s.section_id, s.idstr, s.instance_id, s.version_id))
            self._set_up.append(s)
            s.save_setup(self.ctx)
            f.put(stream.footer(s.section_id))
        f.flush()

    def iterate(self) -> bool:
        """One PART per live section until the rate limit stops it; True when all were done."""
        f = self.f
        done = True
        for s in self._live():
            if not s.is_active_iterate(self.ctx):
                continue
            if f.rate_limited():
                return False
            f.put(stream.section_part(s.section_id))
            done = s.save_iterate(self.ctx) and done
            f.put(stream.footer(s.section_id))
        f.flush()
        return done

    def pending_estimate(self) -> int:
        return sum(s.pending_estimate() for s in self._live())

    def pending_exact(self) -> int:
        return sum(s.pending_exact() for s in self._live())

    @property
    def first_copy_done(self) -> bool:
        return all(s.first_copy_done for s in self._live())

    def complete(self) -> None:
        """Every live section's END, the device sections, EOF and the VM description."""
        trace("savevm_state_complete_precopy")
        f = self.f
        for s in self._live():
            f.put(stream.section_end(s.section_id))
            s.save_complete(self.ctx)
            f.put(stream.footer(s.section_id))
        f.put(self.non_iterable_state())
        f.flush()

    def non_iterable_state(self) -> bytes:
        """The device sections read now, EOF and the VM description (QEMU's
        qemu_savevm_state_complete_precopy_non_iterable): what ends a stream."""
        devices = self.registry.device_sections()
        return b"".join([*(d.encode() for d in devices), stream.eof(), stream.vmdesc(vmstate.vmdesc_json(devices))])

    def colo_live_state(self) -> None:
        """A COLO checkpoint's live part (qemu_savevm_live_state): every live section's END with
        what changed since the last one, then EOF; no header, no vmdesc (docs/qemu/colo.md §3)."""
        f = self.f
        for s in self._live():
            f.put(stream.section_end(s.section_id))
            s.save_complete(self.ctx)
            f.put(stream.footer(s.section_id))
        f.put(stream.eof())

    def colo_device_state(self) -> bytes:
        """A COLO checkpoint's device state, sent behind ``vmstate-size``: FULL sections and EOF."""
        return b"".join([*(d.encode() for d in self.registry.device_sections()), stream.eof()])

    def postcopy_switch(self) -> None:
        """The guest is stopped: the switch-over of docs/qemu/postcopy.md §3.

        Sections that cannot go on in postcopy end here; the others discard
        what the destination must fault for.  The device state travels in
        one PACKAGED blob between LISTEN and RUN, because the destination
        must read all of it before the main channel can carry pages that
        its faulting guest waits for.
        """
        trace("savevm_state_postcopy_switch")
        f = self.f
        live = self._live()
        for s in live:
            if not s.supports_postcopy:
                f.put(stream.section_end(s.section_id))
                s.save_complete(self.ctx)
                f.put(stream.footer(s.section_id))
        for s in live:
            if s.supports_postcopy:
                s.save_postcopy_switch(self.ctx)
        f.put(stream.ping(2))
        package = b"".join([stream.postcopy_listen(), *(d.encode() for d in self.registry.device_sections()),
                            stream.ping(3), stream.postcopy_run()])
        trace("qemu_savevm_send_packaged", length=len(package))
        f.put(stream.packaged(package))
        f.put(stream.ping(4))
        f.flush()

    def postcopy_iterate(self) -> bool:
        """One PART of each postcopy section; True when all were done."""
        f = self.f
        done = True
        for s in self._live():
            if s.supports_postcopy and s.is_active_iterate(self.ctx):
                f.put(stream.section_part(s.section_id))
                done = s.save_iterate(self.ctx) and done
                f.put(stream.footer(s.section_id))
        f.flush()
        return done

    def complete_postcopy(self) -> None:
        """END of each postcopy section, then EOF: no device state (it went in the package) and no vmdesc."""
        trace("savevm_state_complete_postcopy")
        f = self.f
        for s in self._live():
            if s.supports_postcopy:
                f.put(stream.section_end(s.section_id))
                s.save_complete_postcopy(self.ctx)
                f.put(stream.footer(s.section_id))
        f.put(stream.eof())
        f.flush()

    def cleanup(self) -> None:
        for s in self._set_up:
            s.save_cleanup()
        self._set_up = []


class LoadVM:
    """The incoming section loop (QEMU's qemu_loadvm_state): records to the sections that own them."""

    def __init__(self, registry: SectionRegistry, ctx: LoadContext, machine_type: str, uuid: str | None,
                 on_command: Callable[[stream.Command], None],
                 recover: Callable[[str], QEMUFileIn] | None = None) -> None:
        """*recover* is called when the stream breaks while a postcopy guest runs here: it
        returns the recovery connection's file, or raises to give up (docs/qemu/postcopy.md §7)."""
        self.registry = registry
        self.ctx = ctx
        self.machine_type = machine_type
        self.uuid = uuid
        self.on_command = on_command
        self.recover = recover
        #: The stream's sections by id once loaded: a COLO checkpoint's END records name them so.
        self.sections: dict[int, stream.Section] = {}
        #: The live sections' body decoders, whose state (the last RAM block) COLO goes on with.
        self.bodies: dict[str, stream.BodyDecoder] = {}

    def run(self, fin: QEMUFileIn) -> None:
        """Read and apply the whole stream (up to EOF and the optional vmdesc)."""
        live = {s.idstr: s for s in self.registry.live}
        set_up: list[SaveVMHandlers] = []
        try:
            bodies: dict[str, stream.BodyDecoder] = {}
            for s in self.registry.live:
                set_up.append(s)
                bodies[s.idstr] = s.load_setup(self.ctx)
            bodies.update(self.registry.device_bodies())
            decoder = stream.StreamDecoder(bodies, known_capabilities=KNOWN_CAPABILITIES)
            while True:
                try:
                    self._read(fin, decoder, live)
                    self.sections = dict(decoder.sections)
                    self.bodies = {s.idstr: bodies[s.idstr] for s in self.registry.live}
                    return
                except (WireError, LoadError, ChannelError, OSError) as err:
                    if not self._recoverable():
                        raise
                    fin = self.recover(str(err))
                # The recovery connection goes on mid-stream: no header, no configuration.
                decoder = stream.StreamDecoder(bodies, header=False, require_configuration=False,
                                               sections_seen=decoder.sections)
        finally:
            for s in set_up:
                s.load_cleanup()

    def _recoverable(self) -> bool:
        postcopy = self.ctx.postcopy
        return self.recover is not None and postcopy is not None and postcopy.running

    def _read(self, fin: QEMUFileIn, decoder: stream.StreamDecoder, live: dict[str, SaveVMHandlers]) -> None:
        section: SaveVMHandlers | None = None
        seen_eof = False
        while True:
            chunk = fin.read_chunk()
            if not chunk:
                if seen_eof:
                    return
                raise LoadError("unexpected end of migration stream")
            decoder.feed(chunk)
            while True:
                try:
                    event = decoder.next_event()
                except WireError as err:
                    if not seen_eof:
                        raise
                    # After EOF the state is loaded: QEMU only tries to read the VM description
                    # and warns about anything else (qemu_loadvm_state, migration/savevm.c).
                    log.warning("%s", err)
                    return
                if event is stream.NEED_DATA:
                    break
                if isinstance(event, (stream.SectionStart, stream.SectionFull, stream.SectionPart,
                                      stream.SectionEnd)):
                    trace("qemu_loadvm_state_section", type=type(event).__name__, id=event.idstr)
                    section = live.get(event.idstr)
                elif isinstance(event, stream.SectionFooter):
                    section = None
                elif isinstance(event, vmstate.DeviceState):
                    self.registry.load_device(event)
                elif isinstance(event, stream.Configuration):
                    self._check_configuration(event)
                elif isinstance(event, stream.Command):
                    trace("loadvm_process_command", cmd=event.name, len=len(event.payload))
                    self.on_command(event)
                elif isinstance(event, stream.EOF):
                    seen_eof = True
                    if self.ctx.postcopy is not None and self.ctx.postcopy.placing:
                        # A postcopy source sends no VM description and waits for SHUT.
                        return
                elif isinstance(event, stream.VMDescription):
                    return
                elif section is not None:
                    section.load_state(event)

    def _check_configuration(self, cfg: stream.Configuration) -> None:
        """QEMU's configuration_post_load (migration/savevm.c), with its texts."""
        received = _machine_name(cfg.machine, self.machine_type)
        if received is not None:
            raise LoadError(f"Machine type received is '{received}' and local is '{self.machine_type}'")
        if cfg.target_page_bits is not None and cfg.target_page_bits != TARGET_PAGE_BITS:
            raise LoadError(f"Received TARGET_PAGE_BITS is {cfg.target_page_bits} but local is {TARGET_PAGE_BITS}")
        local = self.ctx.config.caps.x_ignore_shared
        remote = "x-ignore-shared" in cfg.capabilities
        if local != remote:
            raise LoadError(
                f"Capability x-ignore-shared is {'on' if local else 'off'}, "
                f"but received capability is {'on' if remote else 'off'}"
            )
        if cfg.uuid is not None and self.uuid is not None:
            received = str(uuidlib.UUID(bytes=bytes(cfg.uuid)))
            if received != self.uuid:
                raise LoadError(f"UUID received is {received} and local is {self.uuid}")


def _machine_name(received: str, local: str) -> str | None:
    """None when QEMU accepts *received* for *local*, else the name as its error prints it.

    QEMU compares with ``strncmp(received, local, len(received))``: a trailing NUL
    (``none\\0``) passes, and so does a prefix of the local name; the message prints the
    received name up to its first NUL.
    """
    shown = received.split("\0", 1)[0]
    if shown == local or (len(shown) == len(received) and local.startswith(shown)):
        return None
    return shown
