"""COLO messages (docs/qemu/colo.md §2): a raw be32 COLOMessage value, no framing.

The primary writes them on the main channel, the secondary on its reverse
direction; ``vmstate-size`` is followed by a be64 byte count.  Sans-IO: the
caller reads the bytes.
"""

from __future__ import annotations

import enum
import struct

from vmigrate.migration.wire.errors import WireError


class ColoMessage(enum.IntEnum):
    """QAPI's COLOMessage (qapi/migration.json)."""

    CHECKPOINT_READY = 0
    CHECKPOINT_REQUEST = 1
    CHECKPOINT_REPLY = 2
    VMSTATE_SEND = 3
    VMSTATE_SIZE = 4
    VMSTATE_RECEIVED = 5
    VMSTATE_LOADED = 6

    @property
    def qapi_name(self) -> str:
        return self.name.lower().replace("_", "-")


def message(msg: ColoMessage) -> bytes:
    return struct.pack(">I", msg)


def vmstate_size(size: int) -> bytes:
    return message(ColoMessage.VMSTATE_SIZE) + struct.pack(">Q", size)


def decode_message(data: bytes, expected: ColoMessage) -> None:
    """Check 4 bytes against *expected* with QEMU's texts (colo_receive_check_message)."""
    (value,) = struct.unpack(">I", data)
    if value >= len(ColoMessage):
        raise WireError(f"COLO: Invalid message {value}")
    if value != expected:
        raise WireError(f"Unexpected COLO message {value}, expected {int(expected)}")


def decode_size(data: bytes) -> int:
    return struct.unpack(">Q", data)[0]
