"""Block node and dirty-bitmap commands (QEMU's block/qapi.c, block/monitor/bitmap-qmp-cmds.c)."""

from __future__ import annotations

import hashlib

import numpy as np

from vmigrate.block.node import BlockNode, DirtyBitmap
from vmigrate.commands import command
from vmigrate.errors import VMError


@command("query-block")
def query_block(vm, args, monitor):
    return vm.block.query_block()


@command("query-named-block-nodes")
def query_named_block_nodes(vm, args, monitor):
    return vm.block.query_named_block_nodes()


def _lookup(vm, node: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
    """block_dirty_bitmap_lookup: the node by device or node name, then the bitmap."""
    bs = vm.block.lookup(node)
    if bs is None:
        raise VMError(f"Node '{node}' not found")
    return bs, bs.bitmap(name)


def _check(bitmap: DirtyBitmap, readonly: bool = True, inconsistent: bool = True) -> None:
    """bdrv_dirty_bitmap_check: busy always; read-only (BDRV_BITMAP_RO) and inconsistent
    (BDRV_BITMAP_INCONSISTENT) bitmaps as each command asks (block/monitor/bitmap-qmp-cmds.c)."""
    if bitmap.busy:
        raise VMError(f"Bitmap '{bitmap.name}' is currently in use by another operation and cannot be used")
    if readonly and bitmap.readonly:
        raise VMError(f"Bitmap '{bitmap.name}' is readonly and cannot be modified")
    if inconsistent and bitmap.inconsistent:
        raise VMError(f"Bitmap '{bitmap.name}' is inconsistent and cannot be used")


@command("block-dirty-bitmap-add")
def block_dirty_bitmap_add(vm, args, monitor):
    name, node = args["name"], args["node"]
    if not name:
        raise VMError("Bitmap name cannot be empty")
    bs = vm.block.lookup(node)
    if bs is None:
        raise VMError(f"Cannot find device='{node}' nor node-name='{node}'")
    bs.add_bitmap(name, args.get("granularity"), args.get("persistent", False), args.get("disabled", False))


@command("block-dirty-bitmap-remove")
def block_dirty_bitmap_remove(vm, args, monitor):
    bs, bitmap = _lookup(vm, args["node"], args["name"])
    _check(bitmap, inconsistent=False)
    bs.remove_bitmap(bitmap.name)


@command("block-dirty-bitmap-clear")
def block_dirty_bitmap_clear(vm, args, monitor):
    bs, bitmap = _lookup(vm, args["node"], args["name"])
    _check(bitmap)
    with bs.lock:
        bitmap.clear()


@command("block-dirty-bitmap-enable")
def block_dirty_bitmap_enable(vm, args, monitor):
    bs, bitmap = _lookup(vm, args["node"], args["name"])
    _check(bitmap, readonly=False)
    bitmap.enabled = True


@command("block-dirty-bitmap-disable")
def block_dirty_bitmap_disable(vm, args, monitor):
    bs, bitmap = _lookup(vm, args["node"], args["name"])
    _check(bitmap, readonly=False)
    bitmap.enabled = False


@command("x-debug-block-dirty-bitmap-sha256")
def x_debug_block_dirty_bitmap_sha256(vm, args, monitor):
    """SHA-256 of the bitmap's bottom level as HBitmap stores it (hbitmap_sha256, util/hbitmap.c):
    one little-endian 64-bit word per 64 bits.  Equal hashes on two VMs mean equal bits, which is
    how migrated bitmaps are compared with QEMU's."""
    bs, bitmap = _lookup(vm, args["node"], args["name"])
    with bs.lock:
        bits = bitmap.bits.copy()
    words = np.zeros(-(-len(bits) // 64) * 64, dtype=bool)
    words[:len(bits)] = bits
    return {"sha256": hashlib.sha256(np.packbits(words, bitorder="little").tobytes()).hexdigest()}
