"""The migration engine's view of its VM: a narrow port, not the VM object.

QEMU's migration code reaches the rest of the process through globals
(``current_machine``, ``runstate``, ``qemu_uuid``, ``savevm_state``); here
``vmigrate.vm`` builds one :class:`MigrationHost` with exactly what the
engine may use, and nothing under ``vmigrate/migration`` imports the VM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

from vmigrate.block.node import BlockGraph
from vmigrate.machine.announce import AnnounceParameters
from vmigrate.machine.devices import GlobalState
from vmigrate.machine.memory import RAMBlock
from vmigrate.machine.runstate import RunState
from vmigrate.machine.vcpus import VcpuBackend
from vmigrate.migration.savevm import SectionRegistry


class GuestUnplug(Protocol):
    """The failover primaries a migration must see unplugged first (vmigrate/machine/failover.py).

    QEMU reaches them through the migration state notifiers and the
    ``dev_unplug_pending`` hook of the standby's VMState (hw/net/virtio-net.c).
    """

    def request_unplug(self) -> bool:
        """Ask the guest to unplug every plugged primary, emitting ``UNPLUG_PRIMARY`` for each."""

    def unplug_pending(self) -> bool:
        """Whether the guest has yet to finish an unplug."""

    def replug(self) -> None:
        """Plug back what a failed or cancelled migration had unplugged."""

    def negotiated(self) -> None:
        """A destination loaded the standby's state: its hidden primaries appear to the guest."""


@dataclass(frozen=True)
class MigrationHost:
    ram_blocks: list[RAMBlock]
    #: Everything that migrates, in stream order.
    sections: SectionRegistry
    runstate: RunState
    #: The run state that travels at switchover (QEMU's globalstate section).
    global_state: GlobalState
    #: For auto-converge's throttle; the RAM section holds its own reference for the dirty log.
    vcpus: VcpuBackend
    #: ``--uuid``; None when unset (QEMU's qemu_uuid_set false).
    uuid: str | None
    #: The configuration section's machine name.
    machine_type: str
    #: Sends a QMP event from any thread.
    emit_event: Callable[[str, dict | None], None]
    #: The user-created objects by id (QEMU's ``/objects``), which ``tls-creds`` and ``tls-authz`` name.
    objects: Mapping[str, object]
    #: The VM's disks: block migration, dirty-bitmap migration and snapshots work on them.
    block: BlockGraph
    #: Starts the self-announcement of an incoming migration (QEMU's qemu_announce_self on
    #: MigrationIncomingState's timer); returns at once, the rounds run on their own thread.
    announce: Callable[[AnnounceParameters], None]
    #: The failover primaries: unplugged by the guest before a migration leaves ``setup``.
    failover: GuestUnplug
