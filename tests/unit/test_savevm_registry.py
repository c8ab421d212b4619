"""The section registry carries RAM, devices and any further live section, both directions.

A whole stream is written by :class:`SaveVM` over a real socket pair and read
back by :class:`LoadVM` into a second VM's registry: the destination's RAM and
devices must equal the source's, and a third live section registered beside
RAM (standing for the block, dirty-bitmap and COLO sections to come) gets all
of its records, in order.
"""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from vmigrate.machine.devices import GlobalState, VirtualClock
from vmigrate.machine.memory import RAMBlock
from vmigrate.machine.softcpu import SoftVcpus
from vmigrate.migration.channel import ChannelError, SocketChannel
from vmigrate.migration.options import MigrationOptions
from vmigrate.migration.qemu_file import QEMUFileIn, QEMUFileOut
from vmigrate.migration.ram import RamSection
from vmigrate.migration.rate_limit import RateLimiter
from vmigrate.migration.savevm import LoadContext, LoadError, LoadVM, SaveContext, SaveVM, SectionRegistry
from vmigrate.migration.stats import CompressionStats, RamStats, XbzrleStats
from vmigrate.migration.wire import WireError, stream
from vmigrate.migration.wire.buffer import Reader

MIB = 1 << 20


class CounterSection:
    """A live section sending one be32 per piece: START 0, PART 1, 2, ..., END 99."""

    idstr = "counter"
    instance_id = 0
    section_id = 3
    version_id = 1

    def __init__(self, parts: int) -> None:
        self.parts = parts
        self.sent = 0
        self.loaded: list[int] = []
        self.cleaned = False

    def _put(self, ctx: SaveContext, value: int) -> None:
        ctx.file.put(value.to_bytes(4, "big"))

    def is_active(self, config) -> bool:
        return True

    def is_active_iterate(self, ctx: SaveContext) -> bool:
        return True

    def save_setup(self, ctx: SaveContext) -> None:
        self._put(ctx, 0)

    def save_iterate(self, ctx: SaveContext) -> bool:
        self.sent += 1
        self._put(ctx, self.sent)
        return self.sent >= self.parts

    def pending_estimate(self) -> int:
        return 4 * (self.parts - self.sent)

    def pending_exact(self) -> int:
        return self.pending_estimate()

    @property
    def first_copy_done(self) -> bool:
        return self.sent >= self.parts

    def save_complete(self, ctx: SaveContext) -> None:
        self._put(ctx, 99)

    def save_cleanup(self) -> None:
        self.cleaned = True

    def load_setup(self, ctx: LoadContext) -> "CounterBody":
        return CounterBody()

    def load_state(self, event: object) -> None:
        self.loaded.append(event)

    def load_cleanup(self) -> None:
        self.cleaned = True


class CounterBody:
    version_id = 1

    def begin(self, kind: int, section: stream.Section) -> None:
        if section.version_id != 1:
            raise WireError("bad counter version")

    def decode(self, r: Reader) -> tuple[object, bool]:
        return r.be32(), True


def machine(size: int, counter: CounterSection | None) -> tuple[SectionRegistry, RAMBlock, VirtualClock,
                                                                 GlobalState, SoftVcpus]:
    """The registrations of a ``-M none`` VM (savevm.py), plus *counter* after RAM."""
    ram = RAMBlock("ram", size)
    vcpus = SoftVcpus(1, None)
    clock, gstate = VirtualClock(), GlobalState()
    registry = SectionRegistry()
    registry.register_device(clock)
    registry.register_live(RamSection([ram], vcpus))
    if counter is not None:
        registry.register_live(counter)
    registry.register_device(gstate)
    return registry, ram, clock, gstate, vcpus


def save(registry: SectionRegistry, f: QEMUFileOut, config) -> None:
    ctx = SaveContext(config, f, RateLimiter(), RamStats(), XbzrleStats(), CompressionStats(), None,
                      lambda: "precopy", lambda count: None, lambda dirty, sent: None)
    saver = SaveVM(registry, ctx, "none", None)
    try:
        saver.setup()
        while saver.pending_estimate() and not saver.first_copy_done:
            saver.iterate()
        saver.complete()
    finally:
        saver.cleanup()


def migrate(src: SectionRegistry, dst: SectionRegistry, machine_type: str = "none") -> None:
    config = MigrationOptions().snapshot()
    a, b = socket.socketpair()
    out = SocketChannel(a)

    def write() -> None:
        try:
            save(src, QEMUFileOut(out, RateLimiter()), config)
        except ChannelError:
            pass  # the destination refused the stream and closed its end
        finally:
            out.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        LoadVM(dst, LoadContext(config), machine_type, None, lambda cmd: None).run(QEMUFileIn(SocketChannel(b)))
    finally:
        b.close()
        writer.join(timeout=30)


def test_registry_migrates_ram_devices_and_another_live_section():
    counter_out, counter_in = CounterSection(parts=3), CounterSection(parts=3)
    src, src_ram, src_clock, src_gstate, src_vcpus = machine(4 * MIB, counter_out)
    dst, dst_ram, dst_clock, dst_gstate, dst_vcpus = machine(4 * MIB, counter_in)
    try:
        rng = np.random.default_rng(5)
        src_ram.pages[::3] = rng.integers(0, 256, size=src_ram.pages[::3].shape, dtype=np.uint8)
        src_clock.cpu_ticks_offset = 1234
        src_gstate.runstate = "paused"
        migrate(src, dst)
        assert np.array_equal(src_ram.bytes, dst_ram.bytes)
        assert (dst_clock.cpu_ticks_offset, dst_clock.cpu_clock_offset) == (1234, src_clock.cpu_clock_offset)
        assert dst_gstate.runstate == "paused"
        assert counter_in.loaded == [0, 1, 2, 3, 99]
        assert counter_out.cleaned and counter_in.cleaned
    finally:
        src_vcpus.shutdown()
        dst_vcpus.shutdown()


def test_load_refuses_another_machine_type_and_cleans_up():
    counter_in = CounterSection(parts=1)
    src, *_, src_vcpus = machine(1 * MIB, CounterSection(parts=1))
    dst, *_, dst_vcpus = machine(1 * MIB, counter_in)
    try:
        with pytest.raises(LoadError, match="Machine type received is 'none' and local is 'pc'"):
            migrate(src, dst, machine_type="pc")
        assert counter_in.cleaned and counter_in.loaded == []
    finally:
        src_vcpus.shutdown()
        dst_vcpus.shutdown()


def test_device_state_stream_round_trip():
    src, _, clock, gstate, src_vcpus = machine(1 * MIB, None)
    dst, _, dst_clock, dst_gstate, dst_vcpus = machine(1 * MIB, None)
    try:
        clock.cpu_ticks_offset = 77
        gstate.runstate = "running"
        dst.load_device_state(src.device_state_stream())
        assert dst_clock.cpu_ticks_offset == 77 and dst_gstate.runstate == "running"
        with pytest.raises(WireError):
            dst.load_device_state(src.device_state_stream()[:-1])
    finally:
        src_vcpus.shutdown()
        dst_vcpus.shutdown()
