"""The outgoing migration (QEMU's migration/migration.c): a QMP-facing facade, one session per attempt.

:class:`MigrationManager` lives as long as the VM: it holds the options, the
counters QEMU keeps for the life of the process (XBZRLE's), the incoming
side and the last outgoing attempt, and answers the QMP commands.  Each
``migrate`` creates an :class:`OutgoingSession` with its own frozen
:class:`~vmigrate.migration.config.MigrationConfig`, channels, file, return
path, counters, timing and rate limiter.  The session's thread follows
QEMU's migration_thread: setup, iterate under the rate limiter until what
is pending fits the downtime limit, stop the guest, send the rest and the
device state, finish.  With ``background-snapshot`` it follows QEMU's
bg_migration_thread instead (:mod:`.background_snapshot`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid as uuidlib
from typing import Callable, Collection

import numpy as np

from vmigrate.machine.memory import PAGE_SIZE
from vmigrate.machine.write_tracking import WriteTracking
from vmigrate.migration.background_snapshot import BackgroundSnapshot, SnapshotCancelled, WriteTrackingError
from vmigrate.migration.colo import CheckpointStats, ColoPrimary, ColoState
from vmigrate.migration.channel import (INVALID_PROTOCOL, Channel, ChannelError, CommandChannel, FdChannel,
                                        MigrationAddress, ZeroCopySocket, connect, parse_uri)
from vmigrate.migration.config import MigrationConfig
from vmigrate.migration.errors import MigrationError
from vmigrate.migration.forecast import ConvergenceForecast, ForecastSample
from vmigrate.migration.incoming import IncomingMigration
from vmigrate.migration.multifd import MultifdSender, open_channels
from vmigrate.migration.multifd_worker import multifd_sender
from vmigrate.migration.options import MigrationOptions
from vmigrate.migration.postcopy import FastThreadSwitch, PageRequests
from vmigrate.migration.port import MigrationHost
from vmigrate.migration.qemu_file import QEMUFileOut
from vmigrate.migration.ram import migrated_blocks
from vmigrate.migration.rate_limit import WINDOW_SECONDS, RateLimiter
from vmigrate.migration.savevm import SaveContext, SaveVM
from vmigrate.migration.stats import CompressionStats, RamStats, XbzrleStats
from vmigrate.migration.status import MigrationStatus, StatusMachine
from vmigrate.migration.block import BlockSection
from vmigrate.migration.throttle import AutoConverge
from vmigrate.migration.tls import client_channel
from vmigrate.migration.wait_unplug import wait_unplug
from vmigrate.migration.wire import NEED_DATA, WireError, return_path, stream
from vmigrate.trace import trace

log = logging.getLogger(__name__)
S = MigrationStatus
POSTCOPY_STATES = frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER})
#: How long a postcopy recovery waits for each answer of the destination.
RESUME_TIMEOUT = 30.0


def now_ms() -> float:
    return time.monotonic() * 1000


class MigrationManager:
    """Both directions of one VM process, the options they share, and the QMP-facing calls."""

    def __init__(self, host: MigrationHost) -> None:
        self.host = host
        self.options = MigrationOptions()
        #: QEMU 7.2 keeps the XBZRLE counters for the life of the process (never reset by migrate).
        self.xbzrle_stats = XbzrleStats()
        #: The current or last outgoing attempt.
        self.outgoing: OutgoingSession | None = None
        #: The process's COLO mode, whichever direction runs it (docs/colo.md).
        self.colo = ColoState(host.emit_event)
        self.incoming = IncomingMigration(host, self.options, self.colo)

    @property
    def outgoing_status(self) -> MigrationStatus:
        return self.outgoing.status.status if self.outgoing is not None else S.NONE

    @property
    def outgoing_running(self) -> bool:
        return self.outgoing_status.is_running

    def migrate(self, uri: str, args: dict, named_fds: dict[str, int]) -> None:
        """``migrate``: the synchronous checks in QEMU's order, then the attempt's thread (docs/qemu/states.md §2.5).

        *named_fds* are the monitor's ``getfd`` descriptors; an ``fd:`` URI takes its own.
        """
        config = self.options.snapshot()
        caps = config.caps
        if args.get("resume"):
            if self.outgoing_status != S.POSTCOPY_PAUSED:
                raise MigrationError("Cannot resume if there is no paused migration")
            if caps.release_ram:
                raise MigrationError("Postcopy recovery cannot work when release-ram capability is set")
            self.outgoing.resume(uri, named_fds)
            return
        if self.outgoing_running or self.outgoing_status == S.COLO:
            raise MigrationError("There's a migration process in progress")
        runstate = self.host.runstate.state
        if runstate == "inmigrate":
            raise MigrationError("Guest is waiting for an incoming migration")
        if runstate == "postmigrate":
            raise MigrationError("Can't migrate the vm that was paused due to previous migration")
        blk, inc = bool(args.get("blk")), bool(args.get("inc"))
        if blk or inc:
            if caps.x_colo:
                raise MigrationError("No disk migration is required in COLO mode")
            if caps.block or config.params.block_incremental:
                raise MigrationError("Command options are incompatible with current migration capabilities")
        cleanup: Callable[[], None] | None = None
        if blk or inc:
            # migrate_prepare: the capability (and the parameter) for this attempt only,
            # undone when it is cleaned up (block_cleanup_parameters).
            self.options.enable_block(inc)
            cleanup = self.options.disable_block
            config = self.options.snapshot()
        session = self.outgoing = OutgoingSession(self.host, config, self.xbzrle_stats, cleanup, self.colo)
        try:
            session.start(uri, named_fds)
        except MigrationError:
            if cleanup is not None:
                cleanup()
            raise

    def snapshot_session(self) -> "OutgoingSession":
        """The attempt a snapshot-save's stream counts as (QEMU's migrate_init in qemu_savevm_state).

        ``query-migrate`` then reports it, setup to completed, like a migration.
        """
        if self.outgoing_running or self.outgoing_status == S.COLO:
            raise MigrationError("There's a migration process in progress")
        config = self.options.snapshot()
        if config.caps.block:
            raise MigrationError("Block migration and snapshots are incompatible")
        session = self.outgoing = OutgoingSession(self.host, config, self.xbzrle_stats)
        session.status.transition(S.NONE, S.SETUP)
        return session

    def set_parameters(self, args: dict) -> None:
        """``migrate-set-parameters``; a running attempt gets the parameters QEMU applies live."""
        changed = self.options.set_parameters(args)
        if self.outgoing is not None and changed:
            self.outgoing.set_parameters(self.options.snapshot(), changed)

    def cancel(self) -> None:
        """``migrate_cancel``: always succeeds; only acts on a running attempt."""
        if self.outgoing is not None:
            self.outgoing.cancel()

    def pause(self) -> None:
        """``migrate-pause`` (docs/qemu/states.md §8): the source, else the destination, in postcopy-active."""
        if self.outgoing_status == S.POSTCOPY_ACTIVE:
            self.outgoing.pause()
        elif self.incoming.status.status == S.POSTCOPY_ACTIVE:
            self.incoming.pause()
        else:
            raise MigrationError("migrate-pause is currently only supported during postcopy-active state")

    def start_postcopy(self) -> None:
        """``migrate-start-postcopy`` after its checks: a sticky request, even to a finished attempt."""
        if self.outgoing is not None:
            self.outgoing.request_postcopy()

    def continue_(self, expected: str) -> None:
        if self.outgoing_status != expected:
            raise MigrationError(f"Migration not in expected state: {self.outgoing_status}")
        if self.outgoing is not None:
            self.outgoing.continue_()

    def query(self) -> dict:
        """``query-migrate``: the destination's members, then the source's (docs/qemu/states.md §3)."""
        info: dict = {}
        self.incoming.query(info)
        if self.outgoing is not None:
            self.outgoing.query(info, self.options.snapshot())
        return info

    def thread_list(self) -> list[dict]:
        """``query-migrationthreads`` (QEMU 8.0 semantics: the live source threads)."""
        t = self.outgoing.thread if self.outgoing is not None else None
        if t is None or not t.is_alive() or t.native_id is None:
            return []
        return [{"name": t.name, "thread-id": t.native_id}]

    @property
    def yank_registered(self) -> bool:
        """QEMU registers a ``migration`` yank instance while either direction is set up."""
        return self.outgoing_running or self.incoming.yank_registered

    def yank(self) -> None:
        """Force-close every migration channel, as a network failure would."""
        if self.outgoing is not None:
            self.outgoing.shutdown_channel()
        self.incoming.close()

    def shutdown(self) -> None:
        if self.outgoing is not None:
            self.outgoing.cancel()
            self.outgoing.join(timeout=10)
        self.incoming.close()


class MigrationCancelled(Exception):
    pass


class MultifdSetupError(Exception):
    """QEMU 7.2 fails such a migration without an ``error-desc`` (the text goes to the log)."""


class OutgoingSession:
    """One outgoing attempt: its config, channels, file, return path, counters and thread."""

    def __init__(self, host: MigrationHost, config: MigrationConfig, xbzrle_stats: XbzrleStats,
                 on_cleanup: Callable[[], None] | None = None, colo: ColoState | None = None) -> None:
        """*on_cleanup* runs when the attempt is over (``migrate blk=true`` undoes its capability);
        *colo* is the process's COLO state, which ``x-colo`` engages after the first precopy."""
        self.host = host
        self.colo_state = colo
        #: The checkpointing engine once the attempt is in ``colo``, and its figures.
        self.colo: ColoPrimary | None = None
        self.colo_stats = CheckpointStats() if config.caps.x_colo else None
        self.config = config
        self._on_cleanup = on_cleanup
        self.status = StatusMachine(host.emit_event, lambda: config.caps.events)
        self.thread: threading.Thread | None = None
        self.error_desc: str | None = None
        self.xbzrle_stats = xbzrle_stats
        self.compression_stats = CompressionStats()
        self.limiter = RateLimiter(config.params.max_bandwidth)
        self.file: QEMUFileOut | None = None
        self.multifd: MultifdSender | None = None
        #: A channel in its TLS handshake, which cancel and yank must be able to interrupt.
        self._handshaking: Channel | None = None
        self._continue = threading.Semaphore(0)
        #: ``migrate-start-postcopy`` was issued (QEMU's start_postcopy flag).
        self._postcopy_requested = threading.Event()
        self.stats = RamStats()
        self.page_requests = PageRequests(self.stats) if config.caps.postcopy_ram else None
        #: A background snapshot's write protection; its faults queue in front of the scan, uncounted.
        self.write_tracking: WriteTracking | None = None
        if config.caps.background_snapshot:
            self.write_tracking = WriteTracking(migrated_blocks(host.ram_blocks, config))
            self.page_requests = PageRequests(None)
        #: The guest was handed over: whatever happens now, the source must not run it again.
        self.postcopy_started = False
        self._fast_switch = FastThreadSwitch()
        #: The main channel, its return-path reader and file (replaced by a postcopy recovery).
        self.channel: Channel | None = None
        self.rp: ReturnPathReader | None = None
        self.preempt: QEMUFileOut | None = None
        #: ``migrate resume=true`` hands the paused thread a way to reconnect.
        self._resume = threading.Event()
        self._resume_factory: Callable[[], Channel] | None = None
        #: Where the main channel goes (the preempt channel goes there too).
        self._addr: MigrationAddress | None = None
        self._was_running = False
        self._stopped = False
        self.auto_converge = AutoConverge(host.vcpus)
        #: QEMU's ram_bytes_total: the ignored blocks (x-ignore-shared) are not counted.
        self.total_ram = sum(b.size for b in migrated_blocks(host.ram_blocks, config))
        self.start_ms = now_ms()
        self.setup_time = 0
        self.total_time = 0
        self.downtime = 0
        self.expected_downtime = 0
        self.mbps = 0.0
        self.pages_per_second = 0
        self.threshold_size = 0
        #: Beyond QEMU: whether precopy can finish, from the rates measured each window.
        self.forecast = ConvergenceForecast()
        #: Dirty pages at each bitmap sync: how much each pass left for the next.
        self.pass_starts: list[int] = []

    # -- QMP --------------------------------------------------------------

    def start(self, uri: str, named_fds: dict[str, int]) -> None:
        self.status.transition(S.NONE, S.SETUP)
        try:
            channel_factory, addr = self._channel_factory(uri, named_fds)
        except MigrationError as err:
            if err.desc != INVALID_PROTOCOL:
                self.error_desc = err.desc
            self.status.transition(S.SETUP, S.FAILED)
            raise
        self.thread = threading.Thread(target=self._run, args=(channel_factory, addr), name="live_migration",
                                       daemon=True)
        self.thread.start()

    def snapshot_context(self, channel: Channel) -> SaveContext:
        """What the sections get when a snapshot-save writes this attempt's stream: the guest is
        stopped, so every byte counts as downtime, and nothing limits the rate."""
        self.limiter.set_rate(0)
        self.file = QEMUFileOut(channel, self.limiter)
        return SaveContext(self.config, self.file, self.limiter, self.stats, self.xbzrle_stats,
                           self.compression_stats, None, lambda: "downtime", self._pass_event,
                           self._period_end)

    def snapshot_done(self, error: str | None) -> None:
        """The snapshot's stream ended: completed with QEMU's zero times, or failed."""
        self.status.transition(S.SETUP, S.FAILED if error else S.COMPLETED)

    def _channel_factory(self, uri: str, named_fds: dict[str, int]) -> tuple[Callable[[], Channel],
                                                                             MigrationAddress]:
        """What opens the main channel for *uri* (from the migration thread); MigrationError if it cannot."""
        addr = parse_uri(uri)
        channel_factory: Callable[[], Channel]
        if addr.kind == "fd":
            fd = named_fds.pop(addr.fdname, None)
            if fd is None:
                raise MigrationError(f"File descriptor named '{addr.fdname}' has not been found")
            channel_factory = lambda: FdChannel(fd)  # noqa: E731
        elif addr.kind == "exec":
            channel_factory = lambda: CommandChannel(addr.command, outgoing=True)  # noqa: E731
        else:
            channel_factory = lambda: connect(addr)  # noqa: E731
        if self.config.params.tls_creds:
            channel_factory = self._secured(channel_factory, addr)
        return channel_factory, addr

    def _secured(self, factory: Callable[[], Channel], addr: MigrationAddress) -> Callable[[], Channel]:
        """*factory*'s channels wrapped as TLS clients (QEMU's migration_tls_channel_connect).

        The credentials are looked up once connected, as QEMU does, so their
        errors end the migration with an ``error-desc``; the server name is
        ``tls-hostname``, else the URI's host (none for a unix socket).
        """
        params = self.config.params

        def open_secured() -> Channel:
            channel = self._handshaking = factory()
            try:
                if self.status.status == S.CANCELLING:
                    raise MigrationCancelled()
                return client_channel(channel, self.host.objects, params.tls_creds, params.tls_hostname or addr.host)
            except (ChannelError, MigrationCancelled):
                channel.close()
                raise
            finally:
                self._handshaking = None
        return open_secured

    def cancel(self) -> None:
        trace("migrate_fd_cancel")
        if self.colo is not None:
            self.colo.cancel()
        while True:
            status = self.status.status
            if not status.is_running:
                return
            if status == S.PRE_SWITCHOVER:
                self._continue.release()
            if status == S.CANCELLING or self.status.transition(status, S.CANCELLING):
                break
        self.shutdown_channel()
        self._resume.set()
        multifd = self.multifd
        if multifd is not None:
            multifd.fail("Channel shut down")

    def shutdown_channel(self) -> None:
        for f in (self.file, self.preempt):
            if f is not None:
                f.shutdown()
        handshaking = self._handshaking
        if handshaking is not None:
            handshaking.shutdown()

    def continue_(self) -> None:
        self._continue.release()

    def request_postcopy(self) -> None:
        self._postcopy_requested.set()

    def set_parameters(self, config: MigrationConfig, changed: Collection[str]) -> None:
        """New parameters for the running attempt; the bandwidth of the current phase re-arms the
        limiter (``max-bandwidth`` in precopy, ``max-postcopy-bandwidth`` in postcopy)."""
        self.config = config
        status = self.status.status
        if "max-bandwidth" in changed and status in (S.SETUP, S.ACTIVE):
            self.limiter.set_rate(config.params.max_bandwidth)
        elif "max-postcopy-bandwidth" in changed and status == S.POSTCOPY_ACTIVE:
            self.limiter.set_rate(config.params.max_postcopy_bandwidth)

    def join(self, timeout: float) -> None:
        t = self.thread
        if t is not None:
            t.join(timeout)

    def query(self, info: dict, current: MigrationConfig) -> None:
        """The source members of ``query-migrate`` (docs/qemu/states.md §3).

        Which optional members appear follows the *current* capabilities, as
        in QEMU, not the ones this attempt started with.
        """
        status = self.status.status
        if status == S.NONE:
            return
        info["status"] = status.value
        if status in (S.ACTIVE, S.CANCELLING, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER,
                      S.PRE_SWITCHOVER, S.DEVICE, S.COMPLETED):
            completed = status == S.COMPLETED
            info["setup-time"] = self.setup_time
            info["total-time"] = self.total_time if completed else int(now_ms() - self.start_ms)
            if completed:
                info["downtime"] = self.downtime
            else:
                info["expected-downtime"] = self.expected_downtime
            info["ram"] = self.stats.to_qmp(self.total_ram, self.mbps, self.pages_per_second, completed)
            if current.caps.xbzrle:
                info["xbzrle-cache"] = self.xbzrle_stats.to_qmp(current.params.xbzrle_cache_size)
            if current.caps.compress:
                info["compression"] = self.compression_stats.to_qmp()
            if self.auto_converge.percentage:
                info["cpu-throttle-percentage"] = self.auto_converge.percentage
            disk = self._disk_info()
            if disk is not None:
                info["disk"] = disk
            if status == S.ACTIVE:
                info["x-vmigrate-forecast"] = self.forecast.forecast().to_qmp()
        elif status == S.FAILED and self.error_desc:
            info["error-desc"] = self.error_desc
        if self.colo_stats is not None and status in (S.COLO, S.COMPLETED):
            # QEMU shows only the status in colo: the checkpoint figures are vmigrate's own.
            info["x-vmigrate-colo"] = self.colo_stats.to_qmp()

    def _disk_info(self) -> dict | None:
        """populate_disk_info: block migration's counters while it has devices."""
        for section in self.host.sections.live:
            if isinstance(section, BlockSection):
                return section.disk_info()
        return None

    # -- the migration thread ---------------------------------------------

    def _phase(self) -> str:
        if self.host.runstate.running:
            return "precopy"
        return "postcopy" if self.status.status in POSTCOPY_STATES else "downtime"

    def _run(self, channel_factory: Callable[[], Channel], addr: MigrationAddress) -> None:
        runstate = self.host.runstate
        saver: SaveVM | None = None
        self._was_running = runstate.running
        self._stopped = False
        try:
            self.channel = channel = channel_factory()
            self.file = f = QEMUFileOut(channel, self.limiter)
            if self.status.status == S.CANCELLING:
                raise MigrationCancelled()
            # QEMU's migration state notifiers in migrate_fd_connect, before the thread: the
            # failover standby asks the guest to unplug its primary (docs/failover.md).
            self.host.failover.request_unplug()
            self.expected_downtime = self.config.params.downtime_limit
            thread_start = now_ms()
            self._addr = addr
            self.preempt = self._open_preempt(channel_factory)
            self.multifd = self._open_multifd(addr, channel, channel_factory)
            ctx = SaveContext(self.config, f, self.limiter, self.stats, self.xbzrle_stats, self.compression_stats,
                              self.multifd, self._phase, self._pass_event, self._period_end, self.page_requests,
                              self.preempt, self.write_tracking)
            saver = SaveVM(self.host.sections, ctx, self.host.machine_type, self.host.uuid)
            caps = self.config.caps
            if caps.background_snapshot:
                BackgroundSnapshot(self.host, self.status, saver, f, self.write_tracking, self, now_ms,
                                   _Window(self, f).step).run(thread_start)
                return
            if caps.return_path or caps.postcopy_ram:
                self.rp = self._open_return_path(channel, saver)
            try:
                saver.setup()
            except ChannelError:
                pass  # as QEMU's file keeps a write error, the loop below fails the migration once active
            wait_unplug(self.status, self.host.failover, S.SETUP, S.ACTIVE)
            self.setup_time = int(now_ms() - thread_start)
            trace("migration_thread_setup_complete")
            window = _Window(self, f)
            while self.status.status in (S.ACTIVE, S.POSTCOPY_ACTIVE):
                try:
                    if self._turn(saver, window):
                        break
                except ChannelError as err:
                    if self.status.status != S.POSTCOPY_ACTIVE:
                        raise
                    # The destination runs the guest and lacks pages only this side has.
                    self._postcopy_pause(str(err))
                    self._postcopy_recover(saver)
                    window = _Window(self, self.file)
            if self.status.status == S.CANCELLING:
                raise MigrationCancelled()
            if self.status.status == S.COLO:
                self._colo()
        except (MigrationCancelled, SnapshotCancelled):
            pass
        except (MultifdSetupError, WriteTrackingError) as err:
            log.error("%s", err)
            self._fail(None)
        except MigrationError as err:
            # A section's setup refused (dirty-bitmap's checks): QEMU error_reports it and fails.
            log.error("%s", err.desc)
            self._fail(err.desc)
        except (ChannelError, OSError, ValueError) as err:
            rp = self.rp
            if rp is not None:
                # The destination's own verdict explains a broken pipe better.
                rp.join(timeout=2)
            self._fail(rp.error if rp is not None and rp.error else str(err))
        except Exception as err:
            # A bug must cost this migration, not leave it running for ever; the guest goes on.
            log.exception("outgoing migration failed")
            self._fail(str(err))
        finally:
            self._finish(self._was_running, self._stopped)
            if saver is not None:
                saver.cleanup()
            if self.multifd is not None:
                self.multifd.close()
            self.multifd = None
            self._close_link()
            self._fast_switch.exit()
            # QEMU's cleanup bottom half.
            self.status.transition(S.CANCELLING, S.CANCELLED)
            if self.status.status in (S.FAILED, S.CANCELLED):
                # The notifiers after cleanup (migration_has_failed): the primary comes back.
                self.host.failover.replug()
            if self._on_cleanup is not None:
                self._on_cleanup()

    def _turn(self, saver: SaveVM, window: "_Window") -> bool:
        """One turn of QEMU's migration_thread loop; True when the migration is over."""
        f, rp = self.file, self.rp
        if self.status.status == S.POSTCOPY_ACTIVE:
            if self._postcopy_iteration(saver, f, rp):
                return True
        elif not f.rate_limited():
            if self._postcopy_due(saver):
                self._stopped = True
                self._was_running = self._postcopy_start(saver) or self._was_running
                return False
            if self._iteration(saver):
                self._stopped = True
                self._was_running = self._complete(saver, f, rp) or self._was_running
                return True
        if self.status.status == S.CANCELLING:
            raise MigrationCancelled()
        if f.error:
            raise ChannelError(f.error)
        if self.preempt is not None and self.preempt.error:
            raise ChannelError(self.preempt.error)
        if rp is not None and rp.error:
            raise ChannelError(rp.error)
        window.step()
        return False

    def _open_preempt(self, factory: Callable[[], Channel]) -> QEMUFileOut | None:
        """The postcopy-preempt channel: a second connection to the same address, no handshake
        (docs/qemu/postcopy.md §6); never rate-limited, since a faulting guest waits on it."""
        if not self.config.caps.postcopy_preempt:
            return None
        if not self._addr.multi_channel:
            raise ChannelError("postcopy-preempt needs a tcp:, unix: or vsock: migration URI")
        return QEMUFileOut(factory(), RateLimiter(0))

    def _close_link(self) -> None:
        """Close the main and preempt channels and end the return-path reader."""
        preempt, self.preempt = self.preempt, None
        if preempt is not None:
            preempt.shutdown()
            try:
                preempt.channel.close()
            except (ChannelError, OSError):
                pass
        channel, rp = self.channel, self.rp
        self.channel = self.rp = self.file = None
        if channel is None:
            return
        if rp is not None:
            channel.shutdown()
            rp.join(timeout=10)
        try:
            channel.close()
        except (ChannelError, OSError):
            pass

    # -- postcopy recovery (docs/qemu/postcopy.md §7) -----------------------------------

    def _postcopy_pause(self, reason: str) -> None:
        log.warning("postcopy paused: %s", reason)
        trace("postcopy_pause", reason=reason)
        self._close_link()
        self.status.transition(S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED)

    def _postcopy_recover(self, saver: SaveVM) -> None:
        """Wait in ``postcopy-paused`` for ``migrate resume=true`` (or a cancel), then the handshake.

        A failed handshake pauses again, and the next ``resume`` tries anew.
        """
        while True:
            self._resume.wait()
            self._resume.clear()
            if self.status.status == S.CANCELLING:
                raise MigrationCancelled()
            factory = self._resume_factory
            try:
                channel = factory()
            except ChannelError as err:
                log.error("postcopy resume: %s", err)
                self.error_desc = str(err)
                continue
            if not self.status.transition(S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER):
                channel.close()
                raise MigrationCancelled()
            self.channel = channel
            self.file = f = QEMUFileOut(channel, self.limiter)
            try:
                self.preempt = self._open_preempt(factory)
            except ChannelError as err:
                log.error("postcopy resume: %s", err)
                self._close_link()
                self.status.transition(S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED)
                continue
            saver.set_file(f, self.preempt)
            self.rp = rp = ReturnPathReader(channel, {b.idstr: b.size for b in self.host.ram_blocks},
                                            self.page_requests)
            rp.start()
            try:
                self._resume_handshake(saver, f, rp)
            except ChannelError as err:
                log.error("postcopy resume handshake failed: %s", err)
                self._close_link()
                if not self.status.transition(S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED):
                    raise MigrationCancelled()
                continue
            self.limiter.set_rate(self.config.params.max_postcopy_bandwidth)
            self.limiter.new_window()
            return

    def _resume_handshake(self, saver: SaveVM, f: QEMUFileOut, rp: "ReturnPathReader") -> None:
        """RECV_BITMAP per block, the bitmaps back, RESUME, RESUME_ACK; then ``postcopy-active``.

        The new connection carries no header: the destination is mid-stream.
        Whatever the destination has not received becomes dirty again, so
        nothing it lacks is lost and nothing it has is sent twice.
        """
        blocks = [b.idstr for b in self.host.ram_blocks]
        for name in blocks:
            f.put(stream.recv_bitmap(name))
        f.flush()
        bitmaps = rp.wait_bitmaps(blocks, RESUME_TIMEOUT)
        saver.postcopy_resume(bitmaps)
        f.put(stream.postcopy_resume())
        f.flush()
        rp.wait_resume_ack(RESUME_TIMEOUT)
        if not self.status.transition(S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE):
            raise MigrationCancelled()

    def resume(self, uri: str, named_fds: dict[str, int]) -> None:
        """``migrate uri=... resume=true`` on a paused attempt: connect from the migration thread."""
        self._resume_factory, self._addr = self._channel_factory(uri, named_fds)
        self._resume.set()

    def pause(self) -> None:
        """``migrate-pause``: break the channel; the migration thread pauses on the error."""
        self.shutdown_channel()

    def _open_multifd(self, addr: MigrationAddress, channel: Channel,
                      connect_channel: Callable[[], Channel]) -> MultifdSender | None:
        """Zero-copy check on the main channel, then the multifd channels (docs/qemu/multifd.md §1, §8)."""
        caps, params = self.config.caps, self.config.params
        zero_copy = caps.zero_copy_send
        if zero_copy and addr.multi_channel and not ZeroCopySocket.enable(channel.sock):
            raise ChannelError("Zero copy send feature not detected in host kernel")
        if not caps.multifd:
            return None
        if not addr.multi_channel:
            raise MultifdSetupError("multifd is not supported by current protocol")
        uuid = self.host.uuid
        channels = open_channels(connect_channel, params.multifd_channels, zero_copy,
                                 uuidlib.UUID(uuid).bytes if uuid else bytes(16))
        return multifd_sender(channels, params.multifd_compression, params.multifd_level, zero_copy, self.stats,
                              self.limiter.account, migrated_blocks(self.host.ram_blocks, self.config))

    def _pass_event(self, count: int) -> None:
        self.pass_starts.append(self.stats.remaining_pages)
        if self.config.caps.events:
            self.host.emit_event("MIGRATION_PASS", {"pass": count})

    def _period_end(self, dirty_bytes: int, transferred_bytes: int) -> None:
        if self.config.caps.auto_converge:
            self.auto_converge.period_end(dirty_bytes, transferred_bytes, self.config.params)

    def _iteration(self, saver: SaveVM) -> bool:
        """One loop turn (QEMU's migration_iteration_run); True when it is time to complete.

        One change from QEMU 7.2: never before the first copy of RAM is out.
        QEMU completes as soon as what is left fits in ``downtime-limit`` at
        the measured bandwidth, so an idle guest stops with the last
        ~``downtime-limit`` worth of its first copy unsent (about 270 ms of
        downtime at 4 GiB).  Those pages are not dirt: sending them live
        costs the same time and leaves only what the guest re-dirtied.
        """
        pending = saver.pending_estimate()
        trace("migrate_pending_estimate", size=pending, threshold=self.threshold_size)
        if pending and not saver.first_copy_done:
            saver.iterate()
            return False
        if pending < self.threshold_size:
            pending = saver.pending_exact()
        if pending == 0 or pending < self.threshold_size:
            return True
        saver.iterate()
        return False

    def _open_return_path(self, channel: Channel, saver: SaveVM) -> "ReturnPathReader":
        """Ask the destination to talk back (OPEN_RETURN_PATH, PING 1) and start listening."""
        if not channel.bidirectional:
            raise ChannelError("Unable to open return-path for postcopy")
        saver.open_return_path()
        reader = ReturnPathReader(channel, {b.idstr: b.size for b in self.host.ram_blocks}, self.page_requests,
                                  self.config.caps.x_colo)
        reader.start()
        return reader

    def _postcopy_due(self, saver: SaveVM) -> bool:
        """``migrate-start-postcopy`` was issued and precopy is not about to complete anyway."""
        if not self._postcopy_requested.is_set() or self.page_requests is None:
            return False
        pending = saver.pending_estimate()
        return pending > 0 and pending >= self.threshold_size

    def _postcopy_start(self, saver: SaveVM) -> bool:
        """Stop the guest and hand it over (QEMU's postcopy_start); returns whether it had been running.

        The status changes before the guest stops, as in QEMU.  The guest
        stays stopped here whatever happens next: the destination may
        already be running it.
        """
        host = self.host
        downtime_start = now_ms()
        trace("postcopy_start")
        host.global_state.runstate = host.runstate.state
        if self.config.caps.pause_before_switchover:
            while self._continue.acquire(blocking=False):
                pass
            if not self.status.transition(S.ACTIVE, S.PRE_SWITCHOVER):
                raise MigrationCancelled()
            self._continue.acquire()
            if not self.status.transition(S.PRE_SWITCHOVER, S.POSTCOPY_ACTIVE):
                raise MigrationCancelled()
        elif not self.status.transition(S.ACTIVE, S.POSTCOPY_ACTIVE):
            raise MigrationCancelled()
        was_running = host.runstate.force_stop("finish-migrate")
        self.postcopy_started = True
        self._fast_switch.enter()
        self.limiter.set_rate(self.config.params.max_postcopy_bandwidth)
        self.limiter.new_window()
        host.block.inactivate_all()
        saver.postcopy_switch()
        self.downtime = int(now_ms() - downtime_start)
        trace("postcopy_start_set_run", downtime=self.downtime)
        return was_running

    def _postcopy_iteration(self, saver: SaveVM, f: QEMUFileOut, rp: "ReturnPathReader") -> bool:
        """One loop turn in postcopy: page requests first, then background pages; True once completed."""
        requests = self.page_requests
        if f.rate_limited() and not requests.pending():
            return False
        if not saver.postcopy_iterate() or requests.pending():
            return False
        saver.complete_postcopy()
        rp.join()
        if rp.error:
            raise ChannelError(rp.error)
        self.total_time = int(now_ms() - self.start_ms)
        transfer = self.total_time - self.setup_time
        if transfer:
            self.mbps = f.transferred * 8 / transfer / 1000
        if not self.status.transition(S.POSTCOPY_ACTIVE, S.COMPLETED):
            raise MigrationCancelled()
        return True

    def _complete(self, saver: SaveVM, f: QEMUFileOut, rp: "ReturnPathReader | None") -> bool:
        """Stop-and-copy; returns whether the guest had been running."""
        host = self.host
        downtime_start = now_ms()
        host.global_state.runstate = host.runstate.state
        was_running = host.runstate.force_stop("finish-migrate")
        trace("migration_completion_vm_stop", was_running=was_running)
        if self.config.caps.pause_before_switchover:
            while self._continue.acquire(blocking=False):
                pass
            if self.status.transition(S.ACTIVE, S.PRE_SWITCHOVER):
                self._continue.acquire()
                if not self.status.transition(S.PRE_SWITCHOVER, S.DEVICE):
                    raise MigrationCancelled()
        if self.status.status == S.CANCELLING:
            raise MigrationCancelled()
        self.limiter.set_rate(0)
        saver.complete()
        colo = self.config.caps.x_colo
        if not colo:
            # The destination takes the images over (qemu_savevm_state_complete_precopy's
            # bdrv_inactivate_all); a failure from here on gives them back with the guest.
            host.block.inactivate_all()
        if rp is not None:
            rp.join()
            if rp.error:
                raise ChannelError(rp.error)
        end = now_ms()
        # The figures first: a query-migrate that sees 'completed' must see them too.
        self.total_time = int(end - self.start_ms)
        self.downtime = int(end - downtime_start)
        transfer = self.total_time - self.setup_time
        if transfer:
            self.mbps = (f.transferred + self.stats.multifd_bytes) * 8 / transfer / 1000
        status = self.status.status
        # migration_completion: an x-colo source enters COLO instead of completing.
        final = S.COLO if colo and status == S.ACTIVE else S.COMPLETED
        if final == S.COLO:
            self._colo_engage(saver)
        if status not in (S.ACTIVE, S.DEVICE) or not self.status.transition(status, final):
            if self.colo is not None:
                self.colo_state.disengaged()
                self.colo = None
            raise MigrationCancelled()
        return was_running

    def _colo_engage(self, saver: SaveVM) -> None:
        """The checkpointing engine, in primary mode before the status shows ``colo``."""
        f = self.file
        self.colo = ColoPrimary(self.colo_state, self.channel, f, saver, self.host.runstate,
                                lambda: self.config.params.x_checkpoint_delay,
                                lambda: self.status.transition(S.COLO, S.COMPLETED), self.colo_stats,
                                lambda: f.transferred + self.stats.multifd_bytes)
        self.colo.engage()

    def _colo(self) -> None:
        """migrate_start_colo_process: checkpoints on this thread until a failover ends them;
        the guest runs on here whatever the outcome (docs/colo.md)."""
        self._was_running = False
        # With return-path its reader already took the secondary's CHECKPOINT_READY.
        self.colo.run(ready=self.rp is not None and self.rp.colo_ready)

    def _fail(self, desc: str | None) -> None:
        self.error_desc = desc
        trace("migrate_fd_error", error_desc=desc)
        self.status.fail()

    def _finish(self, was_running: bool, stopped: bool) -> None:
        """QEMU's migration_iteration_finish: the run state, before any cleanup.

        A client reacting to ``MIGRATION completed`` must already see
        ``postmigrate`` (or a restarted guest), so this runs before channels
        are closed, which may take a while.
        """
        runstate = self.host.runstate
        self.auto_converge.stop()
        if self.config.caps.background_snapshot:
            return  # the snapshot restarted its guest itself (background_snapshot.py)
        if self.colo is not None:
            return  # the primary went on alone after its failover
        if self.status.status == S.COMPLETED or self.postcopy_started:
            runstate.set("postmigrate")
        elif stopped or runstate.state == "finish-migrate":
            self.host.block.activate_all()
            if was_running:
                runstate.start()
            elif runstate.state == "finish-migrate":
                runstate.set("postmigrate")


class ReturnPathReader(threading.Thread):
    """Reads the destination's return-path messages until SHUT (QEMU's rp thread).

    A non-zero SHUT or a broken return path becomes ``error``; the migration
    thread fails on it, with the reason as ``error-desc`` (QEMU 7.2 fails
    without one).
    """

    def __init__(self, channel: Channel, blocks: dict[str, int], page_requests: PageRequests | None,
                 colo: bool = False) -> None:
        """*blocks* (RAM block name -> size) validate page requests, which go to *page_requests*;
        with *colo* the reader also ends at the secondary's CHECKPOINT_READY (``colo_ready``)."""
        super().__init__(name="return path", daemon=True)
        self.channel = channel
        self.colo = colo
        self.colo_ready = False
        self.blocks = blocks
        self.page_requests = page_requests
        self.error: str | None = None
        self.pongs: list[int] = []
        #: A recovery's answers: received bitmaps by block, and RESUME_ACK.
        self._bitmaps: dict[str, np.ndarray] = {}
        self._resumed = False
        self._answer = threading.Condition()

    def wait_bitmaps(self, blocks: list[str], timeout: float) -> dict[str, np.ndarray]:
        """The destination's received bitmap for each of *blocks*; ChannelError if they do not come."""
        with self._answer:
            if not self._answer.wait_for(lambda: self.error or all(b in self._bitmaps for b in blocks), timeout):
                raise ChannelError("postcopy recovery: no received bitmap from the destination")
        if self.error:
            raise ChannelError(self.error)
        return dict(self._bitmaps)

    def wait_resume_ack(self, timeout: float) -> None:
        with self._answer:
            if not self._answer.wait_for(lambda: self.error or self._resumed, timeout):
                raise ChannelError("postcopy recovery: no RESUME_ACK from the destination")
        if self.error:
            raise ChannelError(self.error)

    def _answered(self, event: object) -> None:
        with self._answer:
            if isinstance(event, return_path.RpRecvBitmap):
                self._bitmaps[event.block] = event.received(self.blocks[event.block] // PAGE_SIZE)
            else:
                self._resumed = True
            self._answer.notify_all()

    def run(self) -> None:
        decoder = return_path.ReturnPathDecoder(self.blocks, colo=self.colo)
        try:
            while True:
                data = self.channel.read(4096)
                if not data:
                    self.error = "RP: the destination closed the return path without SHUT"
                    return
                decoder.feed(data)
                while (event := decoder.next_event()) is not NEED_DATA:
                    if isinstance(event, return_path.RpShut):
                        trace("source_return_path_thread_shut", value=event.value)
                        if event.value:
                            self.error = f"RP: Sibling indicated error {event.value}"
                        return
                    if isinstance(event, return_path.RpColoReady):
                        # Beyond QEMU 7.2 (whose source fails here): COLO takes the channel over.
                        trace("source_return_path_thread_colo_ready")
                        self.colo_ready = True
                        return
                    if isinstance(event, return_path.RpPong):
                        trace("source_return_path_thread_pong", value=event.value)
                        self.pongs.append(event.value)
                    elif isinstance(event, (return_path.RpRecvBitmap, return_path.RpResumeAck)):
                        trace("source_return_path_thread_recovery", event=type(event).__name__)
                        self._answered(event)
                    elif isinstance(event, return_path.RpReqPages) and self.page_requests is not None:
                        trace("migrate_handle_rp_req_pages", rbname=event.block, start=event.start,
                              len=event.length)
                        self.page_requests.put(event.block, event.start, event.length)
                    else:
                        raise WireError(f"RP: unexpected {type(event).__name__}")
        except (ChannelError, WireError) as err:
            self.error = str(err)
        finally:
            with self._answer:
                self._answer.notify_all()


class _Window:
    """The 100 ms bandwidth window: rate limit, mbps, threshold, expected downtime."""

    def __init__(self, session: OutgoingSession, f: QEMUFileOut) -> None:
        self.session = session
        self.f = f
        self.start = now_ms()
        self.bytes0 = self.total_bytes()
        self.pages0 = session.stats.pages_sent

    def total_bytes(self) -> int:
        """Main channel bytes plus multifd-bytes (QEMU's migration_total_bytes)."""
        return self.f.transferred + self.session.stats.multifd_bytes

    def step(self) -> None:
        now = now_ms()
        self.update(now)
        if self.f.rate_limited() and not self.f.error:
            delay = (self.start + WINDOW_SECONDS * 1000 - now_ms()) / 1000
            if delay > 0:
                requests = self.session.page_requests
                if requests is None:
                    time.sleep(delay)
                else:
                    # A postcopy page request must not wait for the next window.
                    requests.urgent.wait(delay)
            self.update(now_ms())

    def update(self, now: float) -> None:
        if now < self.start + WINDOW_SECONDS * 1000:
            return
        session = self.session
        stats = session.stats
        xfer = self.total_bytes() - self.bytes0
        dt = now - self.start
        bw = xfer / dt
        session.threshold_size = int(bw * session.config.params.downtime_limit)
        session.mbps = xfer * 8 / (dt / 1000) / 1e6
        session.pages_per_second = int((stats.pages_sent - self.pages0) / (dt / 1000))
        if stats.dirty_pages_rate and xfer > 10000:
            session.expected_downtime = int(stats.remaining_pages * 4096 / bw)
        if session.status.status == S.ACTIVE:
            starts = session.pass_starts
            if len(starts) >= 3:
                # Each pass leaves q of what it started with, whatever the guest's pattern: the
                # dirty rate that matters is q × bandwidth, applied to the current pass's size
                # (what remains mid-pass dips before the next sync brings the dirt back).
                dirty_rate = starts[-1] / max(starts[-2], 1) * bw * 1000
                remaining = starts[-1] * PAGE_SIZE
            else:
                # During the first copy: the pages dirtied again per second, as QEMU counts them.
                dirty_rate = stats.dirty_pages_rate * PAGE_SIZE
                remaining = stats.remaining_pages * PAGE_SIZE
            session.forecast.update(ForecastSample(
                t=(now - session.start_ms) / 1000, remaining=remaining,
                transferred=self.total_bytes(), dirty_rate=dirty_rate,
                bandwidth=bw * 1000, downtime_limit_ms=session.config.params.downtime_limit))
        trace("migrate_transferred", transferred=xfer, time_spent=int(dt), bandwidth=int(bw),
              threshold_size=session.threshold_size)
        session.limiter.new_window()
        self.start = now_ms()
        self.bytes0 = self.total_bytes()
        self.pages0 = stats.pages_sent
