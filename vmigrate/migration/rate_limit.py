"""The one ``max-bandwidth`` limiter of an outgoing migration.

QEMU 7.2 keeps the budget inside the QEMUFile and lets multifd add its bytes
to it; later QEMU moved it into migration-stats.c (``migration_rate_limit``,
``migration_rate_account``).  Here it is one object too: the main channel's
file, the multifd channels and the RAM batch sizing all account into it,
and the migration thread starts a new window every 100 ms.
"""

from __future__ import annotations

#: The rate-limit window: the budget is max-bandwidth / 10 per window (QEMU's BUFFER_DELAY).
WINDOW_SECONDS = 0.1
WINDOWS_PER_SECOND = 10


class RateLimiter:
    def __init__(self, bytes_per_second: int = 0) -> None:
        #: Bytes allowed per window; 0 means unlimited.
        self.budget = 0
        #: Bytes accounted in the current window.
        self.used = 0
        self.set_rate(bytes_per_second)

    def set_rate(self, bytes_per_second: int) -> None:
        """``max-bandwidth`` (0 lifts the limit, as the switchover does)."""
        self.budget = bytes_per_second // WINDOWS_PER_SECOND

    def account(self, nbytes: int) -> None:
        self.used += nbytes

    def exceeded(self) -> bool:
        return self.budget > 0 and self.used > self.budget

    def pages_left(self, page_size: int, most: int) -> int:
        """Pages that still fit in this window, at least one and at most *most*.

        QEMU checks the limit after every page; a whole batch past the budget
        would overshoot ``max-bandwidth`` by up to a batch per window.
        """
        if self.budget <= 0:
            return most
        return min(max((self.budget - self.used) // page_size + 1, 1), most)

    def new_window(self) -> None:
        self.used = 0
