"""Counters behind ``query-migrate``'s ``ram`` member, with QEMU 7.2's meanings.

Each RAM byte accounted is attributed to exactly one of precopy, downtime
and postcopy bytes according to the VM state at that moment (ram.md §7);
the rates are computed by the migration loop (convergence.md §2, §4).
"""

from __future__ import annotations

from dataclasses import dataclass

from vmigrate.machine.memory import PAGE_SIZE


@dataclass
class RamStats:
    transferred: int = 0
    duplicate: int = 0
    normal: int = 0
    dirty_pages_rate: int = 0
    dirty_sync_count: int = 0
    postcopy_requests: int = 0
    multifd_bytes: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    postcopy_bytes: int = 0
    dirty_sync_missed_zero_copy: int = 0
    #: Dirty pages not yet sent, as of the last bitmap sync or send.
    remaining_pages: int = 0

    def account(self, nbytes: int, phase: str) -> None:
        """Count RAM bytes sent; *phase* is 'precopy', 'downtime' or 'postcopy'."""
        self.transferred += nbytes
        setattr(self, f"{phase}_bytes", getattr(self, f"{phase}_bytes") + nbytes)

    @property
    def pages_sent(self) -> int:
        return self.normal + self.duplicate

    def to_qmp(self, total: int, mbps: float, pages_per_second: int, completed: bool) -> dict:
        return {
            "transferred": self.transferred,
            "remaining": 0 if completed else self.remaining_pages * PAGE_SIZE,
            "total": total,
            "duplicate": self.duplicate,
            "skipped": 0,
            "normal": self.normal,
            "normal-bytes": self.normal * PAGE_SIZE,
            "dirty-pages-rate": 0 if completed else self.dirty_pages_rate,
            "mbps": mbps,
            "dirty-sync-count": self.dirty_sync_count,
            "postcopy-requests": self.postcopy_requests,
            "page-size": PAGE_SIZE,
            "multifd-bytes": self.multifd_bytes,
            "pages-per-second": pages_per_second,
            "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": self.postcopy_bytes,
            "dirty-sync-missed-zero-copy": self.dirty_sync_missed_zero_copy,
        }
