"""What a block node's image format offers the rest of vmigrate (QEMU's ``BlockDriver``).

Two formats implement it, both written from their specifications: ``raw``
(:mod:`vmigrate.block.raw`) and ``qcow2`` version 3 (:mod:`vmigrate.block.qcow2`,
after QEMU's docs/interop/qcow2.txt).  Offsets and lengths are guest-visible
bytes; a driver reads through its backing image where it has one, and never
takes a lock: :class:`vmigrate.block.node.BlockNode` serialises the calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


class ImageError(Exception):
    """An image that cannot be opened or used as asked: the text is for the user."""


@dataclass(frozen=True)
class Snapshot:
    """One internal snapshot's table entry (QEMU's ``QEMUSnapshotInfo``)."""

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    #: -1 when the snapshot was not taken under record/replay.
    icount: int = -1


class BlockDriver(ABC):
    """An open image."""

    #: QEMU's format name: "raw" or "qcow2".
    format_name: str
    filename: str
    read_only: bool
    #: The opened backing image, if the format has one.
    backing: "BlockDriver | None" = None

    @property
    @abstractmethod
    def size(self) -> int:
        """Virtual disk size in bytes."""

    @property
    def cluster_size(self) -> int:
        """Allocation unit (0 for formats without one), as QEMU's ``bdrv_get_info``."""
        return 0

    @property
    def supports_snapshots(self) -> bool:
        """Internal snapshots (qcow2 yes, raw no), for QEMU's ``bdrv_can_snapshot``."""
        return False

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes; unallocated ranges read from the backing image or as zeroes."""

    @abstractmethod
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    @abstractmethod
    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range, unmapping what the format can unmap (QEMU's BDRV_REQ_MAY_UNMAP)."""

    def allocated(self, offset: int, length: int) -> bool:
        """Whether any byte of the range is stored in this image rather than its backing file.

        Incremental block migration sends only these ranges.
        """
        return True

    def actual_size(self) -> int:
        """Bytes the image file occupies on the host (``actual-size`` of query-block)."""
        return 0

    @property
    def dirty_flag(self) -> bool:
        """``dirty-flag`` of ImageInfo: the format's refcounts may be stale (qcow2's dirty bit)."""
        return False

    def format_specific(self) -> dict | None:
        """QEMU's ``ImageInfoSpecific`` union (``{"type": ..., "data": {...}}``), None for raw."""
        return None

    def flush(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    # Internal snapshots: only formats whose supports_snapshots is True implement these.

    def snapshots(self) -> list[Snapshot]:
        return []

    def create_snapshot(self, name: str, date_sec: int, date_nsec: int, vm_clock_nsec: int,
                        vm_state_size: int, icount: int = -1) -> Snapshot:
        """Record the active state as a new snapshot, including the VM state written before."""
        raise ImageError("Block driver does not support snapshots")

    def goto_snapshot(self, snapshot_id: str) -> None:
        """Revert the active state to a snapshot (its VM state readable afterwards)."""
        raise ImageError("Block driver does not support snapshots")

    def delete_snapshot(self, snapshot_id: str) -> None:
        raise ImageError("Block driver does not support snapshots")

    def write_vmstate(self, pos: int, data: bytes | bytearray | memoryview) -> None:
        """Write into the VM-state area of the active state (beyond the guest-visible disk)."""
        raise ImageError("Block driver does not support snapshots")

    def read_vmstate(self, pos: int, length: int) -> bytes:
        raise ImageError("Block driver does not support snapshots")
