"""Persistent dirty bitmaps in qcow2: the extension, directory, tables and data as pure codecs.

Layouts from QEMU's docs/interop/qcow2.txt ("Bitmaps extension", "Bitmap directory",
"Bitmap table", "Bitmap data"); the limits and validity rules are the ones QEMU 7.2 applies
in block/qcow2-bitmap.c and block/qcow2.h (facts only), so an image one accepts the other
accepts too.  Everything here works on bytes and numpy arrays; the driver
(:mod:`vmigrate.block.qcow2`) does the I/O and the cluster allocation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np

from vmigrate.block.driver import ImageError

#: Directory entry flags (qcow2.txt "Bitmap directory", bits 0 and 1; QEMU treats every
#: other bit, extra_data_compatible included, as reserved).
FLAG_IN_USE = 0x1
FLAG_AUTO = 0x2
RESERVED_FLAGS = 0xFFFFFFFC
TYPE_DIRTY_TRACKING = 1

MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME_BYTES = 1023
#: block/qcow2.h QCOW2_MAX_BITMAPS and QCOW2_MAX_BITMAP_DIRECTORY_SIZE.
MAX_BITMAPS = 65535
MAX_DIRECTORY_BYTES = 1024 * MAX_BITMAPS
#: block/qcow2-bitmap.c BME_MAX_TABLE_SIZE (entries) and BME_MAX_PHYS_SIZE (bytes of data).
MAX_TABLE_ENTRIES = 0x8000000
MAX_DATA_BYTES = 0x20000000
#: vmigrate keeps a bool per bit (:class:`vmigrate.block.node.DirtyBitmap`): 1 GiB of
#: memory at most, a 64 TiB disk at 64 KiB granularity.
MAX_BITS = 1 << 30

#: Bitmap table entries (qcow2.txt "Bitmap table").
TABLE_ALL_ZEROES = 0
TABLE_ALL_ONES = 1
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED_MASK = 0xFF000000000001FE

_EXT = struct.Struct(">IIQQ")
_ENTRY = struct.Struct(">QIIBBHI")
EXTENSION_BYTES = _EXT.size


def _fail(image: str, text: str) -> ImageError:
    return ImageError(f"qcow2 image '{image}': {text}")


@dataclass
class BitmapsExtension:
    """The header extension's fields."""

    nb_bitmaps: int
    directory_size: int
    directory_offset: int


def parse_extension(data: bytes, cluster_size: int, image: str) -> BitmapsExtension:
    """The extension, checked as block/qcow2.c qcow2_read_extensions checks it."""
    if len(data) != _EXT.size:
        raise _fail(image, "bitmaps extension: invalid extension length")
    count, reserved, size, offset = _EXT.unpack(data)
    if reserved:
        raise _fail(image, "bitmaps extension: reserved field is not zero")
    if count > MAX_BITMAPS:
        raise _fail(image, f"bitmaps extension: image has {count} bitmaps, exceeding the "
                           f"supported maximum of {MAX_BITMAPS}")
    if count == 0:
        raise _fail(image, "found bitmaps extension with zero bitmaps")
    if offset % cluster_size:
        raise _fail(image, "bitmaps extension: invalid bitmap directory offset")
    if size == 0 or size > MAX_DIRECTORY_BYTES:
        raise _fail(image, f"bitmaps extension: bitmap directory size ({size}) is zero or "
                           f"exceeds the supported maximum ({MAX_DIRECTORY_BYTES})")
    return BitmapsExtension(count, size, offset)


def pack_extension(ext: BitmapsExtension) -> bytes:
    return _EXT.pack(ext.nb_bitmaps, 0, ext.directory_size, ext.directory_offset)


@dataclass
class BitmapEntry:
    """One bitmap directory entry."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    type: int = TYPE_DIRTY_TRACKING
    extra_data: bytes = b""

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & FLAG_AUTO)

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    def encoded_name(self) -> bytes:
        return self.name.encode("utf-8", "surrogateescape")


def entry_bytes(name_bytes: int, extra_bytes: int = 0) -> int:
    """A directory entry's size, padded to 8 (QEMU's calc_dir_entry_size)."""
    return (_ENTRY.size + extra_bytes + name_bytes + 7) & ~7


def parse_directory(raw: bytes, count: int, image: str) -> list[BitmapEntry]:
    """Exactly ``count`` entries filling ``raw`` (block/qcow2-bitmap.c bitmap_list_load).

    Only the structure is checked here; :func:`check_entry` checks each entry against the
    image.  Extra data is refused as QEMU 7.2 refuses it: no extra data is defined yet.
    """
    entries: list[BitmapEntry] = []
    names: set[str] = set()
    pos = 0
    while pos < len(raw):
        if pos + _ENTRY.size > len(raw):
            raise _fail(image, "broken bitmap directory")
        if len(entries) == count:
            raise _fail(image, "more bitmaps found than specified in the header extension")
        (table_offset, table_size, flags, kind, gran_bits, name_size,
         extra_size) = _ENTRY.unpack_from(raw, pos)
        end = pos + entry_bytes(name_size, extra_size)
        if end > len(raw):
            raise _fail(image, "broken bitmap directory")
        if extra_size:
            raise _fail(image, "bitmap extra data is not supported")
        if name_size == 0 or name_size > MAX_NAME_BYTES:
            raise _fail(image, f"bitmap name of {name_size} bytes in the bitmap directory")
        name = raw[pos + _ENTRY.size:pos + _ENTRY.size + name_size].decode(
            "utf-8", "surrogateescape")
        if name in names:
            raise _fail(image, f"duplicate bitmap name '{name}' in the bitmap directory")
        names.add(name)
        entries.append(BitmapEntry(name, table_offset, table_size, flags, gran_bits, kind))
        pos = end
    if len(entries) != count:
        raise _fail(image, "fewer bitmaps found than specified in the header extension")
    return entries


def pack_directory(entries: list[BitmapEntry]) -> bytes:
    out = bytearray()
    for e in entries:
        name = e.encoded_name()
        start = len(out)
        out += _ENTRY.pack(e.table_offset, e.table_size, e.flags, e.type, e.granularity_bits,
                           len(name), len(e.extra_data))
        out += e.extra_data + name
        out += bytes(entry_bytes(len(name), len(e.extra_data)) - (len(out) - start))
    return bytes(out)


def table_size(disk_size: int, granularity: int, cluster_size: int) -> int:
    """Bitmap table entries for a disk: clusters of bitmap data, one bit per granule."""
    data_bytes = -(-(-(-disk_size // granularity)) // 8)
    return -(-data_bytes // cluster_size)


def check_entry(e: BitmapEntry, cluster_size: int, disk_size: int, file_size: int,
                image: str) -> None:
    """block/qcow2-bitmap.c check_dir_entry, plus the table inside the file.

    A bitmap marked in use may have a table of the wrong size (it was not saved after a
    resize); its data is never read.
    """
    bad = (e.table_size == 0 or e.table_offset == 0 or e.table_offset % cluster_size
           or e.table_size > MAX_TABLE_ENTRIES
           or not MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS
           or e.flags & RESERVED_FLAGS or e.type != TYPE_DIRTY_TRACKING
           or e.table_size * cluster_size > MAX_DATA_BYTES)
    if not bad and not e.in_use:
        bad = e.table_size != table_size(disk_size, e.granularity, cluster_size)
    if bad:
        raise _fail(image, f"bitmap '{e.name}' doesn't satisfy the constraints")
    if -(-disk_size // e.granularity) > MAX_BITS:
        raise _fail(image, f"bitmap '{e.name}' has more than {MAX_BITS} bits")
    if e.table_offset + 8 * e.table_size > file_size:
        raise _fail(image, f"bitmap '{e.name}': table beyond the end of the file")


def parse_bitmap_table(raw: bytes, cluster_size: int, file_size: int, image: str,
                name: str) -> np.ndarray:
    """Table entries as native uint64, each 0, 1 or a cluster inside the file."""
    table = np.frombuffer(raw, ">u8").astype(np.uint64)
    offsets = table & np.uint64(TABLE_OFFSET_MASK)
    bad = ((table & np.uint64(TABLE_RESERVED_MASK)) != 0) | (
        (offsets != 0) & (((table & np.uint64(1)) != 0)
                          | ((offsets & np.uint64(cluster_size - 1)) != 0)
                          | (offsets + np.uint64(cluster_size) > np.uint64(file_size))))
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise _fail(image, f"bitmap '{name}': invalid table entry {index} "
                           f"(0x{int(table[index]):x})")
    return table


def decode_bits(table: np.ndarray, read_cluster: Callable[[int], bytes], nbits: int,
                cluster_size: int) -> np.ndarray:
    """The bitmap as bools, bit ``i`` being bit ``i % 8`` (least significant first) of data
    byte ``i // 8`` (qcow2.txt "Bitmap data"); unused tail bits are ignored."""
    data = np.zeros((len(table), cluster_size), np.uint8)
    data[table == np.uint64(TABLE_ALL_ONES)] = 0xFF
    for index in np.flatnonzero(table > np.uint64(TABLE_ALL_ONES)).tolist():
        data[index] = np.frombuffer(read_cluster(int(table[index])), np.uint8)
    return np.unpackbits(data.reshape(-1), count=nbits, bitorder="little").astype(bool)


def encode_bits(bits: np.ndarray, cluster_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The bitmap's data clusters, and a table template: 0 for an all-zero cluster, 1 for a
    cluster wholly inside the bitmap with every bit set, -1 where the cluster must be
    written (then ``clusters[i]`` is its content, tail bits zero)."""
    packed = np.packbits(np.asarray(bits, bool), bitorder="little")
    count = -(-len(packed) // cluster_size)
    clusters = np.zeros(count * cluster_size, np.uint8)
    clusters[:len(packed)] = packed
    clusters = clusters.reshape(count, cluster_size)
    kinds = np.full(count, -1, np.int64)
    kinds[~clusters.any(axis=1)] = TABLE_ALL_ZEROES
    full = np.arange(1, count + 1) * cluster_size * 8 <= len(bits)
    kinds[full & (clusters == 0xFF).all(axis=1)] = TABLE_ALL_ONES
    return kinds, clusters
