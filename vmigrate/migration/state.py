"""The MigrationStatus variable shared by both directions (states.md §1).

Every change is a compare-and-swap that emits ``MIGRATION`` only when it
happened and only if this process's ``events`` capability is on; a failed
swap is silent.  That one rule resolves the races between the migration
threads, ``migrate_cancel`` and failures, as in QEMU.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from vmigrate.migration.options import MigrationOptions

if TYPE_CHECKING:
    from vmigrate.vm import VM


class MigrationStateMachine:
    """Base of the outgoing and incoming migrations: their ``state`` and its transitions."""

    def __init__(self, vm: "VM", options: MigrationOptions) -> None:
        self.vm = vm
        self.options = options
        self.state = "none"
        self._lock = threading.Lock()

    def set_state(self, old: str, new: str) -> bool:
        """QEMU's migrate_set_state: CAS, and an event only if it happened."""
        with self._lock:
            if self.state != old:
                return False
            self.state = new
        if self.options.cap("events"):
            self.vm.emit_event("MIGRATION", {"status": new})
        return True
