"""``--guest`` specs turned into x86 programs: which binary, and its arguments in registers.

The options are the software workloads' (parsed once by
:class:`~vmigrate.machine.guest.GuestSpec`); here they become the entry
registers each program's source documents.  Working memory starts at 1 MiB
(below is the loader's) and is clamped to the RAM the low memory slot maps.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmigrate.machine.guest import GuestSpec
from vmigrate.machine.memory import PAGE_SIZE
from vmigrate.machine.x86guest.boot import WORK_BASE

@dataclass(frozen=True)
class Program:
    name: str
    #: General registers at entry (the program's arguments).
    arguments: dict[str, int]


def _work_window(start: int, end: int, ram_top: int, kind: str) -> tuple[int, int]:
    first = max(-(-start // PAGE_SIZE) * PAGE_SIZE, WORK_BASE)
    last = min(end, ram_top) // PAGE_SIZE * PAGE_SIZE
    if last <= first:
        first, last = WORK_BASE, ram_top // PAGE_SIZE * PAGE_SIZE
    if last <= first:
        raise ValueError(f"guest '{kind}' needs more than {WORK_BASE >> 20} MiB of RAM under KVM")
    return first, last


def program_for(spec: GuestSpec, ram_top: int, tsc_hz: int) -> Program | None:
    """The program for *spec* in a guest whose low RAM ends at *ram_top* (bytes); None for ``idle``.

    An idle guest runs no code and leaves RAM untouched, as the software
    ``idle`` workload does.
    """
    args = spec.arguments()
    if spec.kind == "idle":
        return None
    if spec.kind == "ab":
        first, last = _work_window(args["start"], args["end"], ram_top, "ab")
        return Program("ab", {"rdi": first, "rsi": last, "rbx": round(args["sleep_ms"] * 1000)})
    if spec.kind == "stress":
        if spec.disk is not None:
            raise ValueError("the stress guest writes a disk on software vCPUs only (--accel soft)")
        first, last = _work_window(WORK_BASE, WORK_BASE + args["wss"], ram_top, "stress")
        return Program("stress", {
            "rdi": first, "rsi": (last - first) // PAGE_SIZE,
            "rdx": round(args["rate"] * (1 << 20) / PAGE_SIZE),
            "rcx": tsc_hz, "rbx": round(args["tick_ms"] * 1000),
        })
    if spec.kind == "checksum":
        first, last = _work_window(WORK_BASE, WORK_BASE + args["size"], ram_top, "checksum")
        return Program("checksum", {"rdi": first, "rsi": (last - first) // 8, "rdx": args["rounds"]})
    raise ValueError(f"guest '{spec.kind}' has no x86 program")
