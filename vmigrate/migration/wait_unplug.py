"""The ``wait-unplug`` status: a migration leaves ``setup`` only once the guest has unplugged its
failover primaries.

QEMU 7.2's qemu_savevm_wait_unplug (migration/migration.c), run by both the
migration thread and the background-snapshot thread right after the setup
sections were written (docs/qemu/states.md "wait-unplug", docs/failover.md):
with an unplug pending, ``setup → wait-unplug``, then a poll every 250 ms
(nothing wakes it sooner) until the guest is done or the status changed
(``migrate_cancel``); ``wait-unplug → active`` at the end, a compare-and-swap
that a cancel has already made fail.  A cancelled migration still waits up to
30 s for the guest to finish the unplug it started, so that the device can be
plugged back whole.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from vmigrate.migration.port import GuestUnplug
from vmigrate.migration.status import MigrationStatus, StatusMachine

log = logging.getLogger(__name__)
S = MigrationStatus

#: QEMU's qemu_sem_timedwait(&s->wait_unplug_sem, 250): no one posts the semaphore.
POLL_S = 0.25
#: After a cancel: 120 polls, 30 s.
CANCELLED_POLLS = 120


def wait_unplug(status: StatusMachine, guest: GuestUnplug, old: MigrationStatus, new: MigrationStatus,
                sleep: Callable[[float], None] = time.sleep) -> bool:
    """From *old* to *new*, through ``wait-unplug`` while the guest has an unplug to finish;
    True if the status is *new* by this call."""
    if not guest.unplug_pending():
        return status.transition(old, new)
    status.transition(old, S.WAIT_UNPLUG)
    while status.status is S.WAIT_UNPLUG and guest.unplug_pending():
        sleep(POLL_S)
    if status.status is not S.WAIT_UNPLUG:
        polls = CANCELLED_POLLS
        while polls and guest.unplug_pending():
            sleep(POLL_S)
            polls -= 1
        if guest.unplug_pending():
            log.warning("migration: partially unplugged device on failure")
    return status.transition(S.WAIT_UNPLUG, new)
