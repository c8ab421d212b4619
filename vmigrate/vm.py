"""One VM process: guest RAM, vCPUs, run state, QMP monitors and migration.

:class:`VM` assembles the pieces from a :class:`VMConfig` and owns the
asyncio loop that serves QMP.  It registers what migrates in the section
registry and hands the migration engine a narrow
:class:`~vmigrate.migration.port.MigrationHost`, never itself.  Threads
(vCPUs, migration) reach the loop only through :meth:`emit_event` and
:meth:`call_soon`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from dataclasses import dataclass, field

from vmigrate import QEMU_VERSION, __version__
from vmigrate.block.node import BlockGraph
from vmigrate.commands import CommandDispatcher
from vmigrate.job import JobManager
from vmigrate.machine.announce import Announcer
from vmigrate.machine.devices import GlobalState, VirtualClock
from vmigrate.machine.dirtylimit import DirtyLimitService
from vmigrate.machine.dirtyrate import DirtyRateMeasurement
from vmigrate.machine.failover import FailoverPairs, FailoverPrimary, FailoverSpec
from vmigrate.machine.guest import GuestSpec
from vmigrate.machine.host import keep_large_buffers_in_heap
from vmigrate.machine.memory import RAMBlock
from vmigrate.machine.net import Nic
from vmigrate.machine.runstate import RunState
from vmigrate.machine.softcpu import SoftVcpus
from vmigrate.machine.vcpus import VcpuBackend
from vmigrate.migration.block import BlockSection
from vmigrate.migration.block_dirty_bitmap import DirtyBitmapSection
from vmigrate.migration.migration import MigrationManager
from vmigrate.migration.port import MigrationHost
from vmigrate.migration.ram import RamSection
from vmigrate.migration.savevm import SectionRegistry
from vmigrate.objects import UserObjects
from vmigrate.qapi.schema import load as load_schema
from vmigrate.qmp.server import QMPServer

log = logging.getLogger(__name__)

PACKAGE = f"vmigrate {__version__}"


@dataclass
class VMConfig:
    """What ``vmigrate run`` was asked for; field names follow its options."""

    memory: int = 128 << 20
    mem_path: str | None = None
    name: str | None = None
    uuid: str | None = None
    smp: int = 1
    accel: str = "soft"
    #: KVM only: entries per vCPU dirty ring (0: dirty bitmaps instead).
    dirty_ring_size: int = 0
    #: KVM only: where the UART's output goes (``--serial``); None discards it.
    serial: str | None = None
    guest: GuestSpec = field(default_factory=lambda: GuestSpec.parse("idle"))
    qmp: list[str] = field(default_factory=list)
    incoming: str | None = None
    start_paused: bool = False
    #: ``--object`` instances, as QEMU's ``-object``; ``object-add`` adds more.
    objects: UserObjects = field(default_factory=UserObjects)
    #: ``--blockdev`` and ``--drive`` nodes, opened.
    block: BlockGraph = field(default_factory=BlockGraph)
    #: ``--nic`` backends, opened; they carry the self-announcements (docs/announce.md).
    nics: list[Nic] = field(default_factory=list)
    #: ``--device failover-primary``s (docs/failover.md).
    failover: list[FailoverSpec] = field(default_factory=list)


class VM:
    def __init__(self, config: VMConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.package = PACKAGE
        self.schema = load_schema()
        #: QEMU's ``/objects``: ``--object``'s, then ``object-add``'s.
        self.objects = config.objects
        self.block = config.block
        self.jobs = JobManager(self.emit_event)
        disk = config.guest.disk
        if disk is not None and self.block.lookup(disk) is None:
            raise ValueError(f"--guest disk={disk}: Cannot find device='{disk}' nor node-name='{disk}'")
        if config.incoming is not None:
            # QEMU opens images inactive (BDRV_O_INACTIVE) when -incoming is given.
            self.block.inactivate_all()
        self.ram = RAMBlock("ram", config.memory, config.mem_path)
        self.vcpus = self._make_vcpus(config)
        if config.incoming is not None:
            initial = "inmigrate"
        elif config.start_paused:
            initial = "prelaunch"
        else:
            initial = "running"
        self.runstate = RunState(initial, self.vcpus, self.emit_event)
        self.runstate.autostart = not config.start_paused
        self.clock = VirtualClock()
        self.global_state = GlobalState()
        self.sections = self._register_sections()
        self.announcer = Announcer(config.nics)
        for nic in config.nics:
            nic.set_running(self.runstate.running)
            self.runstate.add_listener(nic.set_running)
        # A destination's primaries stay hidden until the standby's state arrives (failover.py).
        self.failover = FailoverPairs([FailoverPrimary(spec, hidden=config.incoming is not None)
                                       for spec in config.failover], self.emit_event)
        self.qmp = QMPServer(CommandDispatcher(self), QEMU_VERSION, PACKAGE, loop)
        self.migration = MigrationManager(MigrationHost(
            ram_blocks=self.ram_blocks, sections=self.sections, runstate=self.runstate,
            global_state=self.global_state, vcpus=self.vcpus, uuid=config.uuid,
            machine_type=self.machine_type, emit_event=self.emit_event,
            objects=self.objects, block=self.block, announce=self.announcer.after_migration,
            failover=self.failover))
        self.dirty_rate = DirtyRateMeasurement(self.ram_blocks, self.vcpus)
        self.dirty_limit = DirtyLimitService(self.vcpus)
        self._shutdown = asyncio.Event()
        self.shutdown_reason: str | None = None
        self._loop_thread = threading.get_ident()

    def _register_sections(self) -> SectionRegistry:
        """What migrates, in the order and with the section ids of ``-M none`` (savevm.py): the
        timer, block (blk_mig_init), ram, dirty-bitmap (dirty_bitmap_mig_init); then the KVM
        devices and globalstate."""
        sections = SectionRegistry()
        sections.register_device(self.clock)
        block = BlockSection(self.block)
        sections.register_live(block)
        sections.register_live(RamSection(self.ram_blocks, self.vcpus, block.bulk_active))
        bitmaps = DirtyBitmapSection(self.block)
        sections.register_live(bitmaps)
        sections.on_before_vm_start(bitmaps.before_vm_start)
        for device in self.vcpus.devices:
            sections.register_device(device)
        sections.register_device(self.global_state)
        return sections

    def _make_vcpus(self, config: VMConfig) -> VcpuBackend:
        if config.accel == "kvm":
            from vmigrate.machine.kvm import KvmVcpus

            return KvmVcpus(self.ram, config.smp, config.guest, serial=config.serial,
                            dirty_ring_size=config.dirty_ring_size, on_error=self._guest_error)
        return SoftVcpus(config.smp, lambda: config.guest.build(self.ram, self.block.lookup))

    def _guest_error(self, message: str) -> None:
        """A vCPU stopped for good (from its thread): say why, stop the VM in ``internal-error``."""
        log.error("%s", message)
        self.call_soon(self.runstate.stop, "internal-error")

    @property
    def ram_blocks(self) -> list[RAMBlock]:
        return [self.ram]

    @property
    def machine_type(self) -> str:
        """The configuration section's machine name.

        With software vCPUs the VM has exactly the sections of QEMU's ``-M
        none``, and says so; KVM adds vCPU and device state no QEMU machine
        carries, so a QEMU destination refuses it by name instead of failing
        on an unknown section.
        """
        return "vmigrate-kvm" if self.config.accel == "kvm" else "none"

    def start(self) -> None:
        for spec in self.config.qmp:
            self.qmp.listen(spec)
        if self.runstate.state == "running":
            self.vcpus.resume_all()
        if self.config.incoming not in (None, "defer"):
            self.migration.incoming.start(self.config.incoming)

    def emit_event(self, name: str, data: dict | None = None) -> None:
        self.qmp.emit_event(name, data)

    def call_soon(self, fn, *args) -> None:
        """Run *fn* on the loop thread (from any thread)."""
        self.loop.call_soon_threadsafe(fn, *args)

    def request_shutdown(self, reason: str) -> None:
        def shutdown() -> None:
            if self.shutdown_reason is None:
                self.shutdown_reason = reason
                self.emit_event("SHUTDOWN", {"guest": False, "reason": reason})
                self._shutdown.set()

        if threading.get_ident() == self._loop_thread:
            # Let the pending response be written before the event loop stops.
            self.loop.call_soon(shutdown)
        else:
            self.loop.call_soon_threadsafe(shutdown)

    async def wait_shutdown(self) -> None:
        await self._shutdown.wait()

    def close(self) -> None:
        self.migration.shutdown()
        self.announcer.close()
        self.failover.close()
        for nic in self.config.nics:
            nic.close()
        self.vcpus.shutdown()
        self.block.close()
        self.qmp.close()


def run_vm(config: VMConfig) -> int:
    """Serve a VM until ``quit`` or a signal; the body of ``vmigrate run``."""
    keep_large_buffers_in_heap()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    vm = VM(config, loop)
    try:
        vm.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, vm.request_shutdown, "host-signal")
        loop.run_until_complete(vm.wait_shutdown())
        # Flush the last responses/events (e.g. quit's reply, SHUTDOWN).
        loop.run_until_complete(asyncio.sleep(0.05))
    finally:
        vm.close()
        loop.close()
    return 0
