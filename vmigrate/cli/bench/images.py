"""Guest RAM images of a benchmark: filled reproducibly, compared page by page, room checked first."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vmigrate.cli.main import CLIError
from vmigrate.cli.migrate import human_bytes
from vmigrate.machine.memory import PAGE_SIZE


#: wire bytes of one page record: be64 address|flags, then 4096 data bytes or 1 fill byte.
RECORD_HEADER = 8
SPACE_MARGIN = 64 << 20


@dataclass
class RamImage:
    path: Path
    size: int
    zero_pages: int
    sha256: str

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def wire_bytes(self) -> int:
        """Bytes of the page records a precopy of this image puts on the wire (both implementations)."""
        normal = self.npages - self.zero_pages
        return normal * (RECORD_HEADER + PAGE_SIZE) + self.zero_pages * (RECORD_HEADER + 1)


def fill_ram_image(path: Path, size: int, zero_fraction: float, seed: int, chunk: int = 64 << 20) -> RamImage:
    """Random pages, with exactly ``round(npages * zero_fraction)`` all-zero pages spread at random."""
    npages = size // PAGE_SIZE
    rng = np.random.default_rng(seed)
    zero = np.zeros(npages, dtype=np.bool_)
    nzero = round(npages * zero_fraction)
    zero[rng.permutation(npages)[:nzero]] = True
    digest = hashlib.sha256()
    pages_per_chunk = chunk // PAGE_SIZE
    with open(path, "wb") as f:
        for first in range(0, npages, pages_per_chunk):
            count = min(pages_per_chunk, npages - first)
            data = rng.integers(0, 256, count * PAGE_SIZE, dtype=np.uint8).reshape(count, PAGE_SIZE)
            data[zero[first : first + count]] = 0
            f.write(memoryview(data).cast("B"))
            digest.update(data)
    return RamImage(path, size, nzero, digest.hexdigest())


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def diff_pages(a: Path, b: Path) -> tuple[int, int | None]:
    """How many pages differ between two RAM files, and the first one (for a failed verification)."""
    x = np.memmap(a, dtype=np.uint8, mode="r")
    y = np.memmap(b, dtype=np.uint8, mode="r")
    if x.size != y.size:
        return max(x.size, y.size) // PAGE_SIZE, 0
    step = 16384 * PAGE_SIZE
    count, first = 0, None
    for off in range(0, x.size, step):
        differs = (x[off : off + step] != y[off : off + step]).reshape(-1, PAGE_SIZE).any(axis=1)
        hits = np.flatnonzero(differs)
        if hits.size and first is None:
            first = off // PAGE_SIZE + int(hits[0])
        count += int(hits.size)
    return count, first


def check_space(directory: Path, need: int, what: str) -> None:
    """Fail before starting if the RAM files cannot fit: tmpfs pages are host RAM too."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    need += SPACE_MARGIN
    if free < need:
        raise CLIError(f"{directory} has {human_bytes(free)} free, {what} needs {human_bytes(need)}")
    avail = meminfo().get("MemAvailable")
    if avail is not None and avail < need:
        raise CLIError(f"host has {human_bytes(avail)} of RAM available, {what} needs {human_bytes(need)}")


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024
    return out


def verify(rec: dict, src_ram: Path, dst_ram: Path) -> None:
    """Destination RAM must equal source RAM (both frozen: source postmigrate, destination -S).

    The two files are hashed at once (hashlib releases the interpreter lock on
    large updates): at 32 GiB the hashing takes longer than the migration.
    """
    with ThreadPoolExecutor(2) as pool:
        rec["src_sha256"], rec["dst_sha256"] = pool.map(file_sha256, (src_ram, dst_ram))
    rec["verified"] = rec["src_sha256"] == rec["dst_sha256"]
    if not rec["verified"]:
        count, first = diff_pages(src_ram, dst_ram)
        rec["note"] = f"destination RAM differs from source in {count} pages (first: page {first})"
