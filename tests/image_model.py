"""Random guest writes to an image and to a bytearray model of it, for format tests."""

from __future__ import annotations

import random


def scribble(img, model: bytearray, rnd: random.Random, count: int, span: int) -> None:
    """*count* writes of up to *span* random bytes at random offsets, to *img* and *model* alike."""
    for _ in range(count):
        n = rnd.randrange(1, span)
        off = rnd.randrange(0, len(model) - n)
        data = rnd.randbytes(n)
        img.write(off, data)
        model[off:off + n] = data
