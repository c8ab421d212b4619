"""The three migration transports under test and one driver for all of them.

``tcp`` and ``unix`` stream from a running source into a listening
destination; ``exec`` is two steps, as an operator would do it:
``migrate exec:cat > FILE`` on the source, then a fresh destination loads
``exec:cat FILE``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from machines import FINAL, Machine
from vmigrate.qmp.client import QMPClientError

NAMES = ("tcp", "unix", "exec")


@dataclass(frozen=True)
class Transport:
    name: str
    workdir: Path

    @property
    def streaming(self) -> bool:
        return self.name != "exec"

    @property
    def capture(self) -> Path:
        """Where ``exec`` keeps the stream between the two steps."""
        return self.workdir / "stream.bin"

    def incoming_uri(self) -> str:
        return {
            "tcp": "tcp:127.0.0.1:0",
            "unix": f"unix:{self.workdir / 'migrate.sock'}",
            "exec": f"exec:cat {self.capture}",
        }[self.name]

    def outgoing_uri(self, dst: Machine | None) -> str:
        if self.name == "tcp":
            (address,) = dst.vm.migrate_status()["socket-address"]
            return f"tcp:127.0.0.1:{address['port']}"
        if self.name == "unix":
            return self.incoming_uri()
        return f"exec:cat > {self.capture}"


def migrate(
    transport: Transport,
    src: Machine,
    start_dst: Callable[[], Machine],
    drive: Callable[[Machine], None] | None = None,
    timeout: float = 60.0,
) -> Machine:
    """Migrate *src* into a destination made by *start_dst* (started with ``-incoming defer``).

    *drive* runs while the source migrates (e.g. to change the bandwidth);
    returns the destination once both sides reached a final state or, for
    a QEMU destination whose load failed, its process exited.
    """
    dst = None
    if transport.streaming:
        dst = start_dst()
        dst.vm.cmd("migrate-incoming", uri=transport.incoming_uri())
    src.vm.cmd("migrate", uri=transport.outgoing_uri(dst))
    if drive is not None:
        drive(src)
    src.vm.wait_migration(FINAL, timeout=timeout)
    if dst is None:
        dst = start_dst()
        dst.vm.cmd("migrate-incoming", uri=transport.incoming_uri())
    settle(dst, timeout)
    return dst


def settle(machine: Machine, timeout: float) -> str | None:
    """The final migration state, or None once the process has exited (QEMU after a failed load)."""
    deadline = time.monotonic() + timeout
    while machine.vm.proc.poll() is None:
        try:
            status = machine.vm.migrate_status().get("status")
        except (QMPClientError, OSError):
            # The monitor went away: only an exiting process does that.
            machine.vm.proc.wait(timeout=10)
            break
        if status in FINAL:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"{machine.kind}: migration still {status!r} after {timeout}s")
        time.sleep(0.05)
    return None
