"""The ``block`` live section: QEMU 7.2's legacy block migration (migration/block.c).

Source: at setup every writable disk gets an anonymous dirty bitmap with one
bit per 1 MiB chunk (QEMU's set_dirty_tracking); the iterations first copy
each disk chunk by chunk (the *bulk phase*: with ``block-incremental`` only
the chunks the top image allocates), then the chunks written since they
were copied; completion, with the guest stopped, sends the remaining dirty
chunks, PROGRESS 100 and EOS.  While the bulk phase runs, RAM sends nothing
(:class:`~vmigrate.migration.ram.RamSection` asks :meth:`BlockSection.bulk_active`),
as ram_save_iterate does.  Chunks are read synchronously under the node's
lock, which also clears their dirty bits, so a guest write lands either in
the chunk read or in the bitmap; QEMU reads asynchronously and sends the
chunks of one iteration in the next, which changes timing, not content.

Destination: each chunk names its device by BlockBackend name (``--drive
id=``); the chunk is written cluster by cluster, all-zero clusters as zero
writes, as block_load does.  See docs/block-migration.md and
docs/qemu/block.md §1.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from vmigrate.block.node import BlockGraph, BlockNode, DirtyBitmap
from vmigrate.migration.config import MigrationConfig
from vmigrate.migration.savevm import LoadContext, LoadError, SaveContext, SaverSection
from vmigrate.migration.wire import block as wire
from vmigrate.trace import trace

log = logging.getLogger(__name__)

#: Like RAM, an iteration yields after 50 ms so the loop re-checks limits and convergence.
ITERATION_MAX_SECONDS = 0.05
#: QEMU's bdrv_get_info-based cluster size is used only when it divides the 1 MiB chunk.
CHUNK = wire.CHUNK_SIZE
CHUNK_SECTORS = wire.CHUNK_SECTORS


@dataclass
class _Device:
    """One disk being migrated (QEMU's BlkMigDevState)."""

    node: BlockNode
    #: The name sent: the BlockBackend's (``""`` for a node no device uses, as bdrv_get_device_name).
    name: str
    total_sectors: int
    shared_base: bool
    dirty: DirtyBitmap
    cur_sector: int = 0
    completed_sectors: int = 0
    bulk_completed: bool = False


def migrated_nodes(graph: BlockGraph) -> list[BlockNode]:
    """What init_blk_migration walks (bdrv_first/bdrv_next): the devices' nodes, then the nodes
    the monitor owns that no device uses; read-only and empty ones are left out.

    A ``--blockdev`` node that is another node's backing file is not a root, so it is not walked.
    """
    backing = {id(n.driver.backing) for n in graph if n.driver.backing is not None}
    roots = graph.devices() + [n for n in graph if not n.device and id(n.driver) not in backing]
    return [n for n in roots if not n.read_only and n.size >> wire.SECTOR_BITS]


class BlockSaver:
    """One outgoing attempt's block migration state (QEMU's block_mig_state, source half)."""

    def __init__(self, graph: BlockGraph, ctx: SaveContext) -> None:
        self.ctx = ctx
        self.zero_blocks = ctx.config.caps.zero_blocks
        incremental = ctx.config.params.block_incremental
        self.devices: list[_Device] = []
        for node in migrated_nodes(graph):
            trace("migration_block_init_shared" if incremental else "migration_block_init_full",
                  device=node.device)
            self.devices.append(_Device(node, node.device, node.size >> wire.SECTOR_BITS, incremental,
                                        node.track(CHUNK)))
        self.total_sectors = sum(d.total_sectors for d in self.devices)
        self.bulk_completed = False
        self.prev_progress = -1

    # -- the records ---------------------------------------------------------------------

    def _send_chunk(self, dev: _Device, sector: int, nr_sectors: int) -> None:
        """Read a chunk, clearing its dirty bits in the same critical section, and send it (blk_send)."""
        node = dev.node
        offset, length = sector << wire.SECTOR_BITS, nr_sectors << wire.SECTOR_BITS
        with node.lock:
            dev.dirty.bits[sector // CHUNK_SECTORS] = False
            data = node.driver.read(offset, length)
        if length < CHUNK:
            # QEMU sends its whole 1 MiB buffer, uninitialised past the disk's end; zeroes here.
            data += bytes(CHUNK - length)
        f = self.ctx.file
        if self.zero_blocks and not np.frombuffer(data, np.uint64).any():
            f.put(wire.device_block(dev.name, sector, None))
            return
        f.put(wire.device_block(dev.name, sector, data))
        f.put(data)

    # -- bulk phase ----------------------------------------------------------------------

    def _bulk_chunk(self, dev: _Device) -> bool:
        """mig_save_device_bulk: the device's next chunk; True once its bulk copy is done."""
        total, cur = dev.total_sectors, dev.cur_sector
        if dev.shared_base:
            driver = dev.node.driver
            while cur < total:
                start = cur // CHUNK_SECTORS * CHUNK_SECTORS
                with dev.node.lock:
                    if driver.allocated(start << wire.SECTOR_BITS,
                                        min(CHUNK_SECTORS, total - start) << wire.SECTOR_BITS):
                        break
                cur = start + CHUNK_SECTORS
        if cur >= total:
            dev.cur_sector = dev.completed_sectors = total
            return True
        # As QEMU, what is reported transferred lags one chunk behind what is sent.
        dev.completed_sectors = cur
        cur = cur // CHUNK_SECTORS * CHUNK_SECTORS
        nr = min(CHUNK_SECTORS, total - cur)
        self._send_chunk(dev, cur, nr)
        dev.cur_sector = cur + nr
        return dev.cur_sector >= total

    def _bulk_step(self) -> bool:
        """blk_mig_save_bulked_block: one chunk of the first device not done; False when none was left."""
        completed = 0
        worked = False
        for dev in self.devices:
            if not dev.bulk_completed:
                if self._bulk_chunk(dev):
                    dev.bulk_completed = True
                completed += dev.completed_sectors
                worked = True
                break
            completed += dev.completed_sectors
        progress = completed * 100 // self.total_sectors if self.total_sectors else 100
        if progress != self.prev_progress:
            self.prev_progress = progress
            self.ctx.file.put(wire.progress(progress))
        return worked

    # -- dirty phase ---------------------------------------------------------------------

    def _dirty_chunks(self, dev: _Device) -> np.ndarray:
        with dev.node.lock:
            return np.flatnonzero(dev.dirty.bits)

    def _dirty_step(self, deadline: float | None) -> bool:
        """Send dirty chunks, device after device, until rate-limited (*deadline* not None) or none
        are left; True when none are left (blk_mig_save_dirty_block's 1)."""
        f = self.ctx.file
        for dev in self.devices:
            for chunk in self._dirty_chunks(dev):
                if deadline is not None and (f.rate_limited() or time.monotonic() > deadline):
                    return False
                if not dev.dirty.bits[chunk]:
                    continue
                sector = int(chunk) * CHUNK_SECTORS
                self._send_chunk(dev, sector, min(CHUNK_SECTORS, dev.total_sectors - sector))
        return True

    # -- the section's pieces ------------------------------------------------------------

    def setup(self) -> None:
        self.ctx.file.put(wire.eos())

    def iterate(self) -> bool:
        """block_save_iterate: bulk chunks, then dirty chunks, within the rate limit; True when
        the bulk phase is over and nothing is dirty."""
        f = self.ctx.file
        deadline = time.monotonic() + ITERATION_MAX_SECONDS
        done = False
        while not f.rate_limited() and time.monotonic() <= deadline:
            if not self.bulk_completed:
                if not self._bulk_step():
                    self.bulk_completed = True
                continue
            done = self._dirty_step(deadline)
            break
        f.put(wire.eos())
        return done

    def complete(self) -> None:
        """block_save_complete, guest stopped: every dirty chunk, PROGRESS 100, EOS; then the
        devices are let go (the ``disk`` statistics disappear, as QEMU's bmds list empties)."""
        f = self.ctx.file
        # QEMU assumes the bulk phase is over here; an early switch to postcopy must not lose it.
        while not self.bulk_completed:
            if not self._bulk_step():
                self.bulk_completed = True
        self._dirty_step(None)
        f.put(wire.progress(100))
        f.put(wire.eos())
        self.cleanup()

    def remaining_dirty(self) -> int:
        return sum(dev.dirty.count() for dev in self.devices)

    def pending(self) -> int:
        """Dirty bytes, plus what the bulk phase has yet to read.

        QEMU's block_save_pending counts only dirty and in-flight chunks (at
        least one chunk during the bulk phase); counting the unread bulk too
        lets the convergence check see the disks' real size.
        """
        bulk = sum((dev.total_sectors - dev.cur_sector) << wire.SECTOR_BITS
                   for dev in self.devices if not dev.bulk_completed)
        pending = self.remaining_dirty() + bulk
        return pending or (0 if self.bulk_completed else CHUNK)

    def disk_info(self) -> dict | None:
        """query-migrate's ``disk`` (populate_disk_info) while devices are being migrated."""
        devices = self.devices
        if not devices:
            return None
        total = sum(d.total_sectors for d in devices) << wire.SECTOR_BITS
        transferred = sum(d.completed_sectors for d in devices) << wire.SECTOR_BITS
        return {"transferred": transferred, "remaining": total - transferred, "total": total}

    def cleanup(self) -> None:
        """block_migration_cleanup_bmds: stop tracking."""
        devices, self.devices = self.devices, []
        for dev in devices:
            dev.node.untrack(dev.dirty)


class BlockLoader:
    """block_load: chunks written to the device they name."""

    def __init__(self, graph: BlockGraph) -> None:
        self.graph = graph
        self._prev: BlockNode | None = None
        self._cluster = CHUNK

    def _device(self, name: str) -> BlockNode:
        node = self.graph.device(name)
        if node is None:
            raise LoadError(f"Error unknown block device {name}")
        if node is not self._prev:
            self._prev = node
            if node.size >> wire.SECTOR_BITS <= 0:
                raise LoadError(f"Error getting length of block device {name}")
            # block_load activates the device it writes (blk_activate).
            node.active = True
            cluster = node.driver.cluster_size
            self._cluster = cluster if 0 < cluster <= CHUNK and CHUNK % cluster == 0 else CHUNK
        return node

    def load(self, chunk: wire.BlkChunk) -> None:
        node = self._device(chunk.device)
        total_sectors = node.size >> wire.SECTOR_BITS
        if chunk.sector >= total_sectors:
            raise LoadError(f"block migration chunk at sector {chunk.sector} is beyond the end of "
                            f"device {chunk.device} ({total_sectors} sectors)")
        offset = chunk.offset
        length = min(CHUNK_SECTORS, total_sectors - chunk.sector) << wire.SECTOR_BITS
        if chunk.data is None:
            node.write_zeroes(offset, length)
            return
        cluster = self._cluster
        zero = ~np.frombuffer(chunk.data, np.uint64).reshape(CHUNK // cluster, -1).any(axis=1)
        # One write per run of data clusters, one zero write per run of zero clusters.
        edges = np.flatnonzero(np.diff(zero.astype(np.int8))) + 1
        starts = np.concatenate(([0], edges))
        ends = np.concatenate((edges, [len(zero)]))
        view = memoryview(chunk.data)
        for first, last in zip(starts.tolist(), ends.tolist()):
            lo = first * cluster
            hi = min(last * cluster, length)
            if lo >= hi:
                break
            if zero[first]:
                node.write_zeroes(offset + lo, hi - lo)
            else:
                node.write(offset + lo, view[lo:hi])


class BlockSection(SaverSection):
    """The ``block`` entry of the section registry (savevm_block_handlers), registered before
    ``ram`` with section id 1, as blk_mig_init runs before ram_mig_init."""

    idstr = "block"
    instance_id = 0
    section_id = 1
    version_id = wire.BLOCK_SECTION_VERSION
    #: Block migration ends at the switch to postcopy (no has_postcopy).
    supports_postcopy = False

    def __init__(self, graph: BlockGraph) -> None:
        super().__init__()
        self.graph = graph
        self._loader: BlockLoader | None = None

    def is_active(self, config: MigrationConfig) -> bool:
        return config.caps.block

    def is_active_iterate(self, ctx: SaveContext) -> bool:
        return True

    def bulk_active(self) -> bool:
        """blk_mig_bulk_active: devices are being migrated and their first copy is not out."""
        saver = self._saver
        return saver is not None and bool(saver.devices) and not saver.bulk_completed

    def disk_info(self) -> dict | None:
        saver = self._saver
        return saver.disk_info() if saver is not None else None

    # -- save -------------------------------------------------------------------------

    def make_saver(self, ctx: SaveContext) -> BlockSaver:
        return BlockSaver(self.graph, ctx)

    @property
    def first_copy_done(self) -> bool:
        return self._saver.bulk_completed

    # -- load -------------------------------------------------------------------------

    def load_setup(self, ctx: LoadContext) -> wire.BlockBodyDecoder:
        self._loader = BlockLoader(self.graph)
        return wire.BlockBodyDecoder()

    def load_state(self, event: object) -> None:
        if isinstance(event, wire.BlkChunk):
            self._loader.load(event)
        elif isinstance(event, wire.BlkProgress):
            log.info("Receiving block device images: completed %d %%", event.percent)

    def load_cleanup(self) -> None:
        self._loader = None
