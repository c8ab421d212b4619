"""Forked worker processes for the per-page work of a migration (docs/benchmarks.md, "Multifd scaling").

The VM process's interpreter lock bounds what threads can do at many cores:
multifd channels (migration/multifd_worker.py) and the ``compress``
capability's compression threads (migration/compress_worker.py) can each
run their loops in a process with a lock of its own.  A worker shares guest
RAM with the VM process through the RAM file's ``MAP_SHARED`` mapping,
which ``fork`` keeps shared, talks to the VM process on a unix socket and
closes every other descriptor but those it was given.  It dies with the VM
process: its watchdog thread reads EOF on a pipe whose only writer is the
VM process.

:func:`wanted` is the one place that says whether workers replace threads.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

from vmigrate.machine.memory import RAMBlock
from vmigrate.migration.channel import SocketChannel

#: ``VMIGRATE_WORKERS``: ``1`` workers wherever they apply, ``0`` never, unset: the caller's rule.
ENV = "VMIGRATE_WORKERS"
#: Hosts with this many CPUs count as many-cored (:func:`many_cores`).
MIN_CPUS = 8


def wanted(blocks: Sequence[RAMBlock], by_default: bool) -> bool:
    """Whether loops over *blocks* run in worker processes rather than threads.

    Workers need RAM blocks mapped from a file (anonymous RAM would be a
    private copy in the child).  Where they apply, ``VMIGRATE_WORKERS``
    decides, else *by_default*, the caller's rule.
    """
    setting = os.environ.get(ENV, "")
    if setting == "0" or not blocks or not all(b.shared for b in blocks):
        return False
    return setting == "1" or by_default


def many_cores() -> bool:
    """Whether this host has :data:`MIN_CPUS` CPUs or more: cores to spare for work that moves out of
    the VM process's lock at a little more CPU in all (docs/benchmarks.md, "Multifd scaling")."""
    return (os.cpu_count() or 1) >= MIN_CPUS


@dataclass
class Worker:
    """The VM process's handle on one worker: its pid, control socket and life pipe."""

    id: int
    pid: int
    ctrl: socket.socket
    life: int
    reaped: bool = False

    def stop(self) -> None:
        """Kill and reap the worker (idempotent): its work is written or no longer wanted.

        The control socket is shut down, not closed: a thread may still be reading it.
        """
        if self.reaped:
            return
        self.reaped = True
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        try:
            self.ctrl.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        os.close(self.life)


def start(worker_id: int, keep: Sequence[int], body: Callable[[SocketChannel], None],
          handle: type[Worker] = Worker) -> Worker:
    """Fork a worker that runs ``body(control channel)`` with the descriptors *keep* and nothing else open."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    life_r, life_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            low = 3
            for fd in sorted({0, 1, 2, theirs.fileno(), life_r, *keep}):
                if fd >= low:
                    os.closerange(low, fd)
                    low = fd + 1
            os.closerange(low, os.sysconf("SC_OPEN_MAX"))
            threading.Thread(target=_die_with_parent, args=(life_r,), daemon=True).start()
            body(SocketChannel(theirs))
            code = 0
        finally:
            os._exit(code)
    theirs.close()
    os.close(life_r)
    return handle(worker_id, pid, ours, life_w)


def _die_with_parent(life: int) -> None:
    """The worker's watchdog: EOF on the life pipe means the VM process is gone."""
    while os.read(life, 1):
        pass
    os._exit(1)
