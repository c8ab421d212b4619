"""The outgoing migration: QEMU's MigrationState, its state machine and thread.

State changes are the compare-and-swaps of :mod:`vmigrate.migration.state`.
The thread follows QEMU's migration_thread: setup, iterate under the rate
limiter until the remaining dirty memory fits the downtime limit, stop the
guest, send the rest and the device state, finish.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid as uuidlib
from typing import TYPE_CHECKING

from vmigrate.migration import savevm
from vmigrate.migration.channel import (Channel, ChannelError, CommandChannel, FdChannel, MigrationAddress,
                                        INVALID_PROTOCOL, connect, parse_uri)
from vmigrate.migration.multifd import MultifdSender, ZeroCopySocket, open_channels
from vmigrate.migration.options import MigrationOptions
from vmigrate.migration.state import MigrationStateMachine
from vmigrate.migration.qemu_file import QEMUFileOut
from vmigrate.migration.ram import RamSaver
from vmigrate.migration.stats import CompressionStats, RamStats, XbzrleStats
from vmigrate.migration.throttle import AutoConverge
from vmigrate.migration.wire import NEED_DATA, WireError, return_path
from vmigrate.qmp.errors import QMPError

if TYPE_CHECKING:
    from vmigrate.qmp.protocol import MonitorProtocol
    from vmigrate.vm import VM

RUNNING = frozenset({
    "setup", "active", "postcopy-active", "postcopy-paused", "postcopy-recover",
    "pre-switchover", "device", "wait-unplug", "cancelling",
})
WINDOW_SECONDS = 0.1


def now_ms() -> float:
    return time.monotonic() * 1000


class MigrationManager:
    """Both directions of one VM process plus the options they share."""

    def __init__(self, vm: "VM") -> None:
        from vmigrate.migration.incoming import IncomingMigration

        self.vm = vm
        self.options = MigrationOptions()
        self.outgoing = OutgoingMigration(vm, self.options)
        self.incoming = IncomingMigration(vm, self.options)

    def thread_list(self) -> list[dict]:
        """``query-migrationthreads`` (QEMU 8.0 semantics: the live source threads)."""
        t = self.outgoing._thread
        if t is None or not t.is_alive() or t.native_id is None:
            return []
        return [{"name": t.name, "thread-id": t.native_id}]

    @property
    def yank_registered(self) -> bool:
        """QEMU registers a ``migration`` yank instance while either direction is set up."""
        return self.outgoing.running or self.incoming.state == "active" or (
            self.incoming.started and self.incoming.state == "none")

    def yank(self) -> None:
        """Force-close every migration channel, as a network failure would."""
        f = self.outgoing.file
        if f is not None:
            f.shutdown()
        self.incoming.close()

    def shutdown(self) -> None:
        self.outgoing.cancel()
        self.outgoing.join(timeout=10)
        self.incoming.close()


class MigrationCancelled(Exception):
    pass


class MultifdSetupError(Exception):
    """QEMU 7.2 fails such a migration without an ``error-desc`` (the text goes to stderr)."""


class OutgoingMigration(MigrationStateMachine):
    def __init__(self, vm: "VM", options: MigrationOptions) -> None:
        super().__init__(vm, options)
        self._thread: threading.Thread | None = None
        self.error_desc: str | None = None
        self.stats = RamStats()
        #: QEMU 7.2 keeps the XBZRLE counters for the life of the process (never reset by migrate).
        self.xbzrle_stats = XbzrleStats()
        self.compression_stats = CompressionStats()
        self.file: QEMUFileOut | None = None
        self._multifd: MultifdSender | None = None
        self._continue = threading.Semaphore(0)
        self.auto_converge = AutoConverge(options, vm.vcpus)
        self._reset_timing()
        self.total_ram = sum(b.size for b in vm.ram_blocks)

    def _reset_timing(self) -> None:
        self.start_ms = now_ms()
        self.setup_time = 0
        self.total_time = 0
        self.downtime = 0
        self.expected_downtime = 0
        self.mbps = 0.0
        self.pages_per_second = 0
        self.threshold_size = 0

    # -- state ------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.state in RUNNING

    # -- QMP --------------------------------------------------------------

    def start(self, uri: str, monitor: "MonitorProtocol", args: dict) -> None:
        """``migrate``: the synchronous checks, then the thread (states.md §2.5)."""
        if args.get("resume"):
            if self.state != "postcopy-paused":
                raise QMPError("Cannot resume if there is no paused migration")
            raise QMPError("vmigrate does not implement postcopy recovery yet")
        if self.running:
            raise QMPError("There's a migration process in progress")
        runstate = self.vm.runstate.state
        if runstate == "inmigrate":
            raise QMPError("Guest is waiting for an incoming migration")
        if runstate == "postmigrate":
            raise QMPError("Can't migrate the vm that was paused due to previous migration")
        if args.get("blk") or args.get("inc"):
            if self.options.cap("x-colo"):
                raise QMPError("No disk migration is required in COLO mode")
            if self.options.cap("block") or self.options.param("block-incremental"):
                raise QMPError("Command options are incompatible with current migration capabilities")
            raise QMPError("vmigrate does not implement block migration (blk/inc) yet")
        self._check_unimplemented()
        with self._lock:
            self.state = "none"
        self.set_state("none", "setup")
        self.stats = RamStats()
        self.compression_stats = CompressionStats()
        self.error_desc = None
        self._reset_timing()
        try:
            addr = parse_uri(uri)
            fd = None
            if addr.kind == "fd":
                fd = monitor.named_fds.pop(addr.fdname, None)
                if fd is None:
                    raise QMPError(f"File descriptor named '{addr.fdname}' has not been found")
        except QMPError as err:
            if err.desc != INVALID_PROTOCOL:
                self.error_desc = err.desc
            self.set_state("setup", "failed")
            raise
        if addr.kind == "exec":
            channel_factory = lambda: CommandChannel(addr.command, outgoing=True)  # noqa: E731
        elif addr.kind == "fd":
            channel_factory = lambda: FdChannel(fd)  # noqa: E731
        else:
            channel_factory = lambda: connect(addr)  # noqa: E731
        self._thread = threading.Thread(target=self._run, args=(channel_factory, addr), name="live_migration",
                                        daemon=True)
        self._thread.start()

    def _check_unimplemented(self) -> None:
        """Refuse capabilities whose stream features are not built yet (never a silent success)."""
        for cap in ("postcopy-ram", "x-colo", "block", "dirty-bitmaps",
                    "background-snapshot", "postcopy-preempt", "x-ignore-shared"):
            if self.options.cap(cap):
                raise QMPError(f"vmigrate does not implement the '{cap}' capability yet")
        if self.options.param("tls-creds"):
            raise QMPError("vmigrate does not implement TLS migration yet")

    def cancel(self) -> None:
        """``migrate_cancel``: always succeeds; only acts on a running migration."""
        while True:
            state = self.state
            if state not in RUNNING:
                return
            if state == "pre-switchover":
                self._continue.release()
            if self.set_state(state, "cancelling") or self.state == "cancelling":
                break
        f = self.file
        if f is not None:
            f.shutdown()
        multifd = self._multifd
        if multifd is not None:
            multifd.fail("Channel shut down")

    def continue_(self, expected: str) -> None:
        if self.state != expected:
            raise QMPError(f"Migration not in expected state: {self.state}")
        self._continue.release()

    def set_max_bandwidth(self, value: int) -> None:
        f = self.file
        if f is not None and self.state in ("active", "setup"):
            f.budget = value // 10

    def join(self, timeout: float) -> None:
        t = self._thread
        if t is not None:
            t.join(timeout)

    def query(self, info: dict) -> None:
        """The source pass of ``query-migrate`` (states.md §3)."""
        state = self.state
        if state == "none":
            return
        info["status"] = state
        if state in ("active", "cancelling", "postcopy-active", "postcopy-paused", "postcopy-recover",
                     "pre-switchover", "device", "completed"):
            completed = state == "completed"
            info["setup-time"] = self.setup_time
            info["total-time"] = self.total_time if completed else int(now_ms() - self.start_ms)
            if completed:
                info["downtime"] = self.downtime
            else:
                info["expected-downtime"] = self.expected_downtime
            info["ram"] = self.stats.to_qmp(self.total_ram, self.mbps, self.pages_per_second, completed)
            if self.options.cap("xbzrle"):
                info["xbzrle-cache"] = self.xbzrle_stats.to_qmp(self.options.param("xbzrle-cache-size"))
            if self.options.cap("compress"):
                info["compression"] = self.compression_stats.to_qmp()
            if self.auto_converge.percentage:
                info["cpu-throttle-percentage"] = self.auto_converge.percentage
        elif state == "failed" and self.error_desc:
            info["error-desc"] = self.error_desc

    # -- the migration thread ---------------------------------------------

    def _phase(self) -> str:
        return "precopy" if self.vm.runstate.running else "downtime"

    def _run(self, channel_factory, addr: MigrationAddress) -> None:
        vm = self.vm
        channel: Channel | None = None
        rp: ReturnPathReader | None = None
        ram: RamSaver | None = None
        was_running = vm.runstate.running
        stopped = False
        try:
            channel = channel_factory()
            self.file = f = QEMUFileOut(channel)
            if self.state == "cancelling":
                raise MigrationCancelled()
            self.expected_downtime = self.options.param("downtime-limit")
            f.budget = self.options.param("max-bandwidth") // 10
            thread_start = now_ms()
            window = _Window(self, f)
            self._multifd = self._open_multifd(addr, channel, f)
            ram = RamSaver(vm.ram_blocks, self.stats, self._phase, self._pass_event, vm.vcpus,
                           options=self.options, xbzrle_stats=self.xbzrle_stats,
                           compression_stats=self.compression_stats, multifd=self._multifd)
            ram.on_period = self.auto_converge.period_end
            saver = savevm.SaveVM(vm, ram, f, self.options)
            rp = self._open_return_path(channel, saver) if self.options.cap("return-path") else None
            saver.setup()
            self.set_state("setup", "active")
            self.setup_time = int(now_ms() - thread_start)
            while self.state == "active":
                if not f.rate_limited():
                    if self._iteration(ram, saver):
                        stopped = True
                        was_running = self._complete(ram, saver, f, rp) or was_running
                        break
                if self.state == "cancelling":
                    raise MigrationCancelled()
                if f.error:
                    raise ChannelError(f.error)
                if rp is not None and rp.error:
                    raise ChannelError(rp.error)
                window.step()
            if self.state == "cancelling":
                raise MigrationCancelled()
        except MigrationCancelled:
            pass
        except MultifdSetupError as err:
            print(f"vmigrate: {err}", file=sys.stderr, flush=True)
            self._fail(None)
        except (ChannelError, OSError, ValueError) as err:
            if rp is not None:
                # The destination's own verdict explains a broken pipe better.
                rp.join(timeout=2)
            self._fail(rp.error if rp is not None and rp.error else str(err))
        finally:
            self._finish(was_running, stopped)
            if ram is not None:
                ram.cleanup()
            elif self._multifd is not None:
                self._multifd.close()
            self._multifd = None
            if channel is not None:
                if rp is not None:
                    channel.shutdown()
                    rp.join(timeout=10)
                try:
                    channel.close()
                except (ChannelError, OSError):
                    pass
            self.file = None
            # QEMU's cleanup bottom half.
            self.set_state("cancelling", "cancelled")

    def _open_multifd(self, addr: MigrationAddress, channel: Channel, f: QEMUFileOut) -> MultifdSender | None:
        """Zero-copy check on the main channel, then the multifd channels (multifd.md §1, §8)."""
        zero_copy = self.options.cap("zero-copy-send")
        if zero_copy and addr.multi_channel and not ZeroCopySocket.enable(channel.sock):
            raise ChannelError("Zero copy send feature not detected in host kernel")
        if not self.options.cap("multifd"):
            return None
        if not addr.multi_channel:
            raise MultifdSetupError("multifd is not supported by current protocol")
        uuid = self.vm.config.uuid
        channels = open_channels(addr, self.options.param("multifd-channels"), zero_copy)
        method = self.options.param("multifd-compression")
        level = self.options.param(f"multifd-{method}-level") if method != "none" else 0

        def account(nbytes: int) -> None:
            f.used += nbytes

        return MultifdSender(channels, method, level, zero_copy,
                             uuidlib.UUID(uuid).bytes if uuid else bytes(16), self.stats, account)

    def _pass_event(self, count: int) -> None:
        if self.options.cap("events"):
            self.vm.emit_event("MIGRATION_PASS", {"pass": count})

    def _iteration(self, ram: RamSaver, saver: "savevm.SaveVM") -> bool:
        """One loop turn (QEMU's migration_iteration_run); True when it is time to complete.

        One change from QEMU 7.2: never before the first copy of RAM is out.
        QEMU completes as soon as what is left fits in ``downtime-limit`` at
        the measured bandwidth, so an idle guest stops with the last
        ~``downtime-limit`` worth of its first copy unsent (about 270 ms of
        downtime at 4 GiB).  Those pages are not dirt: sending them live
        costs the same time and leaves only what the guest re-dirtied.
        """
        pending = ram.remaining_bytes()
        if pending and not ram.bulk_done:
            saver.iterate()
            return False
        if pending < self.threshold_size:
            ram.sync()
            pending = ram.remaining_bytes()
        if pending == 0 or pending < self.threshold_size:
            return True
        saver.iterate()
        return False

    def _open_return_path(self, channel: Channel, saver: "savevm.SaveVM") -> "ReturnPathReader":
        """Ask the destination to talk back (OPEN_RETURN_PATH, PING 1) and start listening."""
        if not channel.bidirectional:
            raise ChannelError("Unable to open return-path for postcopy")
        saver.open_return_path()
        reader = ReturnPathReader(channel)
        reader.start()
        return reader

    def _complete(self, ram: RamSaver, saver: "savevm.SaveVM", f: QEMUFileOut,
                  rp: "ReturnPathReader | None") -> bool:
        """Stop-and-copy; returns whether the guest had been running."""
        vm = self.vm
        downtime_start = now_ms()
        vm.global_state.runstate = vm.runstate.state
        was_running = vm.runstate.force_stop("finish-migrate")
        if self.options.cap("pause-before-switchover"):
            while self._continue.acquire(blocking=False):
                pass
            if self.set_state("active", "pre-switchover"):
                self._continue.acquire()
                if not self.set_state("pre-switchover", "device"):
                    raise MigrationCancelled()
        if self.state == "cancelling":
            raise MigrationCancelled()
        f.budget = 0
        saver.complete()
        if rp is not None:
            rp.join()
            if rp.error:
                raise ChannelError(rp.error)
        end = now_ms()
        state = self.state
        if state not in ("active", "device") or not self.set_state(state, "completed"):
            raise MigrationCancelled()
        self.total_time = int(end - self.start_ms)
        self.downtime = int(end - downtime_start)
        transfer = self.total_time - self.setup_time
        if transfer:
            self.mbps = (f.transferred + self.stats.multifd_bytes) * 8 / transfer / 1000
        return was_running

    def _fail(self, desc: str | None) -> None:
        self.error_desc = desc
        for state in ("setup", "active", "pre-switchover", "device"):
            if self.set_state(state, "failed"):
                break

    def _finish(self, was_running: bool, stopped: bool) -> None:
        """QEMU's migration_iteration_finish: the run state, before any cleanup.

        A client reacting to ``MIGRATION completed`` must already see
        ``postmigrate`` (or a restarted guest), so this runs before channels
        are closed, which may take a while.
        """
        vm = self.vm
        self.auto_converge.stop()
        if self.state == "completed":
            vm.runstate.set("postmigrate")
        elif stopped or vm.runstate.state == "finish-migrate":
            if was_running:
                vm.runstate.start()
            elif vm.runstate.state == "finish-migrate":
                vm.runstate.set("postmigrate")


class ReturnPathReader(threading.Thread):
    """Reads the destination's return-path messages until SHUT (QEMU's rp thread).

    A non-zero SHUT or a broken return path becomes ``error``; the migration
    thread fails on it, with the reason as ``error-desc`` (QEMU 7.2 fails
    without one).
    """

    def __init__(self, channel: Channel) -> None:
        super().__init__(name="return path", daemon=True)
        self.channel = channel
        self.error: str | None = None
        self.pongs: list[int] = []

    def run(self) -> None:
        decoder = return_path.ReturnPathDecoder()
        try:
            while True:
                data = self.channel.read(4096)
                if not data:
                    self.error = "RP: the destination closed the return path without SHUT"
                    return
                decoder.feed(data)
                while (event := decoder.next_event()) is not NEED_DATA:
                    if isinstance(event, return_path.RpShut):
                        if event.value:
                            self.error = f"RP: Sibling indicated error {event.value}"
                        return
                    if isinstance(event, return_path.RpPong):
                        self.pongs.append(event.value)
                    else:
                        raise WireError(f"RP: unexpected {type(event).__name__} in precopy")
        except (ChannelError, WireError) as err:
            self.error = str(err)


class _Window:
    """The 100 ms bandwidth window: rate limit, mbps, threshold, expected downtime."""

    def __init__(self, mig: OutgoingMigration, f: QEMUFileOut) -> None:
        self.mig = mig
        self.f = f
        self.start = now_ms()
        self.bytes0 = self.total_bytes()
        self.pages0 = mig.stats.pages_sent

    def total_bytes(self) -> int:
        """Main channel bytes plus multifd-bytes (QEMU's migration_total_bytes)."""
        return self.f.transferred + self.mig.stats.multifd_bytes

    def step(self) -> None:
        now = now_ms()
        self.update(now)
        if self.f.rate_limited() and not self.f.error:
            delay = (self.start + WINDOW_SECONDS * 1000 - now_ms()) / 1000
            if delay > 0:
                time.sleep(delay)
            self.update(now_ms())

    def update(self, now: float) -> None:
        if now < self.start + WINDOW_SECONDS * 1000:
            return
        mig, f = self.mig, self.f
        xfer = self.total_bytes() - self.bytes0
        dt = now - self.start
        bw = xfer / dt
        mig.threshold_size = int(bw * mig.options.param("downtime-limit"))
        mig.mbps = xfer * 8 / (dt / 1000) / 1e6
        mig.pages_per_second = int((mig.stats.pages_sent - self.pages0) / (dt / 1000))
        if mig.stats.dirty_pages_rate and xfer > 10000:
            mig.expected_downtime = int(mig.stats.remaining_pages * 4096 / bw)
        f.used = 0
        self.start = now_ms()
        self.bytes0 = self.total_bytes()
        self.pages0 = mig.stats.pages_sent
