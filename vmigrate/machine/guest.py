"""Guest workloads for the software vCPU.

A workload keeps *all* of its state in guest RAM (a small header at the
start of the ``ram`` block), never in Python objects: after a migration the
destination's vCPU continues exactly where the source stopped, because the
state travelled with the memory.  Each :meth:`Workload.step` is short so a
pause request is honoured quickly.

Layout of the header page (page 0):

====== ======= ===================================================
offset size    meaning
====== ======= ===================================================
0      8       magic ``b"VMIGRATE"`` once the workload initialised
8      8       pass / step counter (little-endian u64)
16     8       stress cursor (page index inside the working set)
24     8       checksum result, once the counter passed the rounds
32     8       disk cursor (4 KiB block index inside the disk) of ``stress:disk=``
40     8       disk step counter of ``stress:disk=`` (the stamp of the last blocks written)
====== ======= ===================================================

``stress:...,disk=NAME,disk-rate=MBPS`` also writes the disk (node or
device) *NAME* round-robin, *disk-rate* MiB/s, through the block node (so
its dirty bitmaps and block migration see the writes).  Each 4 KiB block
written holds the disk step number in its first 8 bytes and its own block
index in the next 8 (little-endian), the rest zero: content that depends
only on the header, so a destination guest continues the same sequence and
a test can recompute what the disk must hold.

The x86 programs run under KVM (:mod:`vmigrate.machine.x86guest`) keep the
same header, so tools read either kind of guest the same way.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from vmigrate.machine.memory import PAGE_SIZE, RAMBlock, parse_size

if TYPE_CHECKING:
    from vmigrate.block.node import BlockNode

MAGIC = b"VMIGRATE"
HEADER_PAGES = 1
#: The disk workload's unit.
DISK_BLOCK = 4096
#: Header words (u64 index) of the disk cursor and the disk step counter.
DISK_CURSOR_WORD = 4
DISK_STEP_WORD = 5
#: Finds a disk by device or node name (QEMU's bdrv_lookup_bs); None when there is none.
DiskLookup = Callable[[str], "BlockNode | None"]


class Workload:
    """Base: one unit of guest work per :meth:`step`."""

    name = "idle"

    def __init__(self, ram: RAMBlock) -> None:
        self.ram = ram
        self._u64 = ram.bytes[:PAGE_SIZE].view(np.uint64)

    def _init_header(self) -> None:
        self.ram.access(0, HEADER_PAGES)
        if bytes(self.ram.bytes[:8]) != MAGIC:
            self.ram.bytes[:8] = np.frombuffer(MAGIC, dtype=np.uint8)
            self._u64[1:3] = 0
            self.ram.dirty.mark_range(0, 1)

    @property
    def counter(self) -> int:
        return int(self._u64[1])

    def step(self) -> float:
        """Do one unit of work; return how long to sleep before the next one (s)."""
        return 0.05


class Idle(Workload):
    name = "idle"


class AB(Workload):
    """QEMU's migration-test guest: +1 on the first byte of every page of a window per pass.

    After any number of passes, each window page's first byte equals the
    pass count (mod 256) or, mid-pass, one less — a migration that loses or
    reorders memory shows up as a gap.
    """

    name = "ab"

    def __init__(self, ram: RAMBlock, start: int = 1 << 20, end: int = 100 << 20, sleep_ms: float = 1.0) -> None:
        super().__init__(ram)
        first = max(start // PAGE_SIZE, HEADER_PAGES)
        last = min(end // PAGE_SIZE, ram.npages)
        if last <= first:
            first, last = HEADER_PAGES, ram.npages
        self.first, self.last = first, last
        self._column = ram.pages[first:last, 0]
        self.sleep = sleep_ms / 1000
        self._init_header()

    def step(self) -> float:
        self.ram.access(0, self.last)
        self._column += 1
        self.ram.dirty.mark_range(self.first, self.last - self.first)
        self._u64[1] += 1
        self.ram.dirty.mark_range(0, 1)
        return self.sleep

    def check(self) -> None:
        """Raise AssertionError unless RAM shows an unbroken ab pattern."""
        expected = self.counter & 0xFF
        col = self._column
        ok = (col == expected) | (col == ((expected - 1) & 0xFF))
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise AssertionError(
                f"ab pattern broken at page {self.first + bad}: {int(col[bad])} vs pass {self.counter}"
            )


class Stress(Workload):
    """Dirties a working set at a target rate, round-robin, a few ms at a time.

    ``tick=0`` never sleeps between steps: the guest spins on the clock, as
    the x86 program must on a PC, which has no sleep hypercall.
    """

    name = "stress"

    def __init__(self, ram: RAMBlock, rate: float = 100.0, wss: int = 64 << 20, tick_ms: float = 5.0,
                 disk: str | None = None, disk_rate: float = 8.0, disks: DiskLookup | None = None) -> None:
        super().__init__(ram)
        self.tick = tick_ms / 1000
        self.first = HEADER_PAGES
        self.count = max(1, min(wss // PAGE_SIZE, ram.npages - HEADER_PAGES))
        self.pages_per_second = rate * (1 << 20) / PAGE_SIZE
        self._last = time.monotonic()
        self._credit = 0.0
        self.disk: BlockNode | None = None
        if disk is not None:
            self.disk = disks(disk) if disks is not None else None
            if self.disk is None:
                raise ValueError(f"guest disk '{disk}': no such device or node")
            if self.disk.size < DISK_BLOCK:
                raise ValueError(f"guest disk '{disk}' is smaller than {DISK_BLOCK} bytes")
        self.disk_blocks_per_second = disk_rate * (1 << 20) / DISK_BLOCK
        self._disk_credit = 0.0
        self._init_header()

    def _init_header(self) -> None:
        # Touch guest RAM only after access(): on a postcopy destination it fetches the page.
        self.ram.access(0, HEADER_PAGES)
        fresh = bytes(self.ram.bytes[:8]) != MAGIC
        super()._init_header()
        if fresh:
            self._u64[DISK_CURSOR_WORD:DISK_STEP_WORD + 1] = 0

    def step(self) -> float:
        now = time.monotonic()
        elapsed = now - self._last
        # Bounded catch-up: a guest that was paused does not burst afterwards.
        self._credit = min(self._credit + elapsed * self.pages_per_second, self.pages_per_second * 0.1)
        self._last = now
        if self.disk is not None:
            self._disk_credit = min(self._disk_credit + elapsed * self.disk_blocks_per_second,
                                    self.disk_blocks_per_second * 0.1)
            self._write_disk()
        n = int(self._credit)
        if n:
            self._credit -= n
            self.ram.access(0, HEADER_PAGES)
            cursor = int(self._u64[2])
            idx = self.first + (cursor + np.arange(n)) % self.count
            if n >= self.count:
                self.ram.access(self.first, self.count)
            else:
                self._access_run(int(idx[0]), int(idx[-1]))
            stamp = int(self._u64[1]) + 1
            self.write(idx, stamp)
            self.ram.dirty.mark_pages(idx)
            self._u64[1] = stamp
            self._u64[2] = (cursor + n) % self.count
            self.ram.dirty.mark_range(0, 1)
        return self.tick

    def _access_run(self, first: int, last: int) -> None:
        """The pages of a round-robin run from *first* to *last*, which may wrap past the end."""
        if last >= first:
            self.ram.access(first, last - first + 1)
        else:
            self.ram.access(first, self.first + self.count - first)
            self.ram.access(self.first, last - self.first + 1)

    def write(self, pages: np.ndarray, stamp: int) -> None:
        """How a page is dirtied: its first 8 bytes become the step number."""
        self.ram.pages[pages, :8] = np.frombuffer(stamp.to_bytes(8, "little"), dtype=np.uint8)

    def _write_disk(self) -> None:
        """The disk's share of a step: the next blocks after the cursor, stamped (module doc).

        A disk given up by a migration (inactive) is not written, as QEMU's
        writes to an inactive image fail; the guest runs again only once
        ``cont`` has taken it back anyway.
        """
        n = int(self._disk_credit)
        disk = self.disk
        if not n or not disk.active:
            return
        self._disk_credit -= n
        total = disk.size // DISK_BLOCK
        n = min(n, total)
        self.ram.access(0, HEADER_PAGES)
        cursor = int(self._u64[DISK_CURSOR_WORD]) % total
        stamp = int(self._u64[DISK_STEP_WORD]) + 1
        first_run = min(n, total - cursor)
        for start, count in ((cursor, first_run), (0, n - first_run)):
            if count:
                disk.write(start * DISK_BLOCK, disk_blocks(start, count, stamp))
        self._u64[DISK_STEP_WORD] = stamp
        self._u64[DISK_CURSOR_WORD] = (cursor + n) % total
        self.ram.dirty.mark_range(0, 1)


def disk_blocks(first: int, count: int, stamp: int) -> bytes:
    """The bytes the disk workload writes at blocks [first, first+count) in step *stamp*."""
    words = np.zeros((count, DISK_BLOCK // 8), dtype="<u8")
    words[:, 0] = stamp
    words[:, 1] = np.arange(first, first + count, dtype=np.uint64)
    return words.tobytes()


class Checksum(Workload):
    """A long computation over guest memory whose result must survive a migration unchanged.

    The same arithmetic as the x86 program ``checksum.S`` (its comment has
    the formulas), one round per step: words of [1 MiB, 1 MiB + size) are
    filled, mixed *rounds* times, then summed into the header.
    """

    name = "checksum"
    BASE = 1 << 20
    FILL = np.uint64(0x9E3779B97F4A7C15)
    MIX = np.uint64(0xBF58476D1CE4E5B9)

    def __init__(self, ram: RAMBlock, size: int = 16 << 20, rounds: int = 1000) -> None:
        super().__init__(ram)
        base = min(self.BASE, ram.size // 2) // PAGE_SIZE * PAGE_SIZE
        words = max(1, (min(size, ram.size - base)) // 8)
        self.rounds = rounds
        self._words = ram.bytes[base:base + words * 8].view(np.uint64)
        self._first, self._count = base // PAGE_SIZE, -(-words * 8 // PAGE_SIZE)
        self._init_header()

    def step(self) -> float:
        self.ram.access(0, HEADER_PAGES)
        done = self.counter
        if done > self.rounds:
            return 0.05
        self.ram.access(self._first, self._count)
        w = self._words
        if self._u64[2] == 0:
            x = np.arange(1, len(w) + 1, dtype=np.uint64) * self.FILL
            w[:] = x ^ (x >> np.uint64(32))
            self._u64[2] = 1
        elif done < self.rounds:
            w ^= w >> np.uint64(31)
            w *= self.MIX
            w += np.uint64(done + 1)
            self._u64[1] = done + 1
        else:
            self._u64[3] = checksum_result(w)
            self._u64[1] = done + 1
        self.ram.dirty.mark_range(self._first, self._count)
        self.ram.dirty.mark_range(0, 1)
        return 0.0


def checksum_result(words: np.ndarray) -> int:
    """The final sum of the checksum guest: sum of w[i] * (2i + 1) mod 2^64."""
    weights = np.arange(len(words), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    return int(np.sum(words * weights, dtype=np.uint64))


def read_header(ram_file: str) -> int | None:
    """The workload's step counter from a RAM file (``--mem-path``), None before it started.

    Lets tools watch a guest make progress from outside, through its memory.
    """
    with open(ram_file, "rb") as f:
        head = f.read(16)
    if head[:8] != MAGIC:
        return None
    return int.from_bytes(head[8:16], "little")


@dataclass(frozen=True)
class GuestSpec:
    """A parsed ``--guest`` value: ``idle``, ``ab[:start=..,end=..,sleep=MS]``,
    ``stress:rate=MBPS,wss=SIZE[,tick=MS][,disk=NAME,disk-rate=MBPS]``, ``checksum[:size=SIZE,rounds=N]``."""

    kind: str
    options: dict

    @classmethod
    def parse(cls, text: str) -> "GuestSpec":
        kind, _, rest = text.partition(":")
        if kind not in WORKLOADS:
            raise ValueError(f"unknown guest workload '{kind}' (choose from {', '.join(WORKLOADS)})")
        options: dict = {}
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"guest option '{item}' is not KEY=VALUE")
            options[key] = value
        spec = cls(kind, options)
        spec._convert()
        return spec

    def _convert(self) -> dict:
        conv = {
            "ab": {"start": lambda v: parse_size(v, "B"), "end": lambda v: parse_size(v, "B"), "sleep": float},
            "stress": {"rate": float, "wss": lambda v: parse_size(v, "M"), "tick": float, "disk": str,
                       "disk-rate": float},
            "checksum": {"size": lambda v: parse_size(v, "M"), "rounds": int},
            "idle": {},
        }[self.kind]
        names = {"sleep": "sleep_ms", "tick": "tick_ms", "disk-rate": "disk_rate"}
        out = {}
        for key, value in self.options.items():
            if key not in conv:
                raise ValueError(f"guest '{self.kind}' has no option '{key}'")
            try:
                out[names.get(key, key)] = conv[key](value)
            except ValueError:
                raise ValueError(f"invalid value '{value}' for guest option '{key}'") from None
        return out

    def arguments(self) -> dict:
        """Every option of the workload with its value: the given ones, the defaults for the rest.

        The defaults are the software workload's, so the x86 programs under
        KVM take the same ones.
        """
        params = inspect.signature(WORKLOADS[self.kind].__init__).parameters
        defaults = {n: p.default for n, p in params.items()
                    if p.default is not inspect.Parameter.empty and n != "disks"}
        return {**defaults, **self._convert()}

    @property
    def disk(self) -> str | None:
        """The disk the workload writes (``stress:disk=``), if any."""
        return self.options.get("disk")

    def build(self, ram: RAMBlock, disks: DiskLookup | None = None) -> Workload:
        """The workload over *ram*; *disks* finds the disk a ``disk=`` option names."""
        options = self._convert()
        if self.kind == "stress":
            options["disks"] = disks
        return WORKLOADS[self.kind](ram, **options)


WORKLOADS: dict[str, type[Workload]] = {"idle": Idle, "ab": AB, "stress": Stress, "checksum": Checksum}
