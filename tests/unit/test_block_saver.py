"""The block section's source half on its own: what it sends for the bulk phase, block-incremental,
zero-blocks and the dirty phase, decoded with the wire codec."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from vmigrate.block.node import BlockGraph, BlockNode
from vmigrate.block.raw import RawImage
from vmigrate.migration.block import BlockSection
from vmigrate.migration.options import MigrationOptions
from vmigrate.migration.qemu_file import QEMUFileOut
from vmigrate.migration.rate_limit import RateLimiter
from vmigrate.migration.savevm import SaveContext
from vmigrate.migration.stats import CompressionStats, RamStats, XbzrleStats
from vmigrate.migration.wire import block as B
from vmigrate.migration.wire.buffer import Reader

MIB = 1 << 20


class Collect:
    """A channel that keeps what is written."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data) -> None:
        self.data += bytes(data)

    def shutdown(self) -> None:
        pass


class SparseRaw(RawImage):
    """A raw image that says only its second MiB is allocated (as a qcow2 over a backing file would)."""

    def allocated(self, offset: int, length: int) -> bool:
        return offset < 2 * MIB and offset + length > MIB


def context(block: bool = True, zero_blocks: bool = False, incremental: bool = False) -> tuple[SaveContext, Collect]:
    config = MigrationOptions().snapshot()
    config = dataclasses.replace(
        config, caps=dataclasses.replace(config.caps, block=block, zero_blocks=zero_blocks),
        params=dataclasses.replace(config.params, block_incremental=incremental))
    out = Collect()
    ctx = SaveContext(config, QEMUFileOut(out, RateLimiter()), RateLimiter(), RamStats(), XbzrleStats(),
                      CompressionStats(), None, lambda: "precopy", lambda count: None, lambda dirty, sent: None)
    return ctx, out


def records(data: bytes) -> list:
    r, events = Reader(bytes(data), 0, len(data)), []
    while r.pos < len(data):
        events.append(B.BlockBodyDecoder().decode(r)[0])
    return events


def graph_with(tmp_path: Path, size: int, driver=RawImage) -> tuple[BlockGraph, BlockNode, bytes]:
    content = np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "disk.img"
    path.write_bytes(content)
    graph = BlockGraph()
    node = graph.add(BlockNode("disk0", driver(str(path)), device="drive0"))
    return graph, node, content


def run(section: BlockSection, ctx: SaveContext) -> None:
    section.save_setup(ctx)
    while not section.save_iterate(ctx):
        pass
    section.save_complete(ctx)
    ctx.file.flush()


def test_bulk_then_dirty_then_complete(tmp_path):
    graph, node, content = graph_with(tmp_path, 3 * MIB)
    ctx, out = context()
    section = BlockSection(graph)
    section.save_setup(ctx)
    assert section.disk_info() == {"transferred": 0, "remaining": 3 * MIB, "total": 3 * MIB}
    assert section.bulk_active() and section.pending_estimate() == 3 * MIB
    while not section.first_copy_done:
        section.save_iterate(ctx)
    node.write(MIB + 10, b"guest")  # dirties the second chunk again
    assert section.pending_exact() == MIB and not section.bulk_active()
    section.save_complete(ctx)
    ctx.file.flush()
    assert section.disk_info() is None  # the devices are let go at completion
    events = records(out.data)
    chunks = [e for e in events if isinstance(e, B.BlkChunk)]
    assert [c.sector for c in chunks] == [0, 2048, 4096, 2048]
    assert chunks[-1].data[10:15] == b"guest" and chunks[0].data == content[:MIB]
    progress = [e.percent for e in events if isinstance(e, B.BlkProgress)]
    assert progress == [0, 33, 66, 100]  # one chunk behind, as QEMU; 100 from the completion
    assert isinstance(events[-1], B.BlkEOS)


def test_incremental_sends_only_allocated_chunks(tmp_path):
    graph, _, content = graph_with(tmp_path, 4 * MIB, SparseRaw)
    ctx, out = context(incremental=True)
    run(BlockSection(graph), ctx)
    chunks = [e for e in records(out.data) if isinstance(e, B.BlkChunk)]
    assert [(c.device, c.sector) for c in chunks] == [("drive0", 2048)]
    assert chunks[0].data == content[MIB:2 * MIB]


def test_zero_blocks_and_short_last_chunk(tmp_path):
    graph, node, _ = graph_with(tmp_path, 2 * MIB + 4096)
    node.write_zeroes(0, MIB)
    ctx, out = context(zero_blocks=True)
    run(BlockSection(graph), ctx)
    chunks = [e for e in records(out.data) if isinstance(e, B.BlkChunk)]
    assert chunks[0] == B.BlkChunk("drive0", 0, None)
    assert len(chunks[2].data) == MIB and chunks[2].data[4096:] == bytes(MIB - 4096)


def test_no_disks_and_inactive_section(tmp_path):
    ctx, out = context()
    section = BlockSection(BlockGraph())
    run(section, ctx)
    assert records(out.data) == [B.BlkEOS(), B.BlkProgress(100), B.BlkEOS(), B.BlkProgress(100), B.BlkEOS()]
    assert not section.is_active(context(block=False)[0].config)
