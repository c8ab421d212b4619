"""The orders in which QEMU 7.2 walks the keys of a JSON object.

They decide observable behaviour: when a request carries several unknown
members, QEMU names the *first one left* in a GLib hash table of unvisited
keys; and QEMU serialises every reply object in the bucket order of its QDict.
Both are deterministic functions of the key strings (and of the order in
which keys were added and removed), so we reproduce them instead of reporting
an arbitrary key.  Reimplemented from the documented behaviour of QDict
(512 chained buckets, newest first) and GLib 2.74's open-addressing table
(quadratic probing, prime modulus, in-place resize); checked against the real
binary by ``tests/unit/test_qapi.py``.
"""

from __future__ import annotations

from collections.abc import Iterable

_M32 = 0xFFFFFFFF
_QDICT_BUCKETS = 512

# The prime below each power-of-two table size, indexed by log2(size).
_PRIME_MOD = (
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749,
    65521, 131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213,
    33554393, 67108859, 134217689, 268435399, 536870909, 1073741789, 2147483647,
)
_MIN_SHIFT = 3
_UNUSED, _TOMBSTONE = 0, 1


def _qdict_bucket(key: str) -> int:
    data = key.encode()
    value = (0x238F13AF * len(data)) & _M32
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & _M32
    return ((1103515243 * value + 12345) & _M32) % _QDICT_BUCKETS


def qdict_key_order(keys: Iterable[str]) -> list[str]:
    """Order in which QEMU iterates (and serialises) a QDict built by
    inserting ``keys`` in the given order (e.g. JSON text order)."""
    ranked = [(_qdict_bucket(k), -i, k) for i, k in enumerate(keys)]
    return [k for _, _, k in sorted(ranked)]


def _g_str_hash(key: str) -> int:
    h = 5381
    for byte in key.encode():
        h = (h * 33 + (byte - 256 if byte >= 128 else byte)) & _M32
    return h if h > _TOMBSTONE else 2


class GKeySet:
    """A GLib ``GHashTable`` of string keys, reduced to what decides its
    iteration order: slot hashes, keys, tombstones and resizes."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._set_shift(_MIN_SHIFT)
        self._hashes = [_UNUSED] * self._size
        self._keys: list[str | None] = [None] * self._size
        self._nnodes = 0
        self._noccupied = 0
        for key in keys:
            self.add(key)

    def _set_shift(self, shift: int) -> None:
        self._size = 1 << shift
        self._mod = _PRIME_MOD[shift]
        self._mask = self._size - 1

    def _home(self, h: int) -> int:
        return ((h * 11) & _M32) % self._mod

    def _lookup(self, key: str, h: int) -> int:
        index = self._home(h)
        tombstone = None
        step = 0
        while self._hashes[index] != _UNUSED:
            node = self._hashes[index]
            if node == h and self._keys[index] == key:
                return index
            if node == _TOMBSTONE and tombstone is None:
                tombstone = index
            step += 1
            index = (index + step) & self._mask
        return index if tombstone is None else tombstone

    def add(self, key: str) -> None:
        h = _g_str_hash(key)
        index = self._lookup(key, h)
        old = self._hashes[index]
        if old > _TOMBSTONE:
            return
        self._hashes[index] = h
        self._keys[index] = key
        self._nnodes += 1
        if old == _UNUSED:
            self._noccupied += 1
            self._maybe_resize()

    def discard(self, key: str) -> None:
        index = self._lookup(key, _g_str_hash(key))
        if self._hashes[index] <= _TOMBSTONE:
            return
        self._hashes[index] = _TOMBSTONE
        self._keys[index] = None
        self._nnodes -= 1
        self._maybe_resize()

    def __iter__(self):
        return (k for h, k in zip(self._hashes, self._keys) if h > _TOMBSTONE)

    def first(self) -> str | None:
        return next(iter(self), None)

    def _maybe_resize(self) -> None:
        size, occ = self._size, self._noccupied
        if (size > self._nnodes * 4 and size > 1 << _MIN_SHIFT) or size <= occ + occ // 16:
            self._resize()

    def _resize(self) -> None:
        old_size = self._size
        self._set_shift(max(int(self._nnodes * 1.333).bit_length(), _MIN_SHIFT))
        if self._size > old_size:
            grow = self._size - old_size
            self._hashes += [_UNUSED] * grow
            self._keys += [None] * grow
        placed = [False] * max(self._size, old_size)
        hashes, keys = self._hashes, self._keys
        for i in range(old_size):
            h = hashes[i]
            if h <= _TOMBSTONE:
                hashes[i] = _UNUSED
                continue
            if placed[i]:
                continue
            hashes[i] = _UNUSED
            key, keys[i] = keys[i], None
            while True:
                index = self._home(h)
                step = 0
                while placed[index]:
                    step += 1
                    index = (index + step) & self._mask
                placed[index] = True
                displaced = hashes[index]
                hashes[index] = h
                if displaced <= _TOMBSTONE:
                    keys[index] = key
                    break
                h = displaced
                key, keys[index] = keys[index], key
        del hashes[self._size:], keys[self._size:]
        self._noccupied = self._nnodes
