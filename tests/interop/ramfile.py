"""Guest RAM seen from outside, through the shared files backing it.

Patterns are written with numpy over whole page sets; comparisons report
the first differing page so a failure says *where* memory went wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vmigrate.machine.memory import PAGE_SIZE

__all__ = ["PAGE_SIZE", "pages", "fill_pattern", "fill_garbage", "first_difference", "ab_state"]

HEADER = b"INTEROP-PATTERN\0"


def pages(path: Path, size: int, writable: bool = False) -> np.ndarray:
    """The file as an (npages, 4096) array; created with *size* bytes if *writable* and missing."""
    mode = "r+" if writable else "r"
    if writable and (not path.exists() or path.stat().st_size < size):
        with open(path, "ab") as f:
            f.truncate(size)
    return np.memmap(path, dtype=np.uint8, mode=mode, shape=(size // PAGE_SIZE, PAGE_SIZE))


def fill_pattern(path: Path, size: int, seed: int = 0, random_pages: int = 4096) -> np.ndarray:
    """Write a mix a migration must reproduce exactly; returns the indices of non-zero pages.

    Page 0 gets a recognisable header; then random pages (normal pages on
    the wire), pages of one repeated non-zero byte (not zero pages, despite
    being uniform), pages whose only non-zero byte is the last one (defeats
    a zero test that looks at a prefix), and everything else stays zero.
    """
    rng = np.random.default_rng(seed)
    ram = pages(path, size, writable=True)
    npages = ram.shape[0]
    chosen = rng.choice(np.arange(1, npages), size=min(random_pages * 3 // 2, npages - 1), replace=False)
    random_idx, uniform_idx, tail_idx = np.array_split(chosen, [random_pages, random_pages + random_pages // 4])
    ram[0, : len(HEADER)] = np.frombuffer(HEADER, dtype=np.uint8)
    ram[0, 4088:] = np.frombuffer(seed.to_bytes(8, "little"), dtype=np.uint8)
    ram[np.sort(random_idx)] = rng.integers(0, 256, size=(len(random_idx), PAGE_SIZE), dtype=np.uint8)
    ram[uniform_idx] = 0x5A
    ram[tail_idx, -1] = 0xA5
    ram.flush()
    return np.sort(np.concatenate([[0], chosen]))


def fill_garbage(path: Path, size: int, stride: int = 5) -> None:
    """Put stale non-zero bytes in every *stride*-th page of a destination's RAM.

    A destination that skips zero pages it believes are already zero, or that
    does not receive every page, is then caught by the final comparison.
    """
    ram = pages(path, size, writable=True)
    ram[::stride, ::512] = 0xEE
    ram.flush()


def first_difference(a: Path, b: Path, size: int) -> int | None:
    """Index of the first page that differs between two RAM files, None if equal."""
    pa, pb = pages(a, size), pages(b, size)
    step = 8192
    for start in range(0, pa.shape[0], step):
        diff = np.flatnonzero((pa[start : start + step] != pb[start : start + step]).any(axis=1))
        if diff.size:
            return start + int(diff[0])
    return None


def ab_state(path: Path, size: int, first: int, last: int) -> tuple[int, np.ndarray]:
    """(pass counter, page indices breaking the pattern) of vmigrate's ``ab`` guest.

    A pass (+1 on every window page, then +1 on the counter) is atomic with
    respect to pausing the vCPU, so in a stopped guest every window page's
    first byte equals the counter mod 256.
    """
    ram = pages(path, size)
    assert bytes(ram[0, :8]) == b"VMIGRATE", "the ab guest never initialised its header"
    counter = int.from_bytes(bytes(ram[0, 8:16]), "little")
    column = np.asarray(ram[first:last, 0])
    return counter, first + np.flatnonzero(column != counter & 0xFF)
