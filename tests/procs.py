"""What the tests add to :mod:`vmigrate.harness`: the VM a ``spawn`` fixture starts, and migration helpers.

Processes are started by :class:`vmigrate.harness.launcher.VMProcess` and
driven through vmigrate's one QMP client; tests/integration/test_qemu_qmp_client.py
keeps compatibility with the ``qemu.qmp`` library covered.  Every wait is bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vmigrate.harness.launcher import VMProcess, qemu_argv, qmp_monitor, vmigrate_argv
from vmigrate.harness.migrate import FINAL
from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import MAGIC

MIB = 1 << 20


class SpawnedVM(VMProcess):
    """A VM process plus :attr:`tool_sock`, a monitor free for a second client (``vmigrate migrate``)."""

    def __init__(self, kind: str, directory: Path, n: int, *args: str, **qemu: object) -> None:
        """VM number *n* of a test, its socket and log in *directory*.

        *kind* ``vmigrate`` takes *args* for ``vmigrate run``, with the software
        vCPU unless ``--accel`` is given; ``qemu`` takes *args* and *qemu*
        keywords for :func:`~vmigrate.harness.launcher.qemu_argv`.  The software
        vCPU is what every machine has, so the scenarios tested with it hold
        everywhere; tests/kvm repeats the essential ones with KVM.
        """
        sock = directory / f"{kind}{n}.sock"
        if kind == "vmigrate":
            accel = () if "--accel" in args else ("--accel", "soft")
            argv, self.tool_sock = vmigrate_argv(sock, *accel, *args), sock
        else:
            # A QEMU monitor serves one client at a time: tools get a second one.
            self.tool_sock = directory / f"{kind}{n}.tool.sock"
            argv = qemu_argv(sock, *qmp_monitor(self.tool_sock), *args, **qemu)
        super().__init__(argv, sock, directory / f"{kind}{n}.log")


def migrate_in_passes(src: VMProcess, uri: str, passes: int = 4, bandwidth: int = 16 * MIB) -> dict:
    """Migrate under limits a dirtying guest cannot converge under, lift them after *passes* syncs.

    A 1 ms downtime limit never fits the dirty working set, so the source
    iterates (exercising every per-pass path) until the limits go.
    """
    src.cmd("migrate-set-parameters", **{"max-bandwidth": bandwidth, "downtime-limit": 1})
    src.cmd("migrate", uri=uri)
    wait_passes(src, passes)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": 60000})
    return src.wait_migration(FINAL, timeout=60)


def wait_passes(src: VMProcess, passes: int, timeout: float = 60.0) -> dict:
    """``query-migrate`` once the source has synced its dirty bitmap *passes* times."""
    return _wait_migration(src, lambda info: info.get("ram", {}).get("dirty-sync-count", 0) >= passes,
                           timeout, f"{passes} passes")


def wait_status(vm: VMProcess, status: str, timeout: float, name: str = "the VM") -> dict:
    """``query-migrate`` once *vm*'s migration status is *status*."""
    return _wait_migration(vm, lambda info: info.get("status") == status, timeout, f"{name} {status}")


def _wait_migration(vm: VMProcess, reached: Callable[[dict], bool], timeout: float, what: str) -> dict:
    """The first ``query-migrate`` answer that *reached* accepts.

    A migration that ends first fails the wait at once, with its answer: it
    can never get there, and its ``error-desc`` says why.
    """
    def poll() -> dict | None:
        info = vm.migrate_status()
        if reached(info):
            return info
        if info.get("status") in FINAL:
            raise AssertionError(f"the migration ended before {what}: {info}")
        return None

    return wait_for(poll, timeout, what)


def wait_guest_passes(ram: Path, passes: int = 2, timeout: float = 10.0) -> None:
    """Wait until the guest running on the RAM file *ram* has counted *passes* passes or rounds.

    The magic alone is not enough: it is written before the first pass, whose
    window is still zero pages (next to nothing to migrate), and the first
    touch of each page of fresh memory can keep the guest in that pass for a
    while on a busy host.
    """
    def counted() -> bool:
        magic, count = np.fromfile(ram, dtype=np.uint64, count=2)
        return magic.tobytes() == MAGIC and int(count) >= passes

    wait_for(counted, timeout, f"the guest's first {passes} passes")


def ram_files_equal(a: Path, b: Path) -> bool:
    return np.array_equal(np.fromfile(a, np.uint8), np.fromfile(b, np.uint8))


def peak_rss(vm: VMProcess) -> int:
    """The process's peak resident set (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{vm.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError(f"no VmHWM in /proc/{vm.pid}/status")


def listen_with_data(src_ram: Path, dst: VMProcess, uri: str, seed: int) -> str:
    """Random bytes in [12, 20) MiB of the source's RAM, the destination's ``migrate-incoming``,
    the guest started: the URI to migrate to (a tcp port 0 resolved to the bound one)."""
    ram = np.memmap(src_ram, np.uint8, "r+")
    ram[12 * MIB:20 * MIB] = np.random.default_rng(seed).integers(0, 256, 8 * MIB, dtype=np.uint8)
    ram.flush()
    dst.cmd("migrate-incoming", uri=uri)
    if uri.startswith("tcp:"):
        uri = f"tcp:127.0.0.1:{dst.migrate_status()['socket-address'][0]['port']}"
    wait_for(lambda: src_ram.read_bytes()[:8] == MAGIC, 10, "guest start")
    return uri


def migration_statuses(vm: VMProcess, until: str, times: int = 1, timeout: float = 10.0) -> list[str]:
    """The MIGRATION statuses received so far, waiting (bounded) until *until*'s event is among
    them (*times* times: a VM that was a destination, then a source).

    A status seen through ``query-migrate`` may precede its event on the wire (the
    migration thread sets it, the monitor's loop sends the event later), so a test
    that has waited for a status waits for its event too.
    """
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        seen += [e["data"]["status"] for e in vm.events() if e["event"] == "MIGRATION"]
        if seen.count(until) >= times:
            return seen
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no MIGRATION {until!r} event within {timeout}s; got {seen}")
        event = vm.qmp.next_event(min(left, 0.2))
        if event is not None and event["event"] == "MIGRATION":
            seen.append(event["data"]["status"])
