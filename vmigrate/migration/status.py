"""MigrationStatus and the one table of its legal transitions, for both directions.

As in h11, every legal transition stands in :data:`TRANSITIONS` and nowhere
else; asking for any other one raises :class:`IllegalTransition`.  A change
is a compare-and-swap (QEMU's ``migrate_set_state``, migration/migration.c):
it happens only if the status is still the expected one, and only a change
that happened emits ``MIGRATION`` (when the ``events`` capability is on).
That one rule settles the races between the migration threads,
``migrate_cancel`` and failures, as it does in QEMU.
"""

from __future__ import annotations

import threading
from enum import StrEnum
from typing import Callable

from vmigrate.trace import trace


class MigrationStatus(StrEnum):
    """QAPI ``MigrationStatus`` (qapi/migration.json)."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"

    @property
    def is_running(self) -> bool:
        """QEMU's migration_is_running: a migration holds the channels and refuses a second one."""
        return self in RUNNING


S = MigrationStatus

RUNNING = frozenset({
    S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER,
    S.PRE_SWITCHOVER, S.DEVICE, S.WAIT_UNPLUG, S.CANCELLING,
})

#: Every legal transition, source and destination alike (QEMU 7.2's migrate_set_state calls
#: in migration/migration.c and migration/savevm.c for the features vmigrate implements).
TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    # Source: migrate; destination: a multifd channel refused before the stream began.
    S.NONE: frozenset({S.SETUP, S.ACTIVE, S.FAILED}),
    # completed: a snapshot-save stream (qemu_savevm_state) skips active.
    S.SETUP: frozenset({S.ACTIVE, S.WAIT_UNPLUG, S.COMPLETED, S.FAILED, S.CANCELLING}),
    # Only the migration thread leaves it (qemu_savevm_wait_unplug), or migrate_cancel.
    S.WAIT_UNPLUG: frozenset({S.ACTIVE, S.CANCELLING}),
    # Source: migrate-start-postcopy took effect; destination: POSTCOPY_LISTEN.
    # colo: an x-colo source's completion, or its destination's load (docs/colo.md).
    S.ACTIVE: frozenset({S.PRE_SWITCHOVER, S.POSTCOPY_ACTIVE, S.COMPLETED, S.COLO, S.FAILED, S.CANCELLING}),
    S.PRE_SWITCHOVER: frozenset({S.DEVICE, S.POSTCOPY_ACTIVE, S.FAILED, S.CANCELLING}),
    S.DEVICE: frozenset({S.COMPLETED, S.FAILED, S.CANCELLING}),
    S.CANCELLING: frozenset({S.CANCELLED}),
    # A broken channel or migrate-pause pauses a postcopy (docs/qemu/postcopy.md §7).
    S.POSTCOPY_ACTIVE: frozenset({S.POSTCOPY_PAUSED, S.COMPLETED, S.FAILED, S.CANCELLING}),
    S.POSTCOPY_PAUSED: frozenset({S.POSTCOPY_RECOVER, S.FAILED, S.CANCELLING}),
    S.POSTCOPY_RECOVER: frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.FAILED, S.CANCELLING}),
    # A failover ends COLO (primary_vm_do_failover, secondary_vm_do_failover).
    S.COLO: frozenset({S.COMPLETED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A transition that is not in :data:`TRANSITIONS`: a bug, never a race."""


class StatusMachine:
    """One direction's status (QEMU's ``MigrationState.state`` or ``MigrationIncomingState.state``)."""

    def __init__(self, emit: Callable[[str, dict | None], None], events: Callable[[], bool]) -> None:
        """*emit* sends a QMP event; *events* says whether the ``events`` capability is on now."""
        self._emit = emit
        self._events = events
        self._status = MigrationStatus.NONE
        self._lock = threading.Lock()

    @property
    def status(self) -> MigrationStatus:
        return self._status

    def transition(self, old: MigrationStatus, new: MigrationStatus) -> bool:
        """Move from *old* to *new* if the status is still *old*; True when it happened."""
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"migration status {old} -> {new}")
        with self._lock:
            if self._status is not old:
                return False
            self._status = new
        trace("migrate_set_state", new_state=new.value)
        if self._events():
            self._emit("MIGRATION", {"status": new.value})
        return True

    def fail(self) -> bool:
        """To ``failed`` from whichever status allows it; False if none does (cancelled, done)."""
        while True:
            old = self._status
            if MigrationStatus.FAILED not in TRANSITIONS[old]:
                return False
            if self.transition(old, MigrationStatus.FAILED):
                return True
