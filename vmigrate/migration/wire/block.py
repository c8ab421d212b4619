"""Records of the ``block`` section: QEMU 7.2's legacy block migration (migration/block.c).

Every record starts with a be64 word whose low 9 bits are flags and whose
high bits are a sector number (a percentage for PROGRESS); docs/qemu/block.md
§1 has the table.  A DEVICE_BLOCK names its device (the BlockBackend name,
a counted string) and carries one whole 1 MiB chunk unless ZERO_BLOCK says
the chunk is zero.  The body of each START/PART/END ends with EOS.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmigrate.migration.wire.buffer import Reader, decode_name
from vmigrate.migration.wire.errors import WireError

SECTOR_BITS = 9
SECTOR_SIZE = 1 << SECTOR_BITS
#: BLK_MIG_BLOCK_SIZE: the unit of block migration, whatever the image's cluster size.
CHUNK_SIZE = 1 << 20
CHUNK_SECTORS = CHUNK_SIZE >> SECTOR_BITS

FLAG_DEVICE_BLOCK = 0x01
FLAG_EOS = 0x02
FLAG_PROGRESS = 0x04
FLAG_ZERO_BLOCK = 0x08

#: The section's version (register_savevm_live("block", 0, 1, ...)).
BLOCK_SECTION_VERSION = 1

_BE64 = struct.Struct(">Q")


def _word(value: int, flags: int) -> bytes:
    return _BE64.pack((value << SECTOR_BITS) | flags)


def device_block(device: str, sector: int, data: bytes | bytearray | memoryview | None) -> bytes:
    """A DEVICE_BLOCK header (blk_send); *data* None makes it a ZERO_BLOCK.

    The 1 MiB of data is not included: the caller puts it separately, so a
    chunk read from the disk goes to the socket without being copied again.
    """
    raw = device.encode()
    if len(raw) > 255:
        raise ValueError(f"block device name longer than 255 bytes: {device!r}")
    if data is not None and len(data) != CHUNK_SIZE:
        raise ValueError(f"a block migration chunk is {CHUNK_SIZE} bytes, not {len(data)}")
    flags = FLAG_DEVICE_BLOCK | (FLAG_ZERO_BLOCK if data is None else 0)
    return _word(sector, flags) + bytes((len(raw),)) + raw


def progress(percent: int) -> bytes:
    return _word(percent, FLAG_PROGRESS)


def eos() -> bytes:
    return _word(0, FLAG_EOS)


@dataclass(frozen=True)
class BlkChunk:
    """One DEVICE_BLOCK: *data* is the 1 MiB chunk, None for a ZERO_BLOCK."""

    device: str
    sector: int
    data: bytes | None

    @property
    def offset(self) -> int:
        return self.sector << SECTOR_BITS


@dataclass(frozen=True)
class BlkProgress:
    percent: int


@dataclass(frozen=True)
class BlkEOS:
    pass


class BlockBodyDecoder:
    """Body decoder of ``block`` sections (QEMU's block_load, one record per event).

    Flags are tested in block_load's order: DEVICE_BLOCK, else PROGRESS,
    else anything but EOS is an error; a record with EOS set ends the body.
    """

    version_id = BLOCK_SECTION_VERSION

    def begin(self, kind: int, section) -> None:
        if section.version_id > BLOCK_SECTION_VERSION:
            raise WireError(f"savevm: unsupported version {section.version_id} for '{section.idstr}' "
                            f"v{BLOCK_SECTION_VERSION}")

    def decode(self, r: Reader) -> tuple[object, bool]:
        word = r.be64()
        flags = word & (SECTOR_SIZE - 1)
        value = word >> SECTOR_BITS
        done = bool(flags & FLAG_EOS)
        if flags & FLAG_DEVICE_BLOCK:
            device = decode_name(r.str8(), "block device name")
            data = None if flags & FLAG_ZERO_BLOCK else r.take(CHUNK_SIZE)
            return BlkChunk(device, value, data), done
        if flags & FLAG_PROGRESS:
            return BlkProgress(value), done
        if not done:
            raise WireError(f"Unknown block migration flags: {flags:#x}")
        return BlkEOS(), True
