"""Processes under test: vmigrate VMs and real QEMU 7.2, each with a QMP client.

Both are driven through the real ``qemu.qmp`` client library (its synchronous
``QEMUMonitorProtocol``), so what passes here works for QEMU users too.
Every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from qemu.qmp import ConnectError
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmigrate.machine.memory import parse_size
from vmigrate.machine.x86guest import pc as pc_guest

QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
START_TIMEOUT = 15.0


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class VMProcess:
    """A VM process (vmigrate or QEMU) with one negotiated QMP connection."""

    def __init__(self, argv: list[str], sock: Path, log: Path, env: dict | None = None,
                 started: Callable[["VMProcess"], None] = lambda p: None) -> None:
        """Start the process; *started* registers it for clean-up before anything can fail."""
        self.sock = sock
        #: Socket for a second client (a QEMU monitor serves only one at a time).
        self.tool_sock = sock
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.qmp = None
        started(self)
        wait_for(lambda: sock.exists() or self.proc.poll() is not None, START_TIMEOUT, f"QMP socket {sock}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited with {self.proc.returncode}:\n{self.log()}")
        # QEMU creates its socket file before it listens: retry refused connects.
        self.qmp = wait_for(self._connect, START_TIMEOUT, f"QMP on {sock}", interval=0.05)
        self.greeting = self.qmp._get_greeting()

    def _connect(self) -> QEMUMonitorProtocol | None:
        qmp = QEMUMonitorProtocol(str(self.sock))
        qmp.settimeout(30)
        try:
            qmp.connect(negotiate=True)
        except (ConnectError, OSError) as err:
            if self.proc.poll() is not None:
                raise RuntimeError(f"VM process exited with {self.proc.returncode}:\n{self.log()}") from err
            return None
        return qmp

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def cmd(self, name: str, **args: Any) -> Any:
        """Execute; return the 'return' value or raise with QEMU's error."""
        resp = self.qmp.cmd_raw(name, args or None)
        if "error" in resp:
            raise QMPCommandError(resp["error"]["class"], resp["error"]["desc"])
        return resp["return"]

    def raw(self, name: str, args: dict | None = None) -> dict:
        return self.qmp.cmd_raw(name, args)

    def status(self) -> str:
        return self.cmd("query-status")["status"]

    def migrate_status(self) -> dict:
        return self.cmd("query-migrate")

    def wait_migration(self, states: set[str], timeout: float = 60.0) -> dict:
        return wait_for(
            lambda: (info := self.migrate_status()).get("status") in states and info,
            timeout, f"migration state in {states}", interval=0.05,
        )

    def events(self, wait: float = 0.0) -> list[dict]:
        return self.qmp.get_events(wait=wait) if wait else self.qmp.get_events()

    def set_caps(self, **caps: bool) -> None:
        self.cmd("migrate-set-capabilities",
                 capabilities=[{"capability": k, "state": v} for k, v in caps.items()])

    def close(self) -> None:
        if self.proc.poll() is None:
            if self.qmp is not None:
                try:
                    self.qmp.cmd_raw("quit")
                except Exception:
                    pass
            try:
                self.proc.wait(timeout=10 if self.qmp is not None else 0.1)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.qmp is not None:
            try:
                self.qmp.close()
            except Exception:
                pass
        self._log.close()


class QMPCommandError(Exception):
    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(f"{cls}: {desc}")
        self.cls = cls
        self.desc = desc


def vmigrate_argv(sock: Path, *extra: str) -> list[str]:
    """A ``vmigrate run`` command line; the software vCPU unless ``--accel`` is given.

    The software vCPU is what every machine has, so the scenarios tested with
    it hold everywhere; tests/kvm repeats the essential ones with KVM.
    """
    accel = [] if "--accel" in extra else ["--accel", "soft"]
    return [sys.executable, "-m", "vmigrate", "run", "--qmp", f"unix:{sock}", *accel, *extra]


def qemu_argv(sock: Path, *extra: str, memory: str = "64M", mem_path: Path | None = None,
              pc: bool = False) -> list[str]:
    """QEMU 7.2 with a ``-M none`` machine, or with *pc* a KVM PC booting the guest program in *mem_path*.

    *pc* needs *mem_path* prepared by :func:`vmigrate.machine.x86guest.pc.prepare`.
    """
    argv = [QEMU, "-nic", "none", "-display", "none", "-qmp", f"unix:{sock},server=on,wait=off"]
    if pc:
        argv += pc_guest.qemu_argv(mem_path, parse_size(memory, "M"))
    elif mem_path is not None:
        # The backend id names the RAM block: "ram", like vmigrate's and plain -M none -m.
        argv += ["-M", "none,memory-backend=ram", "-object",
                 f"memory-backend-file,id=ram,size={memory},mem-path={mem_path},share=on", "-m", memory]
    else:
        argv += ["-M", "none", "-m", memory]
    return argv + list(extra)


def test_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


MIB = 1 << 20


def migrate_in_passes(src: VMProcess, uri: str, passes: int = 4, bandwidth: int = 16 * MIB) -> dict:
    """Migrate under limits a dirtying guest cannot converge under, lift them after *passes* syncs.

    A 1 ms downtime limit never fits the dirty working set, so the source
    iterates (exercising every per-pass path) until the limits go.
    """
    src.cmd("migrate-set-parameters", **{"max-bandwidth": bandwidth, "downtime-limit": 1})
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.migrate_status().get("ram", {}).get("dirty-sync-count", 0) >= passes, 60,
             f"{passes} passes")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": 60000})
    return src.wait_migration({"completed", "failed", "cancelled"}, timeout=60)


def ram_files_equal(a: Path, b: Path) -> bool:
    import numpy as np

    return np.array_equal(np.fromfile(a, np.uint8), np.fromfile(b, np.uint8))
