"""The ``dirty-bitmap`` live section: named dirty bitmaps travel with the VM
(QEMU 7.2's migration/block-dirty-bitmap.c; docs/qemu/block.md §2).

Source: setup picks every named bitmap — on a device's node under the
device name, on any other node under its node name, or, with
``block-bitmap-mapping``, only the mapped nodes and bitmaps under their
aliases — marks them busy and sends one START each.  In precopy nothing
more is sent until completion, with the guest stopped: the bits, 8192 per
chunk, then COMPLETE per bitmap.  After a switch to postcopy the bits go in
the PART iterations instead.

Destination: START creates the bitmap (it must not exist), disabled and
busy; BITS fill it; COMPLETE releases it.  Just before the guest starts
here (QEMU's dirty_bitmap_mig_before_vm_start) the migrated bitmaps that
were enabled are enabled; one still loading (postcopy) records the guest's
writes in a successor that COMPLETE merges.  Errors about one bitmap or
name cancel the bitmaps' migration and let the VM's migration go on, as in
QEMU ("dirty bitmaps are non-critical"); a malformed stream fails the load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from vmigrate.block.node import BlockGraph, BlockNode, DirtyBitmap
from vmigrate.errors import VMError
from vmigrate.migration.config import MigrationConfig
from vmigrate.migration.errors import MigrationError
from vmigrate.migration.savevm import LoadContext, LoadError, SaveContext, SaverSection
from vmigrate.migration.wire import dirty_bitmap as wire
from vmigrate.trace import trace

log = logging.getLogger(__name__)

SECTOR_BITS = wire.SECTOR_BITS


@dataclass(frozen=True)
class _BitmapAlias:
    """One bitmap entry of a mapping, in the direction being used."""

    target: str
    #: The transform's ``persistent``, None when not given.
    persistent: bool | None


def alias_map(mapping: tuple | list | None, name_to_alias: bool) -> dict[str, tuple[str, dict[str, _BitmapAlias]]]:
    """QEMU's construct_alias_map (already validated by options.check_bitmap_mapping):
    key -> (the other name, {bitmap key -> bitmap entry}), keyed by name (source) or alias."""
    out: dict[str, tuple[str, dict[str, _BitmapAlias]]] = {}
    for node in mapping or ():
        bitmaps = {}
        for b in node["bitmaps"]:
            persistent = (b.get("transform") or {}).get("persistent")
            key, target = (b["name"], b["alias"]) if name_to_alias else (b["alias"], b["name"])
            bitmaps[key] = _BitmapAlias(target, persistent)
        key, target = ((node["node-name"], node["alias"]) if name_to_alias
                       else (node["alias"], node["node-name"]))
        out[key] = (target, bitmaps)
    return out


# -- source --------------------------------------------------------------------------------

@dataclass
class _SaveBitmap:
    """SaveBitmapState."""

    node: BlockNode
    bitmap: DirtyBitmap
    node_alias: str
    bitmap_alias: str
    start_flags: int
    total_sectors: int
    sectors_per_chunk: int
    cur_sector: int = 0
    bulk_completed: bool = False


class DirtyBitmapSaver:
    def __init__(self, graph: BlockGraph, ctx: SaveContext) -> None:
        self.ctx = ctx
        self.state = wire.HeaderState()
        self.bitmaps: list[_SaveBitmap] = []
        self.bulk_completed = False
        try:
            self._init(graph, ctx.config.params.block_bitmap_mapping)
        except MigrationError:
            self.cleanup()
            raise

    def _init(self, graph: BlockGraph, mapping: tuple | None) -> None:
        """init_dirty_bitmap_migration: devices by device name, then the other nodes by node name."""
        aliases = alias_map(mapping, True) if mapping is not None else None
        handled: set[int] = set()
        if aliases is None:
            for node in graph.devices():
                self._add(node, node.device, None)
                handled.add(id(node))
        for node in graph:
            if id(node) not in handled:
                self._add(node, node.node_name, aliases)

    def _add(self, node: BlockNode, name: str, aliases: dict | None) -> None:
        """add_bitmaps_to_list, with its checks and texts (QEMU error_reports them and fails the setup)."""
        # QEMU keeps a node's bitmaps newest first.
        bitmaps = [b for b in reversed(node.bitmaps.values()) if b.name]
        if not bitmaps:
            return
        if not name:
            raise MigrationError(f"Bitmap '{bitmaps[0].name}' in unnamed node can't be migrated")
        bitmap_aliases = None
        if aliases is not None:
            entry = aliases.get(name)
            if entry is None:
                return
            node_alias, bitmap_aliases = entry
        else:
            node_alias = name
        if node_alias.startswith("#"):
            raise MigrationError(f"Bitmap '{bitmaps[0].name}' in a node with auto-generated name "
                                 f"'{node_alias}' can't be migrated")
        for bitmap in bitmaps:
            if bitmap.busy:
                raise MigrationError(f"Bitmap '{bitmap.name}' is currently in use by another operation "
                                     "and cannot be used")
            persistent = bitmap.persistent
            if bitmap_aliases is not None:
                inner = bitmap_aliases.get(bitmap.name)
                if inner is None:
                    continue
                bitmap_alias = inner.target
                if inner.persistent is not None:
                    persistent = inner.persistent
            else:
                if len(bitmap.name.encode()) > 255:
                    raise MigrationError(f"Cannot migrate bitmap '{bitmap.name}' on node '{name}': "
                                         "Name is longer than 255 bytes")
                bitmap_alias = bitmap.name
            bitmap.busy = True
            flags = (wire.START_ENABLED if bitmap.enabled else 0) | (wire.START_PERSISTENT if persistent else 0)
            self.bitmaps.append(_SaveBitmap(
                node, bitmap, node_alias, bitmap_alias, flags, node.size >> SECTOR_BITS,
                wire.CHUNK_BYTES * 8 * (bitmap.granularity >> SECTOR_BITS)))

    def setup(self) -> None:
        f = self.ctx.file
        for b in self.bitmaps:
            f.put(wire.start(self.state, b.node_alias, b.bitmap_alias, b.bitmap.granularity, b.start_flags))
        f.put(wire.eos())

    def _send_chunk(self, b: _SaveBitmap) -> None:
        """bulk_phase_send_chunk."""
        nr = min(b.total_sectors - b.cur_sector, b.sectors_per_chunk)
        offset, length = b.cur_sector << SECTOR_BITS, nr << SECTOR_BITS
        with b.node.lock:
            data = wire.serialize_part(b.bitmap.bits, b.bitmap.granularity, offset, length)
        trace("send_bitmap_bits", start_sector=b.cur_sector, nr_sectors=nr)
        self.ctx.file.put(wire.bits(self.state, b.node_alias, b.bitmap_alias, b.cur_sector, nr, data))
        b.cur_sector += nr
        if b.cur_sector >= b.total_sectors:
            b.bulk_completed = True

    def _bulk(self, limit: bool) -> None:
        f = self.ctx.file
        for b in self.bitmaps:
            while not b.bulk_completed:
                self._send_chunk(b)
                if limit and f.rate_limited():
                    return
        self.bulk_completed = True

    def iterate(self) -> bool:
        """dirty_bitmap_save_iterate (asked only while the guest is stopped: in postcopy)."""
        if not self.bulk_completed:
            self._bulk(True)
        self.ctx.file.put(wire.eos())
        return self.bulk_completed

    def complete(self) -> None:
        if not self.bulk_completed:
            self._bulk(False)
        f = self.ctx.file
        for b in self.bitmaps:
            f.put(wire.complete(self.state, b.node_alias, b.bitmap_alias))
        f.put(wire.eos())
        self.cleanup()

    def pending(self) -> int:
        """dirty_bitmap_save_pending: QEMU counts bits, not bytes, and so does this."""
        return sum(-(-((b.total_sectors - b.cur_sector) << SECTOR_BITS) // b.bitmap.granularity)
                   for b in self.bitmaps if not b.bulk_completed)

    def cleanup(self) -> None:
        """dirty_bitmap_do_save_cleanup: the bitmaps are usable again."""
        bitmaps, self.bitmaps = self.bitmaps, []
        for b in bitmaps:
            b.bitmap.busy = False


# -- destination ---------------------------------------------------------------------------

@dataclass
class _LoadBitmap:
    """LoadBitmapState."""

    node: BlockNode
    bitmap: DirtyBitmap
    enabled: bool
    migrated: bool = False
    #: Records the guest's writes when it runs before the bitmap is complete (postcopy).
    successor: DirtyBitmap | None = None


@dataclass
class DirtyBitmapLoader:
    """DBMLoadState: the current node and bitmap, and the bitmaps created by this migration."""

    graph: BlockGraph
    aliases: dict | None
    node: BlockNode | None = None
    node_alias: str = ""
    bitmap_aliases: dict | None = None
    bitmap_entry: _BitmapAlias | None = None
    bitmap: DirtyBitmap | None = None
    bitmap_name: str = ""
    cancelled: bool = False
    before_vm_start_handled: bool = False
    bitmaps: list[_LoadBitmap] = field(default_factory=list)

    def cancel(self, reason: str) -> None:
        """cancel_incoming_locked: the bitmaps not finished are dropped; later chunks are ignored."""
        if reason:
            log.error("%s", reason)
        if self.cancelled:
            return
        self.cancelled = True
        self.node = self.bitmap = None
        for b in self.bitmaps:
            if b.successor is not None:
                b.node.untrack(b.successor)
            with b.node.lock:
                if b.node.bitmaps.get(b.bitmap.name) is b.bitmap:
                    del b.node.bitmaps[b.bitmap.name]
        self.bitmaps = []

    def header(self, chunk: wire.BitmapChunk) -> None:
        """dirty_bitmap_load_header: resolve the names this chunk sent."""
        nothing = chunk.flags == chunk.flags & wire.FLAG_EOS
        if chunk.node is not None:
            self.node_alias = chunk.node
            if not self.cancelled:
                if self.aliases is not None:
                    entry = self.aliases.get(chunk.node)
                    if entry is None:
                        self.node, self.bitmap_aliases = None, None
                        self.cancel(f"Error: Unknown node alias '{chunk.node}'")
                    else:
                        self.bitmap_aliases = entry[1]
                        self.node = self.graph.node(entry[0])
                        if self.node is None:
                            self.cancel(f"Cannot find device='' nor node-name='{entry[0]}'")
                else:
                    self.node = self.graph.lookup(chunk.node)
                    if self.node is None:
                        self.cancel(f"Cannot find device='{chunk.node}' nor node-name='{chunk.node}'")
        elif self.node is None and not nothing and not self.cancelled:
            self.cancel("Error: block device name is not set")
        if chunk.bitmap is not None:
            name = chunk.bitmap
            if not self.cancelled and self.bitmap_aliases is not None:
                entry = self.bitmap_aliases.get(chunk.bitmap)
                self.bitmap_entry = entry
                if entry is None:
                    self.cancel(f"Error: Unknown bitmap alias '{chunk.bitmap}' on node "
                                f"'{self.node.node_name}' (alias '{self.node_alias}')")
                else:
                    name = entry.target
            if not self.cancelled:
                self.bitmap_name = name
                self.bitmap = self.node.bitmaps.get(name)
                if self.bitmap is None and not chunk.flags & wire.FLAG_START:
                    self.cancel(f"Error: unknown dirty bitmap '{name}' for block device "
                                f"'{self.node.node_name}'")
        elif self.bitmap is None and not nothing and not self.cancelled:
            self.cancel("Error: block device name is not set")

    def start(self, chunk: wire.BitmapStart) -> None:
        """dirty_bitmap_load_start: create the bitmap, disabled and busy until COMPLETE."""
        if self.cancelled:
            return
        if self.bitmap is not None:
            raise LoadError(f"Bitmap with the same name ('{self.bitmap_name}') already exists on destination")
        granularity = chunk.granularity
        if granularity < 512 or granularity & (granularity - 1):
            raise LoadError(f"Migrated bitmap '{self.bitmap_name}' has an invalid granularity {granularity}")
        if chunk.start_flags & wire.START_RESERVED:
            raise LoadError(f"Unknown flags in migrated dirty bitmap header: {chunk.start_flags:x}")
        try:
            bitmap = self.node.add_bitmap(self.bitmap_name, granularity, False, True)
        except VMError as err:
            raise LoadError(err.desc) from None
        self.bitmap = bitmap
        entry = self.bitmap_entry if self.bitmap_aliases is not None else None
        if entry is not None and entry.persistent is not None:
            bitmap.persistent = entry.persistent
        else:
            bitmap.persistent = bool(chunk.start_flags & wire.START_PERSISTENT)
        bitmap.busy = True
        self.bitmaps.append(_LoadBitmap(self.node, bitmap, bool(chunk.start_flags & wire.START_ENABLED)))

    def bits(self, chunk: wire.BitmapBits) -> None:
        """dirty_bitmap_load_bits; a range outside the bitmap (which QEMU asserts on) fails the load."""
        if self.cancelled:
            return
        bitmap = self.bitmap
        problem = wire.check_range(len(bitmap.bits), bitmap.granularity, chunk.offset, chunk.length)
        if problem is not None:
            raise LoadError(f"dirty bitmap '{bitmap.name}': {problem}")
        with self.node.lock:
            if chunk.data is None:
                wire.deserialize_zeroes(bitmap.bits, bitmap.granularity, chunk.offset, chunk.length)
                return
            needed = wire.serialization_size(bitmap.granularity, chunk.offset, chunk.length)
            if needed > len(chunk.data) or len(chunk.data) > -(-needed // wire.BUFFER_ALIGN) * wire.BUFFER_ALIGN:
                self.cancel(f"Migrated bitmap granularity doesn't match the destination bitmap "
                            f"'{bitmap.name}' granularity")
                return
            wire.deserialize_part(bitmap.bits, bitmap.granularity, chunk.offset, chunk.length, chunk.data)

    def complete(self) -> None:
        """dirty_bitmap_load_complete: merge the successor, release the bitmap."""
        if self.cancelled:
            return
        for b in self.bitmaps:
            if b.bitmap is self.bitmap:
                with b.node.lock:
                    if b.successor is not None:
                        b.bitmap.bits |= b.successor.bits
                        b.node.untrack(b.successor)
                        b.successor = None
                        b.bitmap.enabled = True
                    b.bitmap.busy = False
                b.migrated = True
                if self.before_vm_start_handled:
                    self.bitmaps.remove(b)
                return

    def before_vm_start(self) -> None:
        """dirty_bitmap_mig_before_vm_start."""
        for b in list(self.bitmaps):
            if b.enabled:
                if b.migrated:
                    b.bitmap.enabled = True
                else:
                    b.successor = b.node.track(b.bitmap.granularity)
            if b.migrated:
                self.bitmaps.remove(b)
        self.before_vm_start_handled = True

    def drop_unfinished(self) -> None:
        """The load ended: a bitmap still without COMPLETE will never get it."""
        if any(not b.migrated for b in self.bitmaps):
            self.cancel("")


class DirtyBitmapSection(SaverSection):
    """The ``dirty-bitmap`` entry of the section registry (savevm_dirty_bitmap_handlers),
    registered after ``ram`` with section id 3, as dirty_bitmap_mig_init runs after ram_mig_init."""

    idstr = "dirty-bitmap"
    instance_id = 0
    section_id = 3
    version_id = wire.DIRTY_BITMAP_SECTION_VERSION
    #: Bitmaps can be sent after the switch to postcopy (has_postcopy).
    supports_postcopy = True

    def __init__(self, graph: BlockGraph) -> None:
        super().__init__()
        self.graph = graph
        self._loader: DirtyBitmapLoader | None = None

    def is_active(self, config: MigrationConfig) -> bool:
        """dirty_bitmap_is_active: the capability, and after setup, bitmaps to send."""
        saver = self._saver
        return config.caps.dirty_bitmaps and (saver is None or bool(saver.bitmaps))

    def is_active_iterate(self, ctx: SaveContext) -> bool:
        """Bits go in iterations only while the guest is stopped here (postcopy)."""
        return ctx.phase() != "precopy"

    # -- save -------------------------------------------------------------------------

    def make_saver(self, ctx: SaveContext) -> DirtyBitmapSaver:
        return DirtyBitmapSaver(self.graph, ctx)

    @property
    def first_copy_done(self) -> bool:
        """Nothing to send while the guest runs: the bits go at completion."""
        return True

    def save_complete_postcopy(self, ctx: SaveContext) -> None:
        self._saver.complete()

    # -- load -------------------------------------------------------------------------

    def load_setup(self, ctx: LoadContext) -> wire.DirtyBitmapBodyDecoder:
        mapping = ctx.config.params.block_bitmap_mapping
        self._loader = DirtyBitmapLoader(self.graph, alias_map(mapping, False) if mapping is not None else None)
        return wire.DirtyBitmapBodyDecoder()

    def load_state(self, event: object) -> None:
        loader = self._loader
        if not isinstance(event, wire.BitmapChunk):
            return
        loader.header(event)
        if isinstance(event, wire.BitmapStart):
            loader.start(event)
        elif isinstance(event, wire.BitmapComplete):
            loader.complete()
        elif isinstance(event, wire.BitmapBits):
            loader.bits(event)

    def load_cleanup(self) -> None:
        """The loader stays for before_vm_start, which a precopy destination runs after the load."""
        if self._loader is not None:
            self._loader.drop_unfinished()

    def before_vm_start(self) -> None:
        if self._loader is not None:
            self._loader.before_vm_start()
