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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


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


@dataclass
class StoredBitmap:
    """A persistent dirty bitmap as an image stores it (qcow2's bitmap directory).

    ``bits`` has one bool per ``granularity`` bytes of the disk; an ``inconsistent`` one
    (qcow2's in_use flag was found set: its writer never saved it) has no usable bits and
    stays in the image as it is until removed (block/qcow2-bitmap.c).
    """

    name: str
    granularity: int
    enabled: bool
    inconsistent: bool
    bits: "np.ndarray"


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

    # Persistent dirty bitmaps: only formats whose supports_persistent_bitmaps is True
    # implement these (QEMU's bdrv_supports_persistent_dirty_bitmap and friends).

    @property
    def supports_persistent_bitmaps(self) -> bool:
        return False

    def stored_bitmaps(self) -> list[StoredBitmap]:
        """The bitmaps the image held when it was opened."""
        return []

    def can_store_new_bitmap(self, name: str, granularity: int, existing: list[str]) -> None:
        """Raise ImageError (QEMU's text) if a new persistent bitmap could not be stored
        beside the persistent bitmaps ``existing`` (block/qcow2-bitmap.c)."""
        raise ImageError("Operation not supported")

    def store_bitmaps(self, bitmaps: list[StoredBitmap]) -> None:
        """Make the image's bitmaps exactly ``bitmaps``, saved and consistent."""
        raise ImageError("Block driver does not support persistent bitmaps")

    def remove_stored_bitmap(self, name: str) -> None:
        """Drop one bitmap from the image now, leaving the others as they are."""
        raise ImageError("Block driver does not support persistent bitmaps")
