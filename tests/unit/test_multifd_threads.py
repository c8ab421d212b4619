"""MultifdSender to MultifdReceiver over socket pairs, in one process: the channel threads' data paths.

Packets of one page run, of a few runs (sent and received run by run, straight
from and into guest RAM) and of more scattered pages than that (gathered and
scattered with one copy), for each codec; the destination's RAM must end equal
to the source's, and the SYNC hand-shake must release both sides.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from vmigrate.machine.memory import PAGE_SIZE, RAMBlock
from vmigrate.migration.channel import SocketChannel
from vmigrate.migration.multifd import MAX_IOVEC_RUNS, MultifdError, MultifdReceiver, MultifdSender, Splicer
from vmigrate.migration.stats import RamStats
from vmigrate.migration.wire import multifd as wire

NPAGES = 4096


@pytest.fixture(params=["anonymous", "file"])
def blocks(request, tmp_path):
    """Source and destination RAM; the destination anonymous (``recv_into`` the mapping) or a
    tmpfs file (``splice`` and ``pwrite`` into the file)."""
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else tmp_path) as tmp:
        path = str(Path(tmp) / "dst") if request.param == "file" else None
        src, dst = RAMBlock("ram", NPAGES * PAGE_SIZE), RAMBlock("ram", NPAGES * PAGE_SIZE, path)
        src.pages[:] = np.random.default_rng(5).integers(0, 256, src.pages.shape, dtype=np.uint8)
        yield src, dst
        for b in (src, dst):
            b.close()


def page_sets() -> list[np.ndarray]:
    """One full contiguous packet, a packet of MAX_IOVEC_RUNS runs, one of every other page, a short tail."""
    few = np.concatenate([np.arange(1000 + 20 * r, 1000 + 20 * r + 8) for r in range(MAX_IOVEC_RUNS)])
    return [np.arange(0, 128), few, np.arange(2000, 2256, 2), np.array([4095])]


@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("channels", [1, 3])
def test_pages_arrive_equal_through_every_path(blocks, method, channels):
    src, dst = blocks
    pairs = [socket.socketpair() for _ in range(channels)]
    written: list[np.ndarray] = []
    receiver = MultifdReceiver([SocketChannel(b) for _, b in pairs], method, [dst],
                               on_pages=lambda name, pages: written.append(pages))
    stats = RamStats()
    sender = MultifdSender([SocketChannel(a) for a, _ in pairs], method, 1, False, stats, lambda n: None)
    send_and_check(sender, receiver, src, dst, written, stats, channels)
    # Into a RAM file every page goes with splice or pwrite: nothing went through the mapping's Prefaulter.
    assert (dst._prefaulter is None) == (dst.file is not None)


def test_a_splicer_moves_a_socket_run_into_the_file_and_fails_cleanly_at_eof(tmp_path):
    a, b = socket.socketpair()
    splicer = Splicer(b.fileno())
    fd = os.open(tmp_path / "ram", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        payload = np.random.default_rng(1).integers(0, 256, 3 * Splicer.PIPE_BYTES, dtype=np.uint8).tobytes()
        sender = threading.Thread(target=a.sendall, args=(payload,))
        sender.start()
        splicer.read(fd, PAGE_SIZE, len(payload))
        sender.join()
        assert os.pread(fd, len(payload) + PAGE_SIZE, 0) == bytes(PAGE_SIZE) + payload
        a.sendall(b"x" * 100)
        a.close()
        with pytest.raises(MultifdError, match="connection closed in the middle of a packet"):
            splicer.read(fd, 0, PAGE_SIZE)
        assert os.pread(fd, 100, 0) == b"x" * 100
    finally:
        splicer.close()
        os.close(fd)
        b.close()


def send_and_check(sender, receiver, src: RAMBlock, dst: RAMBlock, written: list[np.ndarray], stats: RamStats,
                   channels: int, rounds: int = 1) -> None:
    """:func:`page_sets` *rounds* times, a SYNC after each; then RAM equal, every page reported, bytes counted."""
    try:
        sent = page_sets()
        for _ in range(rounds):
            for pages in sent:
                sender.queue(src, pages)
            sender.sync()
            receiver.sync_main()
    finally:
        sender.close()
        receiver.close()
    assert receiver.error is None and sender.error is None
    everything = np.concatenate(sent)
    assert np.array_equal(dst.pages[everything], src.pages[everything])
    untouched = np.setdiff1d(np.arange(NPAGES), everything)
    assert not dst.pages[untouched].any()
    assert np.array_equal(np.sort(np.concatenate(written)), np.sort(np.tile(everything, rounds)))
    packets = -(-len(everything) // wire.PAGES_PER_PACKET)
    assert stats.normal == rounds * len(everything)
    assert stats.multifd_bytes == rounds * (len(everything) * PAGE_SIZE + (packets + channels) * wire.HEADER_SIZE)
