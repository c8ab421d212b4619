"""The KVM vCPU backend: one thread per vCPU in KVM_RUN, with the software backend's interface.

Pausing is :class:`~vmigrate.machine.vcpus.VcpuGroup`'s handshake:
:meth:`KvmVcpus.pause_all` returns only when no vCPU is inside KVM_RUN.  A
vCPU in the guest is kicked out with ``immediate_exit`` and a signal; a vCPU
that last left KVM_RUN for a port-I/O exit enters KVM_RUN once more with
``immediate_exit`` set, because KVM completes the instruction (the data of
an ``in``, RIP past an ``out``) only on that entry: state saved before it
would replay or lose the access.

Port I/O is the guest's only way out: the UART at 0x3f8 and a sleep
hypercall (``out 0x700, eax``: sleep eax µs), on which the vCPU thread
waits interruptibly so a pause is not delayed by a sleeping guest.

vCPU 0 runs the x86 program for ``--guest`` (or halts, for ``idle``); the
other vCPUs are application processors that were never started (they wait
for INIT/SIPI inside KVM_RUN), as on a real machine before its OS brings
them up.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from typing import Callable

from vmigrate.machine.guest import GuestSpec
from vmigrate.machine.kvm import abi, structs
from vmigrate.machine.kvm.state import ClockState, IrqchipState, PitState, VcpuState
from vmigrate.machine.kvm.system import KvmSystem
from vmigrate.machine.kvm.uart import PORTS as UART_PORTS
from vmigrate.machine.kvm.uart import SerialSink, Uart16550
from vmigrate.machine.kvm.vcpu import Vcpu
from vmigrate.machine.kvm.vm import KvmVM
from vmigrate.machine.memory import RAMBlock
from vmigrate.machine.vcpus import VcpuGroup
from vmigrate.machine.x86guest import boot, build
from vmigrate.machine.x86guest.programs import program_for

log = logging.getLogger(__name__)

#: The signal that interrupts KVM_RUN (QEMU uses SIGUSR1 for the same purpose).
SIG_KICK = signal.SIGUSR1
PORT_SLEEP_US = build.GUEST_H["PORT_SLEEP_US"]
#: With a throttle set, each running vCPU is kicked this often to take its share of sleep.
THROTTLE_TICK = 0.01
#: The section ids of the KVM devices start after globalstate's (4).
FIRST_SECTION_ID = 5


def _kick_handler(signum: int, frame: object) -> None:
    """Its only job is to exist: a pending signal makes KVM_RUN return EINTR."""


class KvmVcpuThread(threading.Thread):
    def __init__(self, vcpu: Vcpu, owner: "KvmVcpus") -> None:
        super().__init__(name=f"CPU {vcpu.index}/KVM", daemon=True)
        self.vcpu = vcpu
        self.owner = owner
        #: The vCPU stopped for good (the guest crashed); it counts as parked.
        self.failed = False
        self.exits: Counter[int] = Counter()

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN soon (caller holds the owner's condition)."""
        self.vcpu.run.immediate_exit = 1
        if self.is_alive() and self.ident is not None:
            signal.pthread_kill(self.ident, SIG_KICK)

    def _should_run(self) -> bool:
        owner = self.owner
        return owner._run and not owner._quit and not self.failed

    def run(self) -> None:
        owner = self.owner
        cpu = self.vcpu
        settled = True  # no exit is waiting for its completion by the next KVM_RUN
        since = time.perf_counter()  # start of the running time not yet throttled
        while True:
            with owner._cond:
                if owner._quit:
                    return
                if settled and not self._should_run():
                    owner._parked += 1
                    owner._cond.notify_all()
                    while not self._should_run() and not owner._quit:
                        owner._cond.wait()
                    owner._parked -= 1
                    if owner._quit:
                        return
                    since = time.perf_counter()
                running = self._should_run()
                cpu.run.immediate_exit = 0 if running else 1
            if running:
                since = owner._throttle_pause(since)
            try:
                interrupted = cpu.kvm_run()
            except OSError as err:
                self._fail(f"KVM_RUN failed: {err.strerror}")
                settled = True
                continue
            if interrupted:
                settled = True
                continue
            settled = False
            reason = cpu.exit_reason()
            self.exits[reason] += 1
            if reason == abi.KVM_EXIT_IO:
                self._port_io()
            elif reason == abi.KVM_EXIT_MMIO:
                self._mmio()
            elif reason == abi.KVM_EXIT_DIRTY_RING_FULL:
                owner.harvest_rings()
                delay = owner.ring_full_sleep_us[cpu.index]
                if delay:
                    owner._sleep(delay / 1e6)
            elif reason != abi.KVM_EXIT_HLT:
                self._fail(self._describe_exit(reason))
                settled = True

    def _port_io(self) -> None:
        cpu, owner = self.vcpu, self.owner
        direction, size, port, count, offset = cpu.io_exit()
        if direction == abi.KVM_EXIT_IO_OUT:
            raw = cpu.io_read(offset, size * count)
            for k in range(0, size * count, size):
                owner.port_out(port, int.from_bytes(raw[k:k + size], "little"))
        else:
            cpu.io_write(offset, b"".join(owner.port_in(port, size).to_bytes(size, "little") for _ in range(count)))

    def _mmio(self) -> None:
        """Unbacked guest-physical memory: reads see all ones, writes vanish (as on a PC bus)."""
        mmio = self.vcpu.run.exit.mmio
        if not mmio.is_write:
            for i in range(mmio.len):
                mmio.data[i] = 0xFF

    def _describe_exit(self, reason: int) -> str:
        name = abi.EXIT_NAMES.get(reason, str(reason))
        try:
            rip = f" at rip {self.vcpu.get_regs().rip:#x}"
        except OSError:
            rip = ""
        detail = ""
        if reason == abi.KVM_EXIT_INTERNAL_ERROR:
            detail = f" (suberror {self.vcpu.run.exit.internal.suberror})"
        return f"vCPU {self.vcpu.index}: guest stopped by a KVM '{name}' exit{rip}{detail}"

    def _fail(self, message: str) -> None:
        with self.owner._cond:
            self.failed = True
            self.owner._cond.notify_all()
        self.owner.on_error(message)


class KvmVcpus(VcpuGroup):
    """The KVM machine: VM, memory slots, vCPU threads, UART, and their migratable state."""

    def __init__(self, ram: RAMBlock, count: int, guest: GuestSpec, serial: str | None = None,
                 dirty_ring_size: int = 0, on_error: Callable[[str], None] | None = None) -> None:
        self.on_error = on_error or log.error
        if threading.current_thread() is threading.main_thread():
            signal.signal(SIG_KICK, _kick_handler)
        elif signal.getsignal(SIG_KICK) in (signal.SIG_DFL, None):
            raise RuntimeError("the KVM backend must be created on the main thread (it installs a signal handler)")
        self.system = KvmSystem()
        self.vm = KvmVM(self.system, dirty_ring_size)
        self.vm.map_block(ram)
        self.ram = ram
        self.cpus = [Vcpu(self.system, self.vm, i) for i in range(count)]
        self._boot(guest)
        msrs = self.cpus[0].readable_msrs(self.system.msr_index_list())
        self.sink = SerialSink(serial)
        sid = iter(range(FIRST_SECTION_ID, FIRST_SECTION_ID + count + 4))
        self.irqchip = IrqchipState(self.vm, next(sid))
        self.pit = PitState(self.vm, next(sid))
        self.cpu_states = [VcpuState(cpu, msrs, next(sid)) for cpu in self.cpus]
        self.clock = ClockState(self.vm, next(sid))
        self.uart = Uart16550(self.sink, next(sid))
        self._uart_lock = threading.Lock()

        super().__init__(count)
        self._throttle = 0.0
        self._throttle_start = 0.0
        self._ticker: threading.Thread | None = None
        self._dirty_users = 0
        self._dirty_users_lock = threading.Lock()
        #: Harvest statistics: calls, pages reported, seconds spent.
        self.harvests = Counter()
        self.threads = [KvmVcpuThread(cpu, self) for cpu in self.cpus]
        for t in self.threads:
            t.start()

    def _boot(self, guest: GuestSpec) -> None:
        """Load the program for *guest* and point vCPU 0 at it, already in long mode at CPL 3.

        Without a program (``idle``) vCPU 0 is halted with interrupts off:
        it waits inside KVM_RUN like the application processors.
        """
        bsp = self.cpus[0]
        program = program_for(guest, self.vm.low_ram_top, bsp.tsc_khz() * 1000)
        if program is None:
            bsp.set_mp_state(abi.KVM_MP_STATE_HALTED)
            return
        boot.install(self.ram.bytes, self.vm.ram_top, build.image(program.name), program.arguments)
        sregs = bsp.get_sregs()
        bsp.set_sregs(structs.load_into(sregs, structs.flatten(boot.initial_sregs())))
        bsp.set_regs(structs.from_nested(abi.kvm_regs, boot.initial_regs(program.arguments)))

    # -- the interface shared with SoftVcpus -----------------------------------------

    @property
    def devices(self) -> list:
        """Migrated device models, in stream (= restore) order."""
        return [self.irqchip, self.pit, *self.cpu_states, self.clock, self.uart]

    @property
    def throttle(self) -> float:
        """Fraction of wall time each vCPU must sleep (auto-converge / dirty limit)."""
        return self._throttle

    @throttle.setter
    def throttle(self, fraction: float) -> None:
        with self._cond:
            if self._throttle <= 0:
                self._throttle_start = time.perf_counter()
            self._throttle = fraction
            if fraction > 0 and self._ticker is None:
                self._ticker = threading.Thread(target=self._throttle_ticker, name="vCPU throttle", daemon=True)
                self._ticker.start()

    def shutdown(self) -> None:
        self._stop_threads()
        if any(t.is_alive() for t in self.threads):
            return  # a thread stuck in the kernel keeps its fds; the process is exiting anyway
        for cpu in self.cpus:
            cpu.close()
        self.vm.close()
        self.system.close()
        self.sink.close()

    @property
    def dirty_ring_entries(self) -> int:
        return self.vm.dirty_ring_entries

    def dirty_log_start(self) -> None:
        with self._dirty_users_lock:
            self._dirty_users += 1
            if self._dirty_users == 1:
                self.vm.set_dirty_logging(True)

    def dirty_log_sync(self) -> None:
        if self.dirty_ring_entries:
            self.harvest_rings()
            return
        started = time.perf_counter()
        pages = self.vm.sync_dirty_bitmap()
        self._count_harvest(pages, started)

    def dirty_log_stop(self) -> None:
        with self._dirty_users_lock:
            self._dirty_users = max(0, self._dirty_users - 1)
            if self._dirty_users == 0:
                self.vm.set_dirty_logging(False)

    def dirty_ring_counters(self) -> list[int]:
        """Pages collected from each vCPU's ring so far (dirty-rate measurement takes differences)."""
        return [cpu.ring.collected if cpu.ring is not None else 0 for cpu in self.cpus]

    # -- machine internals -------------------------------------------------------------

    def harvest_rings(self) -> None:
        """Collect every vCPU's dirty ring into the dirty logs, then let KVM reuse the entries."""
        started = time.perf_counter()
        pages = 0
        with self.vm.dirty_lock:
            for cpu in self.cpus:
                slots, offsets = cpu.ring.collect()
                if len(offsets):
                    self.vm.mark_slot_pages(slots, offsets)
                    pages += len(offsets)
            self.vm.reset_dirty_rings()
        self._count_harvest(pages, started)

    def _count_harvest(self, pages: int, started: float) -> None:
        self.harvests.update(calls=1, pages=pages)
        self.harvests["us"] += round((time.perf_counter() - started) * 1e6)

    def exit_counts(self) -> dict[str, int]:
        """VM exits handled in user space since start, by reason, all vCPUs together."""
        total: Counter[int] = Counter()
        for t in self.threads:
            total.update(dict(t.exits))  # a C-level copy: the vCPU thread may be counting
        return {abi.EXIT_NAMES.get(k, str(k)): v for k, v in total.items()}

    def port_out(self, port: int, value: int) -> None:
        if port in UART_PORTS:
            with self._uart_lock:
                self.uart.write(port, value & 0xFF)
        elif port == PORT_SLEEP_US:
            self._sleep(value / 1e6)

    def port_in(self, port: int, size: int) -> int:
        if port in UART_PORTS:
            with self._uart_lock:
                return self.uart.read(port)
        return (1 << (8 * size)) - 1

    def _sleep(self, seconds: float) -> None:
        """The guest's sleep hypercall: wait, but wake at once for a pause or a quit."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while self._run and not self._quit:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _throttle_pause(self, since: float) -> float:
        """Take the throttled share of the time run since *since*; returns the new start.

        Running time includes the guest's own sleep hypercalls (as the
        software vCPU counts its workload's pauses): a guest pacing itself
        by the clock is slowed only if its wall-clock share shrinks.  The
        ticker's kicks bound how long a busy guest runs between two calls.
        """
        now = time.perf_counter()
        if self._throttle <= 0:
            return now
        since = max(since, self._throttle_start)  # time run before the throttle was set is not owed
        if now - since < THROTTLE_TICK:
            return since
        self._sleep(self.throttle_sleep(now - since))
        return time.perf_counter()

    def _kick_all(self) -> None:
        for t in self.threads:
            t.kick()

    def _throttle_ticker(self) -> None:
        while True:
            time.sleep(THROTTLE_TICK)
            with self._cond:
                if self._throttle <= 0 or self._quit:
                    self._ticker = None
                    return
                if self._run:
                    self._kick_all()
