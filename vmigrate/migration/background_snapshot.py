"""The ``background-snapshot`` migration: the VM as it was when ``migrate`` started, saved while it runs.

QEMU 7.2's bg_migration_thread (migration/migration.c, facts in
docs/qemu/snapshot-jobs.md §8; design in docs/background-snapshot.md): no
rate limit; populate RAM; header and setup; ``setup → active`` (through ``wait-unplug`` with a
failover primary, wait_unplug.py); stop the
guest (run state ``paused``), save the device state into memory,
write-protect all RAM, restart the guest whatever its state was; send RAM,
the pages the guest writes first; stop the protection; append the device
state; ``completed``.  The stream thus carries RAM first and the devices
last, every page with its content of the freeze point.  No dirty log: no
bitmap sync, no ``MIGRATION_PASS``.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

from vmigrate.machine.userfaultfd import UserfaultError
from vmigrate.machine.write_tracking import WriteTracking
from vmigrate.migration.channel import ChannelError
from vmigrate.migration.port import MigrationHost
from vmigrate.migration.qemu_file import QEMUFileOut
from vmigrate.migration.savevm import SaveVM
from vmigrate.migration.status import MigrationStatus, StatusMachine
from vmigrate.migration.wait_unplug import wait_unplug
from vmigrate.trace import trace

log = logging.getLogger(__name__)
S = MigrationStatus


class SnapshotCancelled(Exception):
    """The snapshot was cancelled: its status is ``cancelling``."""


class WriteTrackingError(Exception):
    """Write protection could not be set up; QEMU 7.2 fails without an ``error-desc``."""


class SnapshotTimes(Protocol):
    """The figures ``query-migrate`` shows, which the snapshot sets (the outgoing session's)."""

    start_ms: float
    setup_time: int
    downtime: int
    total_time: int
    mbps: float


class BackgroundSnapshot:
    """One snapshot's thread body, over the attempt's file and section loop."""

    def __init__(self, host: MigrationHost, status: StatusMachine, saver: SaveVM, f: QEMUFileOut,
                 tracking: WriteTracking, times: SnapshotTimes, now_ms: Callable[[], float],
                 on_turn: Callable[[], None]) -> None:
        """*tracking* is the one the saver's RAM section uses; *on_turn* runs after each loop
        turn (the bandwidth window: mbps and pages per second for ``query-migrate``)."""
        self.host = host
        self.status = status
        self.saver = saver
        self.f = f
        self.tracking = tracking
        self.times = times
        self.now_ms = now_ms
        self.on_turn = on_turn

    def run(self, thread_start: float) -> None:
        """Everything up to ``completed``; raises SnapshotCancelled, WriteTrackingError or ChannelError.

        Whatever happens, the write protection is gone on return, and a
        guest this stopped runs again.
        """
        self.f.limiter.set_rate(0)
        self.tracking.prepare()
        try:
            self.saver.setup()
        except ChannelError:
            pass  # the file keeps the error: the loop fails the snapshot once active, as in QEMU
        if not wait_unplug(self.status, self.host.failover, S.SETUP, S.ACTIVE):
            raise SnapshotCancelled()
        self.times.setup_time = int(self.now_ms() - thread_start)
        trace("migration_thread_setup_complete")
        downtime_start = self.now_ms()
        runstate = self.host.runstate
        was_running = runstate.running
        self.host.global_state.runstate = runstate.state
        runstate.force_stop("paused")
        try:
            device_state = self.saver.non_iterable_state()
            self.tracking.start()
        except Exception as err:
            # QEMU leaves the guest paused here: the snapshot is lost, the guest need not be.
            if was_running:
                runstate.start()
            if isinstance(err, UserfaultError):
                raise WriteTrackingError(str(err)) from err
            raise
        try:
            # QEMU restarts from a bottom half, unconditionally, even a guest paused before.
            runstate.start()
            self.times.downtime = int(self.now_ms() - downtime_start)
            self._save_ram(device_state)
        finally:
            self.tracking.stop()

    def _save_ram(self, device_state: bytes) -> None:
        """QEMU's loop of bg_migration_iteration_run until RAM is all out, then bg_migration_completion."""
        f = self.f
        while self.status.status == S.ACTIVE:
            if self.saver.iterate():
                self._complete(device_state)
                return
            if f.error:
                raise ChannelError(f.error)
            self.on_turn()
        raise SnapshotCancelled()

    def _complete(self, device_state: bytes) -> None:
        """Protection off, the devices after the RAM, the figures, ``completed``."""
        self.tracking.stop()
        if self.status.status != S.ACTIVE:
            raise SnapshotCancelled()
        f = self.f
        f.put(device_state)
        f.flush()
        times = self.times
        end = self.now_ms()
        # The figures first: a query-migrate that sees 'completed' must see them too.
        times.total_time = int(end - times.start_ms)
        transfer = times.total_time - times.setup_time
        if transfer:
            times.mbps = f.transferred * 8 / transfer / 1000
        if not self.status.transition(S.ACTIVE, S.COMPLETED):
            raise SnapshotCancelled()
