"""Device models whose state travels in FULL sections (QEMU's vmstate registrations).

Each model names its section (idstr, instance, section id), describes its
fields with a :class:`~vmigrate.migration.wire.vmstate.Description`, and
converts its live state to and from plain values.  The migration code saves
and loads every model registered in the VM's section registry generically,
so a new device (vCPU state, a UART) is one more registration, not new
migration code.  The descriptions of the two devices of ``-M none`` live
here too (QEMU's cpu-timers.c and migration/global_state.c).

Section ids and order follow ``qemu-system-x86_64 -M none``: ``timer`` is 0,
``ram`` 2, ``globalstate`` 4, so a QEMU 7.2 destination accepts our stream.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any, Mapping, Protocol

from vmigrate.migration.wire import vmstate
from vmigrate.migration.wire.errors import WireError
from vmigrate.qapi.schema import load as load_schema


class DeviceModel(Protocol):
    idstr: str
    instance_id: int
    section_id: int
    description: vmstate.Description

    def save(self) -> dict: ...

    def load(self, values: dict) -> None: ...


@lru_cache(maxsize=1)
def runstate_names() -> frozenset[str]:
    """QAPI RunState names, from the schema vmigrate serves."""
    return frozenset(load_schema().enum_values("RunState"))


RUNSTATE_SIZE = 100


def _check_globalstate(values: dict) -> None:
    raw = values["runstate"][:RUNSTATE_SIZE - 1]
    name = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    if name not in runstate_names():
        raise WireError(f"invalid parameter value: {name}")


def runstate_buffer(name: str) -> bytes:
    raw = name.encode("ascii")
    if len(raw) >= RUNSTATE_SIZE:
        raise ValueError("runstate name too long")
    return raw.ljust(RUNSTATE_SIZE, b"\0")


def globalstate_runstate(values: Mapping[str, Any]) -> str:
    """The run state name carried by decoded globalstate values."""
    return values["runstate"][:RUNSTATE_SIZE - 1].split(b"\0", 1)[0].decode("ascii")


TIMER_ICOUNT = vmstate.Description(
    "timer/icount", 1,
    (vmstate.Field("qemu_icount_bias", "int64", 8), vmstate.Field("qemu_icount", "int64", 8)),
    subsections=(
        vmstate.Description("timer/icount/warp_timer", 1,
                    (vmstate.Field("vm_clock_warp_start", "int64", 8),
                     vmstate.Field("icount_warp_timer", "timer", 8)), minimum_version_id=1),
        vmstate.Description("timer/icount/timers", 1,
                    (vmstate.Field("icount_rt_timer", "timer", 8),
                     vmstate.Field("icount_vm_timer", "timer", 8)), minimum_version_id=1),
        vmstate.Description("timer/icount/shift", 2,
                    (vmstate.Field("icount_time_shift", "int16", 2),
                     vmstate.Field("last_delta", "int64", 8)), minimum_version_id=2),
    ),
    minimum_version_id=1,
)

TIMER = vmstate.Description(
    "timer", 2,
    (vmstate.Field("cpu_ticks_offset", "int64", 8),
     vmstate.Field("unused", "unused_buffer", 8),
     vmstate.Field("cpu_clock_offset", "int64", 8, version_id=2)),
    subsections=(TIMER_ICOUNT,),
    minimum_version_id=1,
)

GLOBALSTATE = vmstate.Description(
    "globalstate", 1,
    (vmstate.Field("size", "uint32", 4), vmstate.Field("runstate", "buffer", RUNSTATE_SIZE)),
    minimum_version_id=1,
    check=_check_globalstate,
)


def timer_values(cpu_ticks_offset: int = 0, cpu_clock_offset: int = 0) -> dict:
    return {"cpu_ticks_offset": cpu_ticks_offset, "cpu_clock_offset": cpu_clock_offset}


def globalstate_values(runstate: str) -> dict:
    """Values as QEMU's pre_save sets them: size = strlen + 1."""
    if runstate not in runstate_names():
        raise ValueError(f"not a RunState: {runstate}")
    return {"size": len(runstate) + 1, "runstate": runstate_buffer(runstate)}


def none_machine_bodies() -> dict[str, vmstate.VMStateBodyDecoder]:
    """Body decoders for the device sections of ``-M none`` (timer, globalstate)."""
    return {"timer": vmstate.VMStateBodyDecoder(TIMER), "globalstate": vmstate.VMStateBodyDecoder(GLOBALSTATE)}


class VirtualClock:
    """QEMU's timers_state: guest time = host monotonic time + offset.

    Migrating the offsets keeps guest time continuous across hosts.
    """

    idstr = "timer"
    instance_id = 0
    section_id = 0
    description = TIMER

    def __init__(self) -> None:
        self.cpu_ticks_offset = 0
        self.cpu_clock_offset = -time.monotonic_ns()

    def now_ns(self) -> int:
        """The guest clock (QEMU's QEMU_CLOCK_VIRTUAL), which a snapshot records."""
        return time.monotonic_ns() + self.cpu_clock_offset

    def save(self) -> dict:
        return timer_values(self.cpu_ticks_offset, self.cpu_clock_offset)

    def load(self, values: dict) -> None:
        self.cpu_ticks_offset = values["cpu_ticks_offset"]
        # A version-1 section has no clock offset (QEMU's vmstate_timers): the local one stays.
        self.cpu_clock_offset = values.get("cpu_clock_offset", self.cpu_clock_offset)


class GlobalState:
    """The source's run state at switchover (QEMU's globalstate section).

    The source stores its run state just before stopping the guest; the
    destination reads it to decide whether to start the guest.
    """

    idstr = "globalstate"
    instance_id = 0
    section_id = 4
    description = GLOBALSTATE

    def __init__(self) -> None:
        #: Set by the source before the stop; by the destination when loaded (None: not received).
        self.runstate: str | None = None

    def save(self) -> dict:
        return globalstate_values(self.runstate or "running")

    def load(self, values: dict) -> None:
        self.runstate = globalstate_runstate(values)
