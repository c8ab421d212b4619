"""The VM run state (QEMU's RunState) and the STOP/RESUME events it implies.

Everything that pauses or resumes the guest goes through :class:`RunState`,
so the vCPUs, the events and ``query-status`` never disagree.  Transitions
are serialised by one lock because the migration thread stops the VM while
QMP handlers on the main thread may ask for ``cont``.
"""

from __future__ import annotations

import threading
from typing import Callable

from vmigrate.machine.vcpus import VcpuBackend

#: Where QEMU 7.2 lets ``inmigrate`` go (runstate_transitions_def, softmmu/runstate.c): the
#: run state a completed incoming migration takes from the source must be one of them.
INMIGRATE_NEXT = frozenset({
    "internal-error", "io-error", "paused", "running", "shutdown", "suspended", "watchdog",
    "guest-panicked", "finish-migrate", "prelaunch", "postmigrate", "colo",
})

#: Run states from which only a reset leads back (``cont`` is refused there).
NEEDS_RESET = frozenset({"internal-error", "shutdown"})


class RunState:
    def __init__(self, initial: str, vcpus: VcpuBackend, emit: Callable[[str, dict | None], None]) -> None:
        self._state = initial
        self._vcpus = vcpus
        self._emit = emit
        self._lock = threading.RLock()
        #: QEMU's ``autostart``: false with ``-S``; a destination resumes the guest only if set.
        self.autostart = initial != "prelaunch"
        self._listeners: list[Callable[[bool], None]] = []

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """Call *listener* with the new value of :attr:`running` whenever it changes (QEMU's
        vm change state handlers), under the transition's lock."""
        self._listeners.append(listener)

    def _changed(self, was_running: bool) -> None:
        if self.running != was_running:
            for listener in self._listeners:
                listener(self.running)

    @property
    def state(self) -> str:
        return self._state

    @property
    def running(self) -> bool:
        return self._state == "running"

    def set(self, state: str) -> None:
        """Change the state without touching the vCPUs (e.g. inmigrate → paused)."""
        with self._lock:
            was_running = self.running
            self._state = state
            self._changed(was_running)

    def stop(self, state: str = "paused") -> bool:
        """Stop the guest into *state*; returns whether it was running.

        Like QEMU's vm_stop: STOP is emitted only if the guest was running,
        a stopped guest keeps its current state.
        """
        with self._lock:
            if not self.running:
                return False
            self._vcpus.pause_all()
            self._state = state
            self._changed(True)
            self._emit("STOP", None)
            return True

    def force_stop(self, state: str) -> bool:
        """QEMU's vm_stop_force_state: stop if running, else just move to *state*."""
        with self._lock:
            if self.running:
                return self.stop(state)
            self.set(state)
            return False

    def start(self) -> None:
        """QEMU's vm_start: resume the vCPUs and emit RESUME (nothing if already running)."""
        with self._lock:
            if self.running:
                return
            self._state = "running"
            self._vcpus.resume_all()
            self._changed(False)
            self._emit("RESUME", None)
