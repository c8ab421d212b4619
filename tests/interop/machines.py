"""VM processes for interop tests: real QEMU 7.2 and vmigrate, RAM in shared files.

Both kinds of VM get their RAM from a shared file (QEMU: a
``memory-backend-file,share=on`` whose id is ``ram``, so its RAM block is
named ``ram`` like vmigrate's; vmigrate: ``--mem-path``), so a test can write
the source's memory before a migration and compare both sides byte for byte
afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vmigrate.harness.launcher import VMProcess
from vmigrate.harness.waiting import wait_for
from vmigrate.machine.memory import parse_size

#: Final states of a migration on either side.
FINAL = frozenset({"completed", "failed", "cancelled"})


@dataclass
class Machine:
    """A VM process (``kind`` is ``qemu`` or ``vmigrate``) and the file holding its RAM."""

    kind: str
    vm: VMProcess
    ram: Path
    size: int

    def require_alive(self) -> None:
        """Fail with the process's own output if it exited (QEMU does after a failed load)."""
        code = self.vm.proc.poll()
        assert code is None, f"{self.kind} exited with status {code}:\n{self.vm.log()}"


class Machines:
    """Starts VMs whose RAM files live in one scratch directory."""

    def __init__(self, spawn: Callable[..., VMProcess], ramdir: Path) -> None:
        self._spawn = spawn
        self.ramdir = ramdir
        self._count = 0

    def ram_path(self, kind: str) -> Path:
        self._count += 1
        return self.ramdir / f"{kind}{self._count}.ram"

    def qemu(self, size: str, *args: str, ram: Path | None = None, backend: str = "ram") -> Machine:
        """QEMU ``-M none`` with its RAM in a shared file and migration events on.

        The RAM block is named after the memory backend's id, so the default
        ``ram`` gives the same block name as plain ``-M none -m`` and vmigrate.
        """
        ram = ram or self.ram_path("qemu")
        vm = self._spawn("qemu", *args, memory=size, mem_path=ram, backend=backend)
        vm.set_caps(events=True)
        return Machine("qemu", vm, ram, parse_size(size))

    def vmigrate(self, size: str, *args: str, ram: Path | None = None) -> Machine:
        """vmigrate with the software vCPU and migration events on.

        A KVM VM migrates vCPU and irqchip sections, which a QEMU ``-M none``
        destination (no CPUs) rejects.
        """
        ram = ram or self.ram_path("vmigrate")
        vm = self._spawn("vmigrate", "--accel", "soft", "-m", size, "--mem-path", str(ram), *args)
        vm.set_caps(events=True)
        return Machine("vmigrate", vm, ram, parse_size(size))

    def start(self, kind: str, size: str, *args: str, **kw) -> Machine:
        """Either kind from QEMU-style arguments (``-incoming`` becomes vmigrate's ``--incoming``)."""
        if kind == "vmigrate":
            args = tuple("--incoming" if a == "-incoming" else a for a in args)
        return getattr(self, kind)(size, *args, **kw)


def converge_after_passes(src: Machine, passes: int = 3, still_active: bool = True) -> None:
    """Let the source iterate for *passes* syncs, then lift its limits so it finishes.

    A ``drive`` for :func:`transport.migrate`.  With *still_active* the source
    must not have converged by itself (its limits were meant to prevent it).
    """
    wait_for(lambda: src.vm.migrate_status().get("ram", {}).get("dirty-sync-count", 0) >= passes,
             30, f"{passes} dirty bitmap syncs", interval=0.05)
    if still_active:
        assert src.vm.migrate_status()["status"] == "active", "converged before the limits were lifted"
    src.vm.cmd("migrate-set-parameters", **{"downtime-limit": 2000, "max-bandwidth": 10 << 30})
