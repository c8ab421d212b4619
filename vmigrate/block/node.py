"""Block nodes, their dirty bitmaps, and the graph of a VM's disks (QEMU's block layer, small).

A :class:`BlockNode` is one ``--blockdev`` or ``--drive``: an open image
(:class:`~vmigrate.block.driver.BlockDriver`), a node name, and — for a
``--drive`` — the device (BlockBackend) name that block migration sends
(migration/block.c looks devices up by that name).  Every write goes through
the node, which records it in the node's dirty bitmaps: the named ones of
``block-dirty-bitmap-add`` (block/dirty-bitmap.c) and the anonymous ones that
block migration tracks its dirty chunks with.  A lock per node serialises the
vCPU writing the disk, the migration thread reading it and the monitor.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
from dataclasses import dataclass, field

import numpy as np

from vmigrate.block.driver import BlockDriver, ImageError, Snapshot, StoredBitmap
from vmigrate.errors import VMError

log = logging.getLogger(__name__)

#: QEMU's BDRV_BITMAP_MAX_NAME_SIZE.
MAX_BITMAP_NAME = 1023


def default_granularity(driver: BlockDriver) -> int:
    """The cluster size clamped to 4 KiB..64 KiB, else 64 KiB (bdrv_get_default_bitmap_granularity)."""
    if driver.cluster_size > 0:
        return min(65536, max(4096, driver.cluster_size))
    return 65536


class DirtyBitmap:
    """One bit per *granularity* bytes of a disk (QEMU's BdrvDirtyBitmap over an HBitmap)."""

    def __init__(self, name: str | None, size: int, granularity: int, *, enabled: bool = True,
                 persistent: bool = False) -> None:
        self.name = name
        self.size = size
        self.granularity = granularity
        self.enabled = enabled
        self.persistent = persistent
        #: Held by an operation (migration of this bitmap): commands that change it refuse.
        self.busy = False
        #: Loaded from an image that says its last writer never saved it (qcow2's in_use).
        self.inconsistent = False
        #: Persistent and loaded from an image opened read-only: it cannot be changed.
        self.readonly = False
        self.bits = np.zeros(-(-size // granularity), dtype=bool)

    def mark(self, offset: int, length: int) -> None:
        if self.enabled and length > 0:
            self.bits[offset // self.granularity:-(-(offset + length) // self.granularity)] = True

    def count(self) -> int:
        """Dirty bytes as QEMU counts them: set bits times the granularity."""
        return int(np.count_nonzero(self.bits)) * self.granularity

    def clear(self) -> None:
        self.bits[:] = False

    def info(self) -> dict:
        """A ``BlockDirtyInfo``."""
        out = {"name": self.name, "recording": self.enabled, "persistent": self.persistent,
               "busy": self.busy, "granularity": self.granularity, "count": self.count()}
        if self.inconsistent:
            out["inconsistent"] = True
        return out


_auto_ids = itertools.count()


def auto_node_name() -> str:
    """A generated node name, shaped like QEMU's id_generate(ID_BLOCK): ``#block`` counter, 2 random digits."""
    return f"#block{next(_auto_ids)}{random.randrange(100):02d}"


@dataclass
class BlockNode:
    node_name: str
    driver: BlockDriver
    #: The BlockBackend name (``--drive id=``); "" for a node no device uses, as in QEMU.
    device: str = ""
    #: The protocol node under the format node (QEMU's ``file`` child), for query-named-block-nodes.
    file_node_name: str = field(default_factory=auto_node_name)
    bitmaps: dict[str, DirtyBitmap] = field(default_factory=dict)
    _trackers: list[DirtyBitmap] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    #: QEMU's BDRV_O_INACTIVE cleared: this process owns the image.  A migration source gives
    #: its images up at completion and an incoming VM gets them at the end of the load (or at
    #: ``cont`` with ``late-block-activate``); docs/block-migration.md §Activation.
    active: bool = True

    @property
    def read_only(self) -> bool:
        return self.driver.read_only

    @property
    def size(self) -> int:
        return self.driver.size

    @property
    def device_or_node_name(self) -> str:
        """QEMU's bdrv_get_device_or_node_name, the name errors use."""
        return self.device or self.node_name

    def read(self, offset: int, length: int) -> bytes:
        with self.lock:
            return self.driver.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        with self.lock:
            self.driver.write(offset, data)
            self._mark(offset, len(data))

    def write_zeroes(self, offset: int, length: int) -> None:
        with self.lock:
            self.driver.write_zeroes(offset, length)
            self._mark(offset, length)

    def _mark(self, offset: int, length: int) -> None:
        for bitmap in itertools.chain(self.bitmaps.values(), self._trackers):
            bitmap.mark(offset, length)

    def track(self, granularity: int) -> DirtyBitmap:
        """An anonymous, enabled bitmap that records writes from now on (block migration's)."""
        with self.lock:
            bitmap = DirtyBitmap(None, self.size, granularity)
            self._trackers.append(bitmap)
            return bitmap

    def untrack(self, bitmap: DirtyBitmap) -> None:
        with self.lock:
            if bitmap in self._trackers:
                self._trackers.remove(bitmap)

    def add_bitmap(self, name: str, granularity: int | None, persistent: bool, disabled: bool) -> DirtyBitmap:
        """``block-dirty-bitmap-add``'s checks and texts (block/monitor/bitmap-qmp-cmds.c)."""
        if granularity is None:
            granularity = default_granularity(self.driver)
        elif granularity < 512 or granularity & (granularity - 1):
            raise VMError("Granularity must be power of 2 and at least 512")
        if persistent and not self.driver.supports_persistent_bitmaps:
            raise VMError(f"Can't store persistent bitmaps to {self.device_or_node_name}: Operation not supported")
        with self.lock:
            if name in self.bitmaps:
                raise VMError(f"Bitmap already exists: {name}")
            if persistent:
                self._can_store_new_bitmap(name, granularity)
            if len(name.encode()) > MAX_BITMAP_NAME:
                raise VMError(f"Bitmap name too long: {name}")
            bitmap = DirtyBitmap(name, self.size, granularity, enabled=not disabled, persistent=persistent)
            self.bitmaps[name] = bitmap
            return bitmap

    def bitmap(self, name: str) -> DirtyBitmap:
        try:
            return self.bitmaps[name]
        except KeyError:
            raise VMError(f"Dirty bitmap '{name}' not found") from None

    def info(self) -> dict:
        """A ``BlockDeviceInfo`` (query-named-block-nodes, query-block's ``inserted``)."""
        out = self._device_info(self.node_name, self.driver.format_name, image_info(self.driver))
        bitmaps = [b.info() for b in reversed(self.bitmaps.values())]
        if bitmaps:
            out["dirty-bitmaps"] = bitmaps
        backing, depth = self.driver.backing, 0
        if backing is not None:
            out["backing_file"] = backing.filename
        while backing is not None:
            depth, backing = depth + 1, backing.backing
        out["backing_file_depth"] = depth
        return out

    def file_info(self) -> dict:
        """The protocol node's ``BlockDeviceInfo``: the image file itself, format ``file``."""
        try:
            # bdrv_getlength counts whole 512-byte sectors.
            size = -(-os.path.getsize(self.driver.filename) // 512) * 512
        except OSError:
            size = 0
        return self._device_info(self.file_node_name, "file", {
            "virtual-size": size, "filename": self.driver.filename, "format": "file",
            "actual-size": self.driver.actual_size(), "dirty-flag": False})

    def _device_info(self, node_name: str, drv: str, image: dict) -> dict:
        return {"file": self.driver.filename, "node-name": node_name, "ro": self.read_only, "drv": drv,
                "encrypted": False, "detect_zeroes": "off", "bps": 0, "bps_rd": 0, "bps_wr": 0,
                "iops": 0, "iops_rd": 0, "iops_wr": 0, "image": image, "backing_file_depth": 0,
                "write_threshold": 0,
                "cache": {"writeback": True, "direct": False, "no-flush": False}}

    def inactivate(self) -> None:
        """Flush and give the image up (bdrv_inactivate_recurse), so another process may open it."""
        with self.lock:
            if self.active:
                self.driver.flush()
                self.active = False

    def close(self) -> None:
        with self.lock:
            try:
                self.store_persistent_bitmaps()
            except ImageError as err:
                log.error("%s: failed to store persistent bitmaps: %s", self.node_name, err)
            self.driver.close()

    # -- persistent dirty bitmaps (stored in the image; qcow2's bitmap directory) ----------
    # Loaded when the node is created and stored when it closes, as QEMU's qcow2 driver does
    # on open and close (block/qcow2-bitmap.c); see docs/snapshots.md.

    def __post_init__(self) -> None:
        self.load_persistent_bitmaps()

    def load_persistent_bitmaps(self) -> None:
        """The image's bitmaps as persistent DirtyBitmaps (read-only ones on a read-only node)."""
        loaded = {}
        for stored in self.driver.stored_bitmaps():
            bitmap = DirtyBitmap(stored.name, self.size, stored.granularity,
                                 enabled=stored.enabled, persistent=True)
            bitmap.bits[:] = stored.bits
            bitmap.inconsistent = stored.inconsistent
            bitmap.readonly = self.read_only
            loaded[stored.name] = bitmap
        self.bitmaps.update(loaded)

    def store_persistent_bitmaps(self) -> None:
        """Make the image's bitmaps this node's persistent ones (a read-only node never writes)."""
        if self.read_only or not self.driver.supports_persistent_bitmaps:
            return
        with self.lock:
            self.driver.store_bitmaps([
                StoredBitmap(b.name, b.granularity, b.enabled, b.inconsistent, b.bits)
                for b in self.bitmaps.values() if b.persistent])

    def remove_bitmap(self, name: str) -> None:
        """Forget a bitmap; a persistent one leaves the image at once (QEMU's
        bdrv_remove_persistent_dirty_bitmap)."""
        with self.lock:
            bitmap = self.bitmap(name)
            if bitmap.persistent and not self.read_only:
                try:
                    self.driver.remove_stored_bitmap(name)
                except ImageError as err:
                    raise VMError(str(err)) from None
            del self.bitmaps[name]

    def _can_store_new_bitmap(self, name: str, granularity: int) -> None:
        existing = [b.name for b in self.bitmaps.values() if b.persistent]
        try:
            self.driver.can_store_new_bitmap(name, granularity, existing)
        except ImageError as err:
            raise VMError(f"Can't make bitmap '{name}' persistent in "
                          f"'{self.device_or_node_name}': {err}") from None


def image_info(driver: BlockDriver) -> dict:
    """An ``ImageInfo``, down the backing chain."""
    image = {"virtual-size": driver.size, "filename": driver.filename, "format": driver.format_name,
             "actual-size": driver.actual_size(), "dirty-flag": False}
    if driver.cluster_size:
        image["cluster-size"] = driver.cluster_size
    specific = driver.format_specific()
    if specific is not None:
        image["format-specific"] = specific
    snapshots = driver.snapshots()
    if snapshots:
        image["snapshots"] = [snapshot_info(s) for s in snapshots]
    if driver.backing is not None:
        image["backing-filename"] = driver.backing.filename
        image["backing-image"] = image_info(driver.backing)
    return image


def snapshot_info(s: Snapshot) -> dict:
    """A ``SnapshotInfo`` (query-block's ``image.snapshots``)."""
    out = {"id": s.id, "name": s.name, "vm-state-size": s.vm_state_size, "date-sec": s.date_sec,
           "date-nsec": s.date_nsec, "vm-clock-sec": s.vm_clock_nsec // 1_000_000_000,
           "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000}
    if s.icount != -1:
        out["icount"] = s.icount
    return out


class BlockGraph:
    """Every node of one VM, in creation order (QEMU's graph_bdrv_states and the BlockBackends)."""

    def __init__(self) -> None:
        self._nodes: list[BlockNode] = []

    def __iter__(self):
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def add(self, node: BlockNode) -> BlockNode:
        for other in self._nodes:
            if node.node_name in (other.node_name, other.device) or (node.device and node.device in (
                    other.node_name, other.device)):
                raise ImageError(f"Duplicate nodes with node-name='{node.node_name}'"
                                 if node.node_name == other.node_name else
                                 f"node-name={node.node_name or node.device} is conflicting with a device id")
        self._nodes.append(node)
        return node

    def node(self, name: str) -> BlockNode | None:
        """By node name only (snapshot commands name nodes)."""
        return next((n for n in self._nodes if n.node_name == name), None)

    def lookup(self, name: str) -> BlockNode | None:
        """By device name, then node name (QEMU's bdrv_lookup_bs(name, name))."""
        return (next((n for n in self._nodes if n.device and n.device == name), None)
                or self.node(name))

    def device(self, name: str) -> BlockNode | None:
        return next((n for n in self._nodes if n.device and n.device == name), None)

    def devices(self) -> list[BlockNode]:
        return [n for n in self._nodes if n.device]

    def query_block(self) -> list[dict]:
        """query-block: one ``BlockInfo`` per device (BlockBackend)."""
        return [{"device": n.device, "locked": False, "removable": True, "type": "unknown",
                 "inserted": n.info()} for n in self.devices()]

    def query_named_block_nodes(self) -> list[dict]:
        out = []
        for node in reversed(self._nodes):
            out.append(node.info())
            out.append(node.file_info())
        return out

    def activate_all(self) -> None:
        """bdrv_activate_all: this process owns every image again."""
        for node in self._nodes:
            node.active = True

    def inactivate_all(self) -> None:
        """bdrv_inactivate_all: every image flushed and given up."""
        for node in self._nodes:
            node.inactivate()

    def close(self) -> None:
        for node in self._nodes:
            node.close()
