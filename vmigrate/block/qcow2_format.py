"""The qcow2 header and its extensions, decoded and validated as pure functions over bytes.

Layout after QEMU's docs/interop/qcow2.txt ("Header", "Header extensions"); limits as
block/qcow2.h's QCOW_MAX_* so that a hostile header cannot make us allocate much.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmigrate.block.driver import ImageError

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104

#: Incompatible feature bits (qcow2.txt, header bytes 72-79).
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
#: Compatible feature bits (80-87).
COMPAT_LAZY_REFCOUNTS = 1 << 0

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
#: Autoclear feature bits (88-95): bit 0 says the bitmaps extension is consistent.
AUTOCLEAR_BITMAPS = 1 << 0

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_BACKING_NAME = 1023
#: block/qcow2.h: QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE (bytes).
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536

#: Header field offsets that vmigrate rewrites in place (qcow2.txt "Header").
OFF_SIZE = 24
OFF_L1 = 36            # l1_size (u32) then l1_table_offset (u64)
OFF_REFTABLE = 48      # refcount_table_offset (u64) then refcount_table_clusters (u32)
OFF_BACKING = 8        # backing_file_offset (u64) then backing_file_size (u32)
OFF_SNAPSHOTS = 60     # nb_snapshots (u32) then snapshots_offset (u64)
OFF_INCOMPAT = 72
OFF_AUTOCLEAR = 88

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")

_INCOMPAT_NAMES = {0: "dirty bit", 1: "corrupt bit", 2: "external data file",
                   3: "compression type", 4: "extended L2 entries"}


@dataclass
class Header:
    """The decoded header fields, extensions kept in file order."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = 0
    extensions: list[tuple[int, bytes]] = field(default_factory=list)
    backing_file: str | None = None
    backing_format: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - 3

    def l1_entries_for(self, size: int) -> int:
        """L1 entries needed to map ``size`` guest bytes (also QEMU's l1_vm_state_index)."""
        shift = self.cluster_bits + self.l2_bits
        return (size + (1 << shift) - 1) >> shift


def _fail(name: str, text: str) -> ImageError:
    return ImageError(f"qcow2 image '{name}': {text}")


def cluster_bits_of(prefix: bytes) -> int:
    """The cluster_bits field from the first bytes, clamped: how much header to read."""
    bits = struct.unpack_from(">I", prefix, 20)[0] if len(prefix) >= 24 else MIN_CLUSTER_BITS
    return min(max(bits, MIN_CLUSTER_BITS), MAX_CLUSTER_BITS)


def parse_header(buf: bytes, file_size: int, name: str) -> Header:
    """Decode and validate the header in ``buf`` (the image's first cluster, or less at EOF).

    Every table the header locates is checked to lie inside ``file_size``; feature bits we
    cannot honour are refused here, the dirty and corrupt bits are left to the caller.
    """
    if len(buf) < V2_HEADER_LENGTH or buf[:4] != MAGIC:
        raise _fail(name, "not a qcow2 image (bad magic or file too short)")
    h = Header(*_V2.unpack_from(buf)[1:])
    if h.version not in (2, 3):
        raise _fail(name, f"unsupported qcow2 version {h.version}")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise _fail(name, f"unsupported cluster size 2^{h.cluster_bits}")
    cs = h.cluster_size
    if h.version == 3:
        if len(buf) < V3_HEADER_LENGTH:
            raise _fail(name, "version 3 header truncated")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
         h.header_length) = _V3.unpack_from(buf, V2_HEADER_LENGTH)
        if h.header_length < V3_HEADER_LENGTH or h.header_length % 8 or h.header_length > cs:
            raise _fail(name, f"invalid header length {h.header_length}")
        if len(buf) < h.header_length:
            raise _fail(name, "header truncated")
        if h.header_length > V3_HEADER_LENGTH:
            h.compression_type = buf[V3_HEADER_LENGTH]
    if h.crypt_method:
        raise _fail(name, "encrypted images are not supported")
    _parse_extensions(h, buf, name)
    _check_features(h, name)
    _check_tables(h, file_size, name)
    if h.backing_file_offset:
        end = h.backing_file_offset + h.backing_file_size
        if h.backing_file_size > MAX_BACKING_NAME or end > min(cs, len(buf)):
            raise _fail(name, "backing file name outside the header cluster or too long")
        h.backing_file = buf[h.backing_file_offset:end].decode("utf-8", "surrogateescape")
    return h


def _parse_extensions(h: Header, buf: bytes, name: str) -> None:
    """Header extensions sit between the header and the backing file name (or cluster end)."""
    pos = h.header_length
    end = min(h.backing_file_offset or h.cluster_size, h.cluster_size, len(buf))
    seen: set[int] = set()
    while pos + 8 <= end:
        kind, length = struct.unpack_from(">II", buf, pos)
        if kind == EXT_END:
            return
        data_end = pos + 8 + length
        if data_end > end:
            raise _fail(name, f"header extension 0x{kind:08x} overruns the header cluster")
        if kind in seen and kind in (EXT_BACKING_FORMAT, EXT_FEATURE_NAMES, EXT_BITMAPS):
            raise _fail(name, f"duplicate header extension 0x{kind:08x}")
        seen.add(kind)
        data = bytes(buf[pos + 8:data_end])
        h.extensions.append((kind, data))
        if kind == EXT_BACKING_FORMAT:
            h.backing_format = data.split(b"\0", 1)[0].decode("ascii", "replace")
        elif kind == EXT_FEATURE_NAMES:
            for off in range(0, len(data) - 47, 48):
                text = data[off + 2:off + 48].split(b"\0", 1)[0].decode("ascii", "replace")
                h.feature_names[(data[off], data[off + 1])] = text
        pos = (data_end + 7) & ~7
    if pos < end:
        raise _fail(name, "header extension area truncated")


def extensions_bytes(extensions: list[tuple[int, bytes]]) -> bytes:
    """The extension area as it follows the header: each padded to 8, then the end marker."""
    out = bytearray()
    for kind, data in extensions:
        out += struct.pack(">II", kind, len(data)) + data + bytes(-len(data) % 8)
    return bytes(out + bytes(8))


def _check_features(h: Header, name: str) -> None:
    if h.incompatible & INCOMPAT_DATA_FILE:
        raise _fail(name, "external data files are not supported")
    if h.incompatible & INCOMPAT_EXTL2:
        raise _fail(name, "extended L2 entries (subclusters) are not supported")
    if h.incompatible & INCOMPAT_COMPRESSION or h.compression_type:
        raise _fail(name, f"compression type {h.compression_type} is not supported (zlib only)")
    unknown = h.incompatible & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
    if unknown:
        bits = [b for b in range(64) if unknown >> b & 1]
        names = ", ".join(h.feature_names.get((0, b), _INCOMPAT_NAMES.get(b, f"bit {b}"))
                          for b in bits)
        raise _fail(name, f"unsupported incompatible features: {names}")
    if h.refcount_order > 6:
        raise _fail(name, f"invalid refcount order {h.refcount_order}")
    if h.refcount_order < 3:
        raise _fail(name, f"refcount width of {1 << h.refcount_order} bits is not supported "
                          "(8, 16, 32 or 64 only)")


def _check_tables(h: Header, file_size: int, name: str) -> None:
    cs = h.cluster_size
    if h.size >= 1 << 62:
        raise _fail(name, f"virtual size {h.size} too large")
    if h.l1_size > MAX_L1_BYTES // 8:
        raise _fail(name, f"active L1 table too large ({h.l1_size} entries)")
    if h.l1_size < h.l1_entries_for(h.size):
        raise _fail(name, f"L1 table of {h.l1_size} entries too small for {h.size} bytes")
    check_table(name, "active L1 table", h.l1_table_offset, h.l1_size * 8, cs, file_size)
    if not h.refcount_table_clusters:
        raise _fail(name, "image has no refcount table")
    if h.refcount_table_clusters > MAX_REFTABLE_BYTES // cs:
        raise _fail(name, f"refcount table too large ({h.refcount_table_clusters} clusters)")
    check_table(name, "refcount table", h.refcount_table_offset,
                h.refcount_table_clusters * cs, cs, file_size)
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise _fail(name, f"too many snapshots ({h.nb_snapshots})")
    if h.nb_snapshots:
        check_table(name, "snapshot table", h.snapshots_offset, 40 * h.nb_snapshots, cs,
                    file_size)


def check_table(name: str, what: str, offset: int, length: int, cluster_size: int,
                file_size: int) -> None:
    """A metadata table must be cluster aligned and inside the file (block/qcow2.c validates
    the same before reading one)."""
    if offset % cluster_size:
        raise _fail(name, f"{what} offset 0x{offset:x} not cluster aligned")
    if offset + length > file_size:
        raise _fail(name, f"{what} at 0x{offset:x} ({length} bytes) beyond the end of the file")

