"""Peak memory of the VM processes of a run and of their worker processes, from /proc/PID/status."""

from __future__ import annotations

import threading
from pathlib import Path


MEM_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def read_status(pid: int) -> dict[str, int]:
    """The RSS lines of /proc/PID/status in bytes (empty once the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in MEM_FIELDS:
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def children(pid: int) -> list[int]:
    """The live child processes of *pid*: a vmigrate VM's forked workers (migration/worker_process.py)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


class MemWatch:
    """Peaks of each RSS component per process, sampled in a thread.

    VmHWM is the kernel's own peak of the total; the anon/file/shmem split
    has no kernel peak, so it is sampled (a short spike between samples can
    be missed, VmHWM cannot).  The shared RAM file counts as RssShmem.

    Guest pages that only a worker process touched count in the worker's
    RSS, not the VM process's: ``children_peak`` keeps, per process, the
    largest VmHWM any of its children reached (sampled while they live).
    """

    def __init__(self, pids: dict[str, int], interval: float = 0.02) -> None:
        self.pids = pids
        self.interval = interval
        self.peaks: dict[str, dict[str, int]] = {name: dict.fromkeys(MEM_FIELDS, 0) for name in pids}
        self.children_peak: dict[str, int] = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memwatch", daemon=True)

    def start(self) -> "MemWatch":
        self._thread.start()
        return self

    def sample(self) -> None:
        for name, pid in self.pids.items():
            peak = self.peaks[name]
            for key, value in read_status(pid).items():
                peak[key] = max(peak[key], value)
            for child in children(pid):
                self.children_peak[name] = max(self.children_peak[name], read_status(child).get("VmHWM", 0))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> dict[str, dict[str, int]]:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()
        return self.peaks
