"""Postcopy pieces both sides share with the RAM section (QEMU's migration/postcopy-ram.c).

The source keeps a :class:`PageRequests` queue that the return-path thread
fills with the destination's page requests and the migration thread drains
before its background scan (docs/qemu/postcopy.md §5).  The switch-over
discards every page still dirty on the source (:func:`discard_ranges`,
docs/qemu/postcopy.md §3 step 4).  The destination's state machine and its
userfaultfd fault service are :mod:`.postcopy_incoming`.
"""

from __future__ import annotations

import collections
import sys
import threading
from dataclasses import dataclass

import numpy as np

from vmigrate.machine.memory import PAGE_SIZE
from vmigrate.migration.stats import RamStats

#: QEMU packs at most this many ranges into one POSTCOPY_RAM_DISCARD command (MAX_DISCARDS_PER_COMMAND).
MAX_DISCARDS_PER_COMMAND = 12


def discard_ranges(bitmap: np.ndarray) -> list[tuple[int, int]]:
    """Runs of set bits of a per-page bitmap as ``(start, length)`` byte ranges, found in one pass."""
    edges = np.diff(np.concatenate(([False], bitmap, [False])).view(np.int8))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return [(int(s) * PAGE_SIZE, int(e - s) * PAGE_SIZE) for s, e in zip(starts, ends)]


@dataclass(frozen=True)
class PageRequest:
    block: str
    first: int
    count: int


class PageRequests:
    """Page requests from the return path, waiting for the migration thread.

    The migration thread may be asleep in the rate limiter when a request
    arrives; :attr:`urgent` wakes it (QEMU's rate_limit_sem).
    """

    def __init__(self, stats: RamStats | None) -> None:
        """Each request counts in *stats* (``postcopy-requests``); a background snapshot's
        write faults (docs/background-snapshot.md) count nowhere, as in QEMU."""
        self._queue: collections.deque[PageRequest] = collections.deque()
        self._lock = threading.Lock()
        self.urgent = threading.Event()
        self._stats = stats

    def put(self, block: str, start: int, length: int) -> None:
        with self._lock:
            self._queue.append(PageRequest(block, start // PAGE_SIZE, max(1, length // PAGE_SIZE)))
            if self._stats is not None:
                self._stats.postcopy_requests += 1
        self.urgent.set()

    def take(self) -> PageRequest | None:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            self.urgent.clear()
            return None

    def pending(self) -> bool:
        return bool(self._queue)

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()
            self.urgent.clear()


class FastThreadSwitch:
    """A short interpreter switch interval for as long as postcopy runs, on either side.

    A page request crosses two Python threads on each side (fault thread and loader on the
    destination, return-path reader and migration thread on the source), and each must take
    the interpreter lock from a thread busy with background pages, which lets go only every
    switch interval.  At CPython's 5 ms, that wait was nearly all of a request's latency.
    """

    #: Seconds; CPython's default is 0.005.
    INTERVAL = 0.0002

    def __init__(self) -> None:
        self._saved: float | None = None

    def enter(self) -> None:
        if self._saved is None:
            self._saved = sys.getswitchinterval()
            sys.setswitchinterval(self.INTERVAL)

    def exit(self) -> None:
        if self._saved is not None:
            sys.setswitchinterval(self._saved)
            self._saved = None
