"""Failover pairs: the primary (passthrough) NIC that a migration asks the guest to unplug.

In QEMU 7.2 a ``virtio-net`` device with ``failover=on`` is the *standby* of a
PCI device whose ``failover_pair_id`` names it, the *primary* (usually a VFIO
VF, which cannot migrate).  When a migration starts, the standby's migration
state notifier asks the guest to unplug the primary (hw/net/virtio-net.c
failover_unplug_primary: a hot-unplug request to the PCI hotplug controller)
and emits ``UNPLUG_PRIMARY``; until the guest has ejected it the device's
``pending_deleted_event`` is set, which ``primary_unplug_pending`` reports and
the migration thread waits on (migration/migration.c qemu_savevm_wait_unplug,
docs/qemu/states.md "wait-unplug").  If the migration fails or is cancelled,
the notifier plugs the primary back (failover_replug_primary).  On a
destination the primary stays hidden until the guest's virtio-net driver
negotiates ``VIRTIO_NET_F_STANDBY`` (failover_add_primary), which the migrated
device state does.

vmigrate has no PCI bus and no guest driver, so :class:`FailoverPrimary` models
only what migration sees: the primary's plug state and the guest's side of the
unplug.  The software "guest" acknowledges an unplug request on its own, after
``unplug-delay`` ms (docs/failover.md).  ``--device
failover-primary,id=ID[,unplug-delay=MS]`` adds one; the standby is implied.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from enum import StrEnum
from typing import Callable

log = logging.getLogger(__name__)

#: How long the software guest takes to eject the primary by default.
DEFAULT_UNPLUG_DELAY_MS = 100


class FailoverError(ValueError):
    """A ``--device failover-primary`` that cannot be parsed."""


class PlugState(StrEnum):
    #: In the guest (QEMU: realized, not hidden).
    PLUGGED = "plugged"
    #: Unplug requested, the guest has not ejected it yet (QEMU's pending_deleted_event).
    UNPLUG_PENDING = "unplug-pending"
    #: Ejected by the guest; QEMU keeps its resources to plug it back (partially_hotplugged).
    UNPLUGGED = "unplugged"
    #: Not yet shown to the guest: a destination's primary before the standby's features arrive.
    HIDDEN = "hidden"


@dataclass(frozen=True)
class FailoverSpec:
    """One ``--device failover-primary,id=ID[,unplug-delay=MS]``, parsed."""

    id: str
    unplug_delay_ms: int = DEFAULT_UNPLUG_DELAY_MS

    @classmethod
    def parse(cls, text: str) -> "FailoverSpec":
        kind, *pairs = text.split(",")
        if kind != "failover-primary":
            raise FailoverError(f"'{kind}' is not a valid device model name")
        options: dict[str, str] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise FailoverError(f"Invalid parameter '{key}'")
            options[key] = value
        unknown = set(options) - {"id", "unplug-delay"}
        if unknown:
            raise FailoverError(f"Property 'failover-primary.{sorted(unknown)[0]}' not found")
        if not options.get("id"):
            raise FailoverError("failover-primary needs an id (the UNPLUG_PRIMARY device-id)")
        delay = options.get("unplug-delay", str(DEFAULT_UNPLUG_DELAY_MS))
        try:
            delay_ms = int(delay, 0)
        except ValueError:
            raise FailoverError(f"invalid unplug-delay '{delay}'") from None
        if delay_ms < 0:
            raise FailoverError("unplug-delay must not be negative")
        return cls(options["id"], delay_ms)


class FailoverPrimary:
    """One primary device and the software guest's handling of its unplug requests."""

    def __init__(self, spec: FailoverSpec, hidden: bool = False) -> None:
        """*hidden*: a destination's primary, shown to the guest only by :meth:`plug`."""
        self.id = spec.id
        self.unplug_delay_ms = spec.unplug_delay_ms
        self._state = PlugState.HIDDEN if hidden else PlugState.PLUGGED
        self._lock = threading.Lock()
        self._ejection: threading.Timer | None = None

    @property
    def state(self) -> PlugState:
        return self._state

    def request_unplug(self) -> bool:
        """Ask the guest to eject the device (failover_unplug_primary); False if it is not plugged."""
        with self._lock:
            if self._state is not PlugState.PLUGGED:
                return False
            self._state = PlugState.UNPLUG_PENDING
            # The guest's driver answers the hotplug controller's request on its own time.
            self._ejection = threading.Timer(self.unplug_delay_ms / 1000, self._guest_ejected)
            self._ejection.name = f"unplug {self.id}"
            self._ejection.daemon = True
            self._ejection.start()
        log.info("failover primary %s: unplug requested", self.id)
        return True

    def _guest_ejected(self) -> None:
        with self._lock:
            if self._state is not PlugState.UNPLUG_PENDING:
                return
            self._state = PlugState.UNPLUGGED
        log.info("failover primary %s: unplugged by the guest", self.id)

    @property
    def unplug_pending(self) -> bool:
        """QEMU's primary_unplug_pending: requested, not yet ejected."""
        return self._state is PlugState.UNPLUG_PENDING

    def plug(self) -> None:
        """Show the device to the guest again (failover_replug_primary, failover_add_primary).

        A device whose ejection is still pending is plugged back too, as
        QEMU does after its 30 s grace ("partially unplugged device on failure").
        """
        with self._lock:
            if self._state is PlugState.PLUGGED:
                return
            if self._ejection is not None:
                self._ejection.cancel()
                self._ejection = None
            self._state = PlugState.PLUGGED
        log.info("failover primary %s: plugged", self.id)

    def close(self) -> None:
        ejection = self._ejection
        if ejection is not None:
            ejection.cancel()


class FailoverPairs:
    """All the VM's primaries, as the migration engine's ``GuestUnplug`` port (migration/port.py)."""

    def __init__(self, primaries: list[FailoverPrimary], emit_event: Callable[[str, dict | None], None]) -> None:
        self.primaries = primaries
        self._emit = emit_event

    def request_unplug(self) -> bool:
        """The migration-start notifier: each plugged primary is asked out, with ``UNPLUG_PRIMARY``
        right after the request (virtio_net_handle_migration_primary); True if any was."""
        requested = False
        for primary in self.primaries:
            if primary.request_unplug():
                self._emit("UNPLUG_PRIMARY", {"device-id": primary.id})
                requested = True
        return requested

    def unplug_pending(self) -> bool:
        """qemu_savevm_state_guest_unplug_pending: any primary not yet ejected."""
        return any(p.unplug_pending for p in self.primaries)

    def replug(self) -> None:
        """The notifier on a failed or cancelled migration: every primary that left comes back."""
        for primary in self.primaries:
            if primary.state in (PlugState.UNPLUG_PENDING, PlugState.UNPLUGGED):
                primary.plug()

    def negotiated(self) -> None:
        """A destination's standby features arrived with the device state: hidden primaries appear."""
        for primary in self.primaries:
            if primary.state is PlugState.HIDDEN:
                primary.plug()

    def close(self) -> None:
        for primary in self.primaries:
            primary.close()
