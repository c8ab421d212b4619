"""Start a VM process — ``vmigrate run`` or QEMU 7.2 — and talk QMP to it.

Both command lines are spelled here once.  A :class:`VMProcess` waits
(bounded) until its QMP monitor answers, hands out a negotiated
:class:`~vmigrate.qmp.client.QMPClient`, sends the process's output to a log
file, and always cleans up: ``quit`` over QMP, then SIGTERM, then SIGKILL,
each with a deadline, and the socket file removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

from vmigrate.harness.waiting import wait_for
from vmigrate.machine.memory import parse_size
from vmigrate.machine.x86guest import pc as pc_guest
from vmigrate.qmp.client import QMPClient, QMPClientError, try_connect

log = logging.getLogger(__name__)

QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
#: How much of a process's output a start failure quotes.
LOG_TAIL = 4000


def vmigrate_argv(qmp: Path, *extra: str) -> list[str]:
    """``vmigrate run`` with its QMP monitor on the unix socket *qmp*, in this interpreter."""
    return [sys.executable, "-m", "vmigrate", "run", "--qmp", f"unix:{qmp}", *extra]


def qemu_argv(qmp: Path, *extra: str, memory: str = "64M", mem_path: Path | None = None,
              backend: str = "ram", pc: bool = False, binary: str = QEMU) -> list[str]:
    """QEMU 7.2 with a ``-M none`` machine of *memory* RAM, no default devices, no display.

    With *mem_path*, the RAM is that file, shared (``memory-backend-file``):
    what the tools read and write is what the guest sees.  The backend id
    names the RAM block; the default ``ram`` is the name plain ``-M none -m``
    and vmigrate give theirs.  With *pc*, a KVM PC booting the guest program
    that :func:`vmigrate.machine.x86guest.pc.prepare` put into *mem_path*.
    *binary* is the QEMU executable.
    """
    if pc:
        if mem_path is None:
            raise ValueError("a PC guest boots from its prepared RAM file: pass mem_path")
        machine = pc_guest.qemu_argv(mem_path, parse_size(memory, "M"))
    elif mem_path is not None:
        machine = ["-nodefaults", "-display", "none", "-M", f"none,memory-backend={backend}",
                   "-object", f"memory-backend-file,id={backend},size={memory},mem-path={mem_path},share=on",
                   "-m", memory]
    else:
        machine = ["-nodefaults", "-display", "none", "-M", "none", "-m", memory]
    return [binary, *qmp_monitor(qmp), *machine, *extra]


def qmp_monitor(sock: Path) -> list[str]:
    """QEMU options of one more QMP monitor: a QEMU monitor serves one client at a time."""
    return ["-qmp", f"unix:{sock},server=on,wait=off"]


class VMStartError(RuntimeError):
    """The process exited, or its monitor did not answer in time; the message quotes its output."""

    def __init__(self, message: str, log_path: Path) -> None:
        super().__init__(message)
        self.log_path = log_path


class VMProcess:
    """A VM process with one negotiated QMP connection (:attr:`qmp`) to the monitor on *sock*."""

    def __init__(self, argv: list[str], sock: Path, log_path: Path, *, env: dict[str, str] | None = None,
                 start_timeout: float = START_TIMEOUT, qmp_timeout: float = 30.0,
                 qmp_capabilities: tuple[str, ...] = (), stop_timeout: float = STOP_TIMEOUT) -> None:
        self.argv = argv
        self.sock = sock
        self.log_path = log_path
        self.stop_timeout = stop_timeout
        self._qmp: QMPClient | None = None
        self._closed = False
        self._log = open(log_path, "wb")
        # Unbuffered output: a vmigrate process's log is complete even when it is killed.
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            self._qmp = wait_for(lambda: self._connect(qmp_timeout, qmp_capabilities), start_timeout,
                                 f"QMP on {sock}")
        except TimeoutError:
            self.close()
            raise VMStartError(f"{argv[0]}: no QMP on {sock} within {start_timeout}s:\n{self.log()[-LOG_TAIL:]}",
                               log_path) from None
        except BaseException:
            self.close()
            raise
        log.info("%s started (pid %d), QMP on %s", Path(argv[0]).name, self.proc.pid, sock)

    def _connect(self, timeout: float, capabilities: tuple[str, ...]) -> QMPClient | None:
        client = try_connect(str(self.sock), timeout, capabilities=capabilities)
        if client is None and self.proc.poll() is not None:
            raise VMStartError(f"{self.argv[0]} exited with status {self.proc.returncode}:\n"
                               f"{self.log()[-LOG_TAIL:]}", self.log_path)
        return client

    def __enter__(self) -> "VMProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def qmp(self) -> QMPClient:
        """The connection opened at start (a vmigrate VM accepts more: connect to :attr:`sock`)."""
        if self._qmp is None:
            raise RuntimeError(f"{self.argv[0]} has no QMP connection")
        return self._qmp

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """Everything the process wrote so far (stdout and stderr; the process writes the file itself)."""
        return self.log_path.read_text(errors="replace")

    # -- QMP shorthands ------------------------------------------------------

    def cmd(self, name: str, **args: Any) -> Any:
        """Execute *name*; its ``return`` value, or :class:`~vmigrate.qmp.client.QMPClientError`."""
        return self.qmp.execute(name, args or None)

    def events(self, wait: float = 0.0) -> list[dict]:
        """Events received so far, waiting up to *wait* s for at least one."""
        return self.qmp.poll_events(wait)

    def status(self) -> str:
        return self.cmd("query-status")["status"]

    def migrate_status(self) -> dict:
        return self.cmd("query-migrate")

    def wait_migration(self, states: Iterable[str], timeout: float = 60.0) -> dict:
        """``query-migrate`` once its status is one of *states*."""
        states = frozenset(states)
        return wait_for(lambda: (info := self.migrate_status()).get("status") in states and info,
                        timeout, f"migration state in {sorted(states)}", interval=0.05)

    def set_caps(self, **caps: bool) -> None:
        self.cmd("migrate-set-capabilities", capabilities=[{"capability": k, "state": v} for k, v in caps.items()])

    # -- the end -------------------------------------------------------------

    def close(self) -> None:
        """Stop the process (``quit``, then SIGTERM, then SIGKILL, each bounded); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.proc.poll() is None and self._qmp is not None:
            try:
                self._qmp.execute("quit")
            except (QMPClientError, OSError):
                pass
            self._wait(self.stop_timeout)
        if self.proc.poll() is None:
            self.proc.terminate()
            if not self._wait(5.0):
                log.warning("%s (pid %d) ignored SIGTERM; killing it", Path(self.argv[0]).name, self.proc.pid)
                self.proc.kill()
                self._wait(10.0)
        if self._qmp is not None:
            self._qmp.close()
        self.sock.unlink(missing_ok=True)
        self._log.close()

    def _wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
