"""What the fuzz tests feed, and what each decoder may raise: one entry per sans-IO decoder.

A target takes one input and drives its decoder the way vmigrate does (a
destination's load, a multifd channel, the source's return-path reader, a
QMP monitor), consuming every event.  Anything but the decoder's own error
type escaping is a bug, as is an allocation or a run time beyond the bounds
the tests set.  The corpus is the streams captured from QEMU 7.2 and from
vmigrate in tests/unit/vectors.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from vmigrate.machine.devices import none_machine_bodies
from vmigrate.migration.wire import WireError
from vmigrate.migration.wire import block as wire_block
from vmigrate.migration.wire import dirty_bitmap as wire_dirty_bitmap
from vmigrate.migration.wire import multifd as wire_multifd
from vmigrate.migration.wire import ram as wire_ram
from vmigrate.migration.wire import return_path, stream, xbzrle
from vmigrate.migration.wire.buffer import Reader, Short
from vmigrate.qmp.jsonstream import JSONMessageStream

VECTORS = Path(__file__).resolve().parent.parent / "unit" / "vectors"
PAGE = 4096


def _drain(decoder) -> None:
    while decoder.next_event() is not stream.NEED_DATA:
        pass


def load_stream(data: bytes, split: int) -> None:
    """A destination's load: RAM blocks adopted from MEM_SIZE (as `vmigrate analyze` does), -M none devices."""
    decoder = stream.StreamDecoder({"ram": wire_ram.RamBodyDecoder(None, accept_compressed=True, variable_runs=True),
                                    **none_machine_bodies()})
    for piece in (data[:split], data[split:]):
        decoder.feed(piece)
        _drain(decoder)
    decoder.close()
    _drain(decoder)


def multifd_channel(data: bytes, split: int) -> None:
    """One receiving channel: the initial packet, then packets and their payloads (zlib and zstd).

    The receiver reads fixed sizes with recv_exact, which fails on a short read before
    any decoder sees the bytes: so does this target.
    """
    del split
    if len(data) < wire_multifd.INITIAL_PACKET_SIZE:
        return
    wire_multifd.decode_initial_packet(data[:wire_multifd.INITIAL_PACKET_SIZE], data[8:24], 256)
    pos = wire_multifd.INITIAL_PACKET_SIZE
    decoders = {m: wire_multifd.PayloadDecoder(m, 0) for m in ("zlib", "zstd")}
    blocks = {"ram": 1 << 30, "ram0": 1 << 30}
    while pos + wire_multifd.HEADER_SIZE <= len(data):
        header = wire_multifd.decode_packet_header(data[pos:pos + wire_multifd.HEADER_SIZE], blocks)
        pos += wire_multifd.HEADER_SIZE
        if header.normal_pages:
            method = "zstd" if header.flags & wire_multifd.FLAG_ZSTD else "zlib"
            decoder = decoders[method]
            decoder.check_flags(header)
            size = decoder.payload_size(header)
            if pos + size > len(data):
                return
            decoder.decode(header, data[pos:pos + size])
            pos += size


def return_path_messages(data: bytes, split: int) -> None:
    decoder = return_path.ReturnPathDecoder(blocks={"ram": 64 << 20})
    for piece in (data[:split], data[split:]):
        decoder.feed(piece)
        _drain(decoder)


def xbzrle_page(data: bytes, split: int) -> None:
    del split
    page = np.zeros(PAGE, np.uint8)
    xbzrle.decode_page(data[:PAGE], page)


def _section_body(decoder, data: bytes, split: int) -> None:
    """A section body from bytes arriving in two pieces, as the stream decoder hands it over:
    records are decoded until the body ends or more bytes are needed."""
    buf = b""
    for piece in (data[:split], data[split:]):
        buf += piece
        r = Reader(buf, 0, len(buf))
        while True:
            start = r.pos
            try:
                _, done = decoder.decode(r)
            except Short:
                buf = buf[start:]
                break
            if done:
                return


def block_body(data: bytes, split: int) -> None:
    """A ``block`` section body (docs/qemu/block.md §1)."""
    _section_body(wire_block.BlockBodyDecoder(), data, split)


def dirty_bitmap_body(data: bytes, split: int) -> None:
    """A ``dirty-bitmap`` section body (docs/qemu/block.md §2)."""
    _section_body(wire_dirty_bitmap.DirtyBitmapBodyDecoder(), data, split)


def qmp_input(data: bytes, split: int) -> None:
    """A monitor's input: malformed JSON becomes an error value, never an exception."""
    stream_ = JSONMessageStream()
    stream_.feed(data[:split])
    stream_.feed(data[split:])


@dataclass(frozen=True)
class Target:
    run: Callable[[bytes, int], None]
    #: The only exception type the target may raise.
    error: type[BaseException] | tuple[type[BaseException], ...]
    corpus: tuple[str, ...]


def mutate(rng: random.Random, seeds: list[bytes]) -> tuple[bytes, int]:
    """One input: random bytes, or a corpus entry mutated (bits flipped, cut, bytes inserted,
    deleted, another entry spliced in); and where to split it between two feeds."""
    if not seeds or rng.randrange(10) == 0:
        data = bytearray(rng.randbytes(rng.randrange(4097)))
    else:
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            at = rng.randint(0, len(data))
            op = rng.choice(("flip", "cut", "insert", "delete", "splice"))
            if op == "flip" and at < len(data):
                data[at] ^= 1 << rng.randrange(8)
            elif op == "cut":
                del data[at:]
            elif op == "insert":
                data[at:at] = rng.randbytes(rng.randint(1, 64))
            elif op == "delete":
                del data[at:at + rng.randint(1, 256)]
            elif op == "splice":
                other = rng.choice(seeds)
                start = rng.randint(0, len(other))
                data[at:at] = other[start:start + rng.randint(1, 4096)]
    return bytes(data), rng.randint(0, len(data))


def _files(pattern: str) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in VECTORS.glob(pattern)))


QMP_SEEDS = (b'{"execute": "qmp_capabilities"}\n', b'{"execute": "query-migrate", "id": [1, {"a": null}]}',
             b"{'execute': 'migrate', 'arguments': {'uri': 'exec:cat'}}", b'[1, 2.5e3, "\\u00e9", true, false]')
RP_SEEDS = (return_path.shut(1) + return_path.pong(7) + return_path.req_pages_id("ram", 0, PAGE)
            + return_path.req_pages(PAGE, PAGE) + return_path.resume_ack(),)

TARGETS: dict[str, Target] = {
    "stream": Target(load_stream, WireError, _files("[!dm]*.bin") + _files("mixed*.bin")),
    "block": Target(block_body, WireError, ()),
    "dirty-bitmap": Target(dirty_bitmap_body, WireError, _files("dirty-bitmap-*.bin")),
    "multifd": Target(multifd_channel, WireError, _files("multifd72-*.bin")),
    "return-path": Target(return_path_messages, WireError, ()),
    "xbzrle": Target(xbzrle_page, WireError, ()),
    "qmp": Target(qmp_input, (), ()),
}

#: Inline seeds of the targets without captured files.
SEEDS: dict[str, tuple[bytes, ...]] = {
    "return-path": RP_SEEDS,
    "block": (wire_block.progress(3) + wire_block.device_block("drive0", 2048, bytes(1 << 20)) + bytes(1 << 20)
              + wire_block.device_block("drive0", 4096, None) + wire_block.eos(),),
    "xbzrle": (bytes([0x10]) + b"\x01" * 16 + bytes([0x08]),),
    "qmp": QMP_SEEDS,
}


@functools.cache
def corpus(name: str) -> list[bytes]:
    target = TARGETS[name]
    return [(VECTORS / f).read_bytes() for f in target.corpus] + list(SEEDS.get(name, ()))
