"""The typed configuration of one migration attempt, frozen when the attempt starts.

QEMU reads ``s->capabilities`` and ``s->parameters`` by name all over
migration/; here the engine gets one :class:`MigrationConfig` per attempt,
taken from :class:`~vmigrate.migration.options.MigrationOptions` by
:meth:`~vmigrate.migration.options.MigrationOptions.snapshot`.  Capabilities
cannot change while a migration runs (QEMU refuses it); the parameters QEMU
applies to a running migration (``max-bandwidth``, ``downtime-limit``, the
``cpu-throttle-*`` family) reach the running attempt as a fresh snapshot.
Field names are the QAPI names with ``_`` for ``-``; a unit test checks that
they cover the schema exactly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Capabilities:
    """QAPI ``MigrationCapability``, in schema order."""

    xbzrle: bool = False
    rdma_pin_all: bool = False
    auto_converge: bool = False
    zero_blocks: bool = False
    compress: bool = False
    events: bool = False
    postcopy_ram: bool = False
    x_colo: bool = False
    release_ram: bool = False
    block: bool = False
    return_path: bool = False
    pause_before_switchover: bool = False
    multifd: bool = False
    dirty_bitmaps: bool = False
    postcopy_blocktime: bool = False
    late_block_activate: bool = False
    x_ignore_shared: bool = False
    validate_uuid: bool = False
    background_snapshot: bool = False
    zero_copy_send: bool = False
    postcopy_preempt: bool = False


@dataclass(frozen=True)
class Parameters:
    """QAPI ``MigrationParameters`` (``tls_authz`` reads ``""`` when unset)."""

    announce_initial: int
    announce_max: int
    announce_rounds: int
    announce_step: int
    compress_level: int
    compress_threads: int
    compress_wait_thread: bool
    decompress_threads: int
    throttle_trigger_threshold: int
    cpu_throttle_initial: int
    cpu_throttle_increment: int
    cpu_throttle_tailslow: bool
    tls_creds: str
    tls_hostname: str
    tls_authz: str
    max_bandwidth: int
    downtime_limit: int
    x_checkpoint_delay: int
    block_incremental: bool
    multifd_channels: int
    xbzrle_cache_size: int
    max_postcopy_bandwidth: int
    max_cpu_throttle: int
    multifd_compression: str
    multifd_zlib_level: int
    multifd_zstd_level: int
    block_bitmap_mapping: tuple | None

    @property
    def multifd_level(self) -> int:
        """The level of the selected ``multifd-compression`` method (0 for ``none``)."""
        method = self.multifd_compression
        return getattr(self, f"multifd_{method}_level") if method != "none" else 0


@dataclass(frozen=True)
class MigrationConfig:
    caps: Capabilities
    params: Parameters

