"""The single exception type of the wire codecs."""

from __future__ import annotations


class WireError(ValueError):
    """Malformed or unacceptable migration bytes.

    Every decoder reports hostile or corrupt input with this type only, and
    with a text close to what QEMU 7.2 prints for the same stream, so that a
    destination can fail the migration with a recognisable reason and an
    operator can compare it with a real QEMU's log.
    """
