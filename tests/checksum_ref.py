"""The ``checksum`` guest's arithmetic written out again from its documentation (checksum.S)."""

from __future__ import annotations

import numpy as np


def checksum_reference(words: int, rounds: int) -> int:
    x = np.arange(1, words + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    w = x ^ (x >> np.uint64(32))
    for r in range(1, rounds + 1):
        w ^= w >> np.uint64(31)
        w *= np.uint64(0xBF58476D1CE4E5B9)
        w += np.uint64(r)
    weights = np.arange(words, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    return int(np.sum(w * weights, dtype=np.uint64))
