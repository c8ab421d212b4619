"""Hostile inputs shared by the unit and integration tests of issue 13 (bounded resources)."""

from __future__ import annotations

import struct

#: A zstd frame's magic number, little-endian on the wire.
ZSTD_MAGIC = 0xFD2FB528
#: An RLE block's regenerated size: the most one block may expand to (128 KiB).
ZSTD_MAX_BLOCK = 128 << 10


def zstd_rle_frame(blocks: int, block_size: int = ZSTD_MAX_BLOCK) -> bytes:
    """An unfinished zstd frame of ``blocks`` RLE blocks of ``block_size`` bytes of 0xaa, 4 bytes each.

    Frame header: magic, descriptor 0 (no content size, no checksum), a
    2^17-byte window; block header: 3 bytes little-endian, type 1 (RLE), the
    regenerated size.  2046 blocks are 8 KiB of input declaring 256 MiB.
    """
    block = ((block_size << 3) | (1 << 1)).to_bytes(3, "little") + b"\xaa"
    return struct.pack("<IBB", ZSTD_MAGIC, 0, 7 << 3) + block * blocks
