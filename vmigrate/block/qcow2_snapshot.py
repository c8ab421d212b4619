"""The qcow2 snapshot table: entries decoded and encoded as pure functions over bytes.

Entry layout from docs/interop/qcow2.txt ("Snapshots") and docs/qemu/snapshot-jobs.md §7;
limits as block/qcow2.h (QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS_SIZE).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from vmigrate.block.driver import ImageError, Snapshot

_ENTRY = struct.Struct(">QIHHIIQII")
_EXTRA = struct.Struct(">QQq")
MAX_EXTRA_DATA = 1024
MAX_TABLE_BYTES = 1024 * 65536
#: IDs and names are stored with 16-bit lengths.
MAX_NAME_BYTES = 0xFFFF


@dataclass
class SnapshotEntry:
    """One table entry; ``extra_tail`` keeps extra data beyond the 24 bytes we know."""

    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int
    icount: int = -1
    extra_tail: bytes = b""

    def info(self) -> Snapshot:
        return Snapshot(self.id, self.name, self.vm_state_size, self.date_sec, self.date_nsec,
                        self.vm_clock_nsec, self.icount)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def parse_table(read: Callable[[int, int], bytes], count: int, disk_size: int,
                name: str) -> tuple[list[SnapshotEntry], int]:
    """Decode ``count`` entries through ``read(pos, length)`` (table-relative, raising at EOF).

    Returns the entries and the table's length in bytes.
    """
    entries = []
    pos = 0
    for _ in range(count):
        if pos + _ENTRY.size > MAX_TABLE_BYTES:
            raise ImageError(f"qcow2 image '{name}': snapshot table too large")
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, clock, vm32,
         extra_len) = _ENTRY.unpack(read(pos, _ENTRY.size))
        if extra_len > MAX_EXTRA_DATA:
            raise ImageError(f"qcow2 image '{name}': snapshot extra data too large ({extra_len})")
        length = _ENTRY.size + extra_len + id_len + name_len
        if pos + length > MAX_TABLE_BYTES:
            raise ImageError(f"qcow2 image '{name}': snapshot table too large")
        body = read(pos + _ENTRY.size, extra_len + id_len + name_len)
        extra = body[:extra_len]
        vm_state = vm32
        size = disk_size
        icount = -1
        if extra_len >= 8:
            vm_state = struct.unpack_from(">Q", extra)[0]
        if extra_len >= 16:
            size = struct.unpack_from(">Q", extra, 8)[0]
        if extra_len >= 24:
            icount = struct.unpack_from(">q", extra, 16)[0]
        entries.append(SnapshotEntry(
            l1_off, l1_size, _text(body[extra_len:extra_len + id_len]),
            _text(body[extra_len + id_len:]), date_sec, date_nsec, clock, vm_state, size,
            icount, bytes(extra[24:])))
        pos = (pos + length + 7) & ~7
    return entries, pos


def pack_table(entries: list[SnapshotEntry]) -> bytes:
    """The table as QEMU 7.2 writes it: 24 bytes of extra data (plus any kept), padded to 8."""
    out = bytearray()
    for e in entries:
        sid = e.id.encode("utf-8", "surrogateescape")
        sname = e.name.encode("utf-8", "surrogateescape")
        extra = _EXTRA.pack(e.vm_state_size, e.disk_size, e.icount) + e.extra_tail
        out += _ENTRY.pack(e.l1_table_offset, e.l1_size, len(sid), len(sname), e.date_sec,
                           e.date_nsec, e.vm_clock_nsec, e.vm_state_size & 0xFFFFFFFF,
                           len(extra))
        out += extra + sid + sname
        out += bytes(-len(out) % 8)
    return bytes(out)


def next_id(entries: list[SnapshotEntry]) -> str:
    """Largest numeric ID plus one (block/qcow2-snapshot.c's find_new_snapshot_id)."""
    ids = [int(e.id) for e in entries if e.id.isdigit()]
    return str(max(ids, default=0) + 1)
