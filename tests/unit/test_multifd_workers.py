"""Multifd channel workers in processes (vmigrate/migration/multifd_worker.py) over socket pairs.

The same packets as tests/unit/test_multifd_threads.py, through forked
workers sharing file-backed RAM: the destination's RAM must end equal to the
source's, every page reported, both sides released by SYNC; a killed worker
must fail the migration with a description, and no worker may outlive its
sender or receiver.
"""

from __future__ import annotations

import os
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from vmigrate.machine.memory import PAGE_SIZE, RAMBlock
from vmigrate.migration.channel import SocketChannel
from vmigrate.migration.multifd import MultifdError, MultifdReceiver, MultifdSender, recv_exact
from vmigrate.migration.multifd_worker import WorkerReceiver, WorkerSender, multifd_receiver, multifd_sender, use_workers
from vmigrate.migration.stats import RamStats
from vmigrate.migration.wire import multifd as wire
from vmigrate.migration.worker_process import ENV

from test_multifd_threads import NPAGES, page_sets, send_and_check


@pytest.fixture
def blocks(tmp_path):
    src = RAMBlock("ram", NPAGES * PAGE_SIZE, mem_path=str(tmp_path / "src.ram"))
    dst = RAMBlock("ram", NPAGES * PAGE_SIZE, mem_path=str(tmp_path / "dst.ram"))
    src.pages[:] = np.random.default_rng(7).integers(0, 256, src.pages.shape, dtype=np.uint8)
    yield src, dst
    for b in (src, dst):
        b.close()


def pairs(count: int) -> tuple[list[SocketChannel], list[SocketChannel]]:
    made = [socket.socketpair() for _ in range(count)]
    return [SocketChannel(a) for a, _ in made], [SocketChannel(b) for _, b in made]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_selection(blocks, monkeypatch, tmp_path):
    src, _ = blocks
    anonymous = RAMBlock("ram", NPAGES * PAGE_SIZE)
    try:
        channels, peers = pairs(4)
        monkeypatch.delenv(ENV, raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: 16)
        assert use_workers(channels, [src])
        assert not use_workers(channels[:1], [src])
        assert not use_workers(channels, [anonymous])
        assert not use_workers(channels, [src], zero_copy=True)
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        assert not use_workers(channels, [src])
        monkeypatch.setenv(ENV, "1")
        assert use_workers(channels[:1], [src])
        monkeypatch.setenv(ENV, "0")
        assert not use_workers(channels, [src])
        for ch in channels + peers:
            ch.close()
    finally:
        anonymous.close()


@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("channels", [1, 3])
def test_pages_arrive_equal_through_workers(blocks, monkeypatch, method, channels):
    monkeypatch.setenv(ENV, "1")
    src, dst = blocks
    ours, theirs = pairs(channels)
    written: list[np.ndarray] = []
    receiver = multifd_receiver(theirs, method, [dst], lambda name, pages: written.append(pages))
    stats = RamStats()
    sender = multifd_sender(ours, method, 1, False, stats, lambda n: None, [src])
    assert isinstance(receiver, WorkerReceiver) and isinstance(sender, WorkerSender)
    pids = [w.pid for w in sender.workers + receiver.workers]
    send_and_check(sender, receiver, src, dst, written, stats, channels, rounds=2)
    assert not any(alive(pid) for pid in pids)


def read_packets(channel: SocketChannel, block: RAMBlock) -> list[wire.PacketHeader]:
    """The uncompressed packets on *channel* up to its EOF, headers only (payloads checked and skipped)."""
    headers = []
    while True:
        head = bytearray(wire.HEADER_SIZE)
        if not recv_exact(channel, memoryview(head), eof_ok=True):
            return headers
        header = wire.decode_packet_header(bytes(head), {block.idstr: block.size})
        payload = bytearray(header.normal_pages * PAGE_SIZE)
        recv_exact(channel, memoryview(payload))
        assert np.array_equal(np.frombuffer(payload, np.uint8).reshape(-1, PAGE_SIZE),
                              block.pages[header.offsets // PAGE_SIZE])
        headers.append(header)


def test_a_batch_goes_to_one_worker_in_one_message(blocks, monkeypatch):
    """The packets of one queue() go out on one channel, numbered in order; batches take the
    channels round robin, and the SYNC closes each channel's part (the wire stays QEMU's)."""
    monkeypatch.setenv(ENV, "1")
    src, _ = blocks
    ours, theirs = pairs(3)
    sender = multifd_sender(ours, "none", 1, False, RamStats(), lambda n: None, [src])
    assert isinstance(sender, WorkerSender)
    batches = [np.arange(start, start + 3 * wire.PAGES_PER_PACKET) for start in range(0, 3072, 384)]
    with ThreadPoolExecutor(len(theirs)) as readers:
        reading = [readers.submit(read_packets, ch, src) for ch in theirs]
        try:
            for pages in batches:
                sender.queue(src, pages)
            sender.sync()
        finally:
            sender.close()
        per_channel = [r.result(timeout=30) for r in reading]
    for channel_id, headers in enumerate(per_channel):
        *data, sync = headers
        assert sync.sync and sync.packet_num == 24 + channel_id
        mine = [p for i, pages in enumerate(batches) if i % 3 == channel_id
                for p in np.split(pages, 3)]
        assert [h.packet_num for h in data] == [n for i in range(len(batches)) if i % 3 == channel_id
                                                for n in range(3 * i, 3 * i + 3)]
        assert all(np.array_equal(h.offsets // PAGE_SIZE, p) for h, p in zip(data, mine, strict=True))
    for ch in theirs:
        ch.close()


@pytest.mark.parametrize("side", ["source", "destination"])
def test_a_killed_worker_fails_the_migration(blocks, monkeypatch, side):
    """A source worker's death is the sender's error; a destination worker's is the receiver's, and the
    sender's workers then fail on their closed channels and say why."""
    monkeypatch.setenv(ENV, "1")
    src, dst = blocks
    ours, theirs = pairs(2)
    receiver = multifd_receiver(theirs, "zstd", [dst], None)
    sender = multifd_sender(ours, "zstd", 1, False, RamStats(), lambda n: None, [src])
    pids = [w.pid for w in sender.workers + receiver.workers]
    try:
        os.kill((sender if side == "source" else receiver).workers[1].pid, signal.SIGKILL)
        if side == "destination":
            with pytest.raises(MultifdError, match="channel worker 1 exited"):
                receiver.sync_main()
            receiver.close()
        with pytest.raises(MultifdError):
            for _ in range(8):
                for pages in page_sets():
                    sender.queue(src, pages)
                sender.sync()
        if side == "source":
            assert sender.error == "multifd: channel worker 1 exited"
        else:
            assert sender.error.startswith("Unable to write to socket: ")
    finally:
        sender.close()
        receiver.close()
    assert not any(alive(pid) for pid in pids)


def test_threads_where_workers_do_not_apply(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    anonymous = RAMBlock("ram", NPAGES * PAGE_SIZE)
    ours, theirs = pairs(3)
    receiver = multifd_receiver(theirs, "none", [anonymous], None)
    sender = multifd_sender(ours, "none", 1, False, RamStats(), lambda n: None, [anonymous])
    try:
        assert type(receiver) is MultifdReceiver and type(sender) is MultifdSender
    finally:
        sender.close()
        receiver.close()
        anonymous.close()


@pytest.mark.parametrize("method", ["none", "zstd"])
def test_staged_pages_wait_for_apply(blocks, monkeypatch, method):
    """A COLO secondary's first load through workers, then a checkpoint whose pages the workers
    hand to the VM process, written only when applied (the codec streams go on across both)."""
    monkeypatch.setenv(ENV, "1")
    src, dst = blocks
    ours, theirs = pairs(2)
    written: list[np.ndarray] = []
    receiver = multifd_receiver(theirs, method, [dst], lambda name, pages: written.append(pages))
    sender = multifd_sender(ours, method, 1, False, RamStats(), lambda n: None, [src])
    try:
        first, second = np.arange(0, 256), np.arange(1000, 1300)
        sender.queue(src, first)
        sender.sync()
        receiver.sync_main()
        receiver.stage()
        sender.queue(src, second)
        sender.sync()
        receiver.sync_main()
        assert not dst.pages[second].any()
        assert np.array_equal(np.sort(np.concatenate(written)), first)
        receiver.apply_staged()
    finally:
        sender.close()
        receiver.close()
    assert receiver.error is None and sender.error is None
    both = np.concatenate([first, second])
    assert np.array_equal(dst.pages[both], src.pages[both])
    assert np.array_equal(np.sort(np.concatenate(written)), both)
