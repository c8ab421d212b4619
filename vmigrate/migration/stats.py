"""Counters behind ``query-migrate``'s ``ram`` member, with QEMU 7.2's meanings.

Each RAM byte accounted is attributed to exactly one of precopy, downtime
and postcopy bytes according to the VM state at that moment (docs/qemu/ram.md §7);
the rates are computed by the migration loop (docs/qemu/convergence.md §2, §4).
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

    #: Pages sent compressed / XBZRLE-encoded (QEMU counts them in its own counters).
    compressed_pages: int = 0
    xbzrle_pages: int = 0

    @property
    def pages_sent(self) -> int:
        """QEMU's ram_get_total_transferred_pages (pages-per-second)."""
        return self.normal + self.duplicate + self.compressed_pages + self.xbzrle_pages

    def account_multifd(self, nbytes: int) -> None:
        """Multifd packets: in transferred, but in none of precopy/downtime/postcopy bytes."""
        self.multifd_bytes += nbytes
        self.transferred += nbytes

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


@dataclass
class XbzrleStats:
    """``xbzrle-cache`` of query-migrate (docs/qemu/ram.md §4, §7).

    QEMU 7.2 never resets these counters between migrations (only the RAM
    and compression counters are cleared by ``migrate``), so one instance
    lives as long as the VM process.
    """

    bytes: int = 0
    pages: int = 0
    cache_miss: int = 0
    cache_miss_rate: float = 0.0
    encoding_rate: float = 0.0
    overflow: int = 0

    def to_qmp(self, cache_size: int) -> dict:
        return {
            "cache-size": cache_size,
            "bytes": self.bytes,
            "pages": self.pages,
            "cache-miss": self.cache_miss,
            "cache-miss-rate": self.cache_miss_rate,
            "encoding-rate": self.encoding_rate,
            "overflow": self.overflow,
        }


@dataclass
class CompressionStats:
    """``compression`` of query-migrate; reset by every ``migrate``."""

    pages: int = 0
    busy: int = 0
    busy_rate: float = 0.0
    compressed_size: int = 0
    compression_rate: float = 0.0

    def to_qmp(self) -> dict:
        return {
            "pages": self.pages,
            "busy": self.busy,
            "busy-rate": self.busy_rate,
            "compressed-size": self.compressed_size,
            "compression-rate": self.compression_rate,
        }


@dataclass
class PeriodRates:
    """The xbzrle/compression rates recomputed at a dirty sync ending a ≥1 s period.

    Holds the counter values at the start of the period (QEMU's ``*_prev``
    fields of RAMState, zero at the start of each migration).
    """

    target_pages: int = 0
    xbzrle_cache_miss: int = 0
    xbzrle_pages: int = 0
    xbzrle_bytes: int = 0
    compress_busy: int = 0
    compress_pages: int = 0
    compressed_size: int = 0

    def update(self, target_pages: int, xbzrle: XbzrleStats | None, compression: CompressionStats | None) -> None:
        """QEMU's migration_update_rates after the dirty-pages rate (nothing if no page was sent)."""
        pages = target_pages - self.target_pages
        self.target_pages = target_pages
        if not pages:
            return
        if xbzrle is not None:
            xbzrle.cache_miss_rate = (xbzrle.cache_miss - self.xbzrle_cache_miss) / pages
            self.xbzrle_cache_miss = xbzrle.cache_miss
            encoded = xbzrle.bytes - self.xbzrle_bytes
            if xbzrle.pages == self.xbzrle_pages or not encoded:
                xbzrle.encoding_rate = 0.0
            else:
                xbzrle.encoding_rate = (xbzrle.pages - self.xbzrle_pages) * PAGE_SIZE / encoded
            self.xbzrle_pages = xbzrle.pages
            self.xbzrle_bytes = xbzrle.bytes
        if compression is not None:
            compression.busy_rate = (compression.busy - self.compress_busy) / pages
            self.compress_busy = compression.busy
            size = compression.compressed_size - self.compressed_size
            if size:
                compression.compression_rate = (compression.pages - self.compress_pages) * PAGE_SIZE / size
                self.compress_pages = compression.pages
                self.compressed_size = compression.compressed_size
