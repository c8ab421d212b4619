"""Device models whose state travels in FULL sections (QEMU's vmstate registrations).

Each model names its section (idstr, instance, section id), describes its
fields with a :class:`~vmigrate.migration.wire.vmstate.Description`, and
converts its live state to and from plain values.  The migration code saves
and loads every registered model generically, so a new device (vCPU state,
a UART) is one more entry in :meth:`VM.devices`, not new migration code.

Section ids and order follow ``qemu-system-x86_64 -M none``: ``timer`` is 0,
``ram`` 2, ``globalstate`` 4, so a QEMU 7.2 destination accepts our stream.
"""

from __future__ import annotations

import time
from typing import Protocol

from vmigrate.migration.wire import vmstate


class DeviceModel(Protocol):
    idstr: str
    instance_id: int
    section_id: int
    description: vmstate.Description

    def save(self) -> dict: ...

    def load(self, values: dict) -> None: ...


class VirtualClock:
    """QEMU's timers_state: guest time = host monotonic time + offset.

    Migrating the offsets keeps guest time continuous across hosts.
    """

    idstr = "timer"
    instance_id = 0
    section_id = 0
    description = vmstate.TIMER

    def __init__(self) -> None:
        self.cpu_ticks_offset = 0
        self.cpu_clock_offset = -time.monotonic_ns()

    def save(self) -> dict:
        return vmstate.timer_values(self.cpu_ticks_offset, self.cpu_clock_offset)

    def load(self, values: dict) -> None:
        self.cpu_ticks_offset = values["cpu_ticks_offset"]
        self.cpu_clock_offset = values["cpu_clock_offset"]


class GlobalState:
    """The source's run state at switchover (QEMU's globalstate section).

    The source stores its run state just before stopping the guest; the
    destination reads it to decide whether to start the guest.
    """

    idstr = "globalstate"
    instance_id = 0
    section_id = 4
    description = vmstate.GLOBALSTATE

    def __init__(self) -> None:
        #: Set by the source before the stop; by the destination when loaded (None: not received).
        self.runstate: str | None = None

    def save(self) -> dict:
        return vmstate.globalstate_values(self.runstate or "running")

    def load(self, values: dict) -> None:
        self.runstate = vmstate.globalstate_runstate(values)
