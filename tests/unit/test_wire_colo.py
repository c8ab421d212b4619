"""COLO messages (docs/qemu/colo.md §2) and the bytes a checkpoint's EOF leaves in the decoder."""

from __future__ import annotations

import pytest

from vmigrate.migration.wire import WireError, colo, stream
from vmigrate.migration.wire.colo import ColoMessage


def test_messages_are_raw_be32_values():
    assert colo.message(ColoMessage.CHECKPOINT_READY) == b"\0\0\0\0"
    assert colo.message(ColoMessage.VMSTATE_LOADED) == b"\0\0\0\6"
    assert colo.vmstate_size(0x1234) == b"\0\0\0\4" + (0x1234).to_bytes(8, "big")
    assert colo.decode_size((0x1234).to_bytes(8, "big")) == 0x1234
    assert ColoMessage.VMSTATE_SEND.qapi_name == "vmstate-send"


def test_unexpected_and_invalid_messages():
    colo.decode_message(b"\0\0\0\1", ColoMessage.CHECKPOINT_REQUEST)
    with pytest.raises(WireError, match="Unexpected COLO message 2, expected 1"):
        colo.decode_message(b"\0\0\0\2", ColoMessage.CHECKPOINT_REQUEST)
    with pytest.raises(WireError, match="COLO: Invalid message 7"):
        colo.decode_message(b"\0\0\0\7", ColoMessage.CHECKPOINT_REQUEST)


@pytest.mark.parametrize("pieces", [1, 3, 11])
def test_bytes_after_eof_come_back(pieces):
    """What follows a checkpoint's EOF (vmstate-size) is not the decoder's, however it was fed."""
    data = stream.eof() + colo.vmstate_size(5) + b"abcde"
    decoder = stream.StreamDecoder({}, header=False, require_configuration=False)
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        decoder.feed(data[i:i + step])
    assert isinstance(decoder.next_event(), stream.EOF)
    assert decoder.take_rest() == data[1:]
    assert decoder.take_rest() == b""
