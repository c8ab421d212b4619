"""Postcopy's pure pieces and the switch-over bytes (docs/qemu/postcopy.md §3, §5).

The switch-over is written by :class:`SaveVM` for a ``-M none`` registry over a real socket
pair and compared with the sequence a QEMU 7.2 source was seen to send: discards, PING 2,
PACKAGED (LISTEN, the device sections, PING 3, RUN), PING 4.
"""

from __future__ import annotations

import dataclasses
import socket
import threading

import numpy as np

from vmigrate.machine.devices import GlobalState, VirtualClock
from vmigrate.machine.memory import PAGE_SIZE, RAMBlock, page_runs
from vmigrate.machine.softcpu import SoftVcpus
from vmigrate.migration.channel import SocketChannel
from vmigrate.migration.options import MigrationOptions
from vmigrate.migration.postcopy import PageRequests, discard_ranges
from vmigrate.migration.qemu_file import QEMUFileOut
from vmigrate.migration.ram import RamSection
from vmigrate.migration.rate_limit import RateLimiter
from vmigrate.migration.savevm import SaveContext, SaveVM, SectionRegistry
from vmigrate.migration.stats import CompressionStats, RamStats, XbzrleStats
from vmigrate.migration.wire import stream

MIB = 1 << 20


def test_discard_ranges_are_the_runs_of_dirty_pages_in_bytes():
    bitmap = np.zeros(16, dtype=np.bool_)
    bitmap[[0, 1, 2, 7, 10, 11, 15]] = True
    assert discard_ranges(bitmap) == [(0, 3 * PAGE_SIZE), (7 * PAGE_SIZE, PAGE_SIZE),
                                      (10 * PAGE_SIZE, 2 * PAGE_SIZE), (15 * PAGE_SIZE, PAGE_SIZE)]
    assert discard_ranges(np.zeros(8, dtype=np.bool_)) == []
    assert discard_ranges(np.ones(8, dtype=np.bool_)) == [(0, 8 * PAGE_SIZE)]


def test_page_runs():
    assert page_runs(np.array([3, 4, 5, 9, 11, 12])) == [(3, 3), (9, 1), (11, 2)]
    assert page_runs(np.array([], dtype=np.int64)) == []


def test_page_requests_queue_in_order_count_and_wake():
    stats = RamStats()
    requests = PageRequests(stats)
    assert requests.take() is None and not requests.urgent.is_set()
    requests.put("ram", 0x3000000, 0x1000)
    requests.put("ram", 0x3001000, 0x2000)
    assert requests.urgent.is_set() and requests.pending() and stats.postcopy_requests == 2
    first, second = requests.take(), requests.take()
    assert (first.block, first.first, first.count) == ("ram", 0x3000, 1)
    assert (second.first, second.count) == (0x3001, 2)
    assert requests.take() is None and not requests.urgent.is_set()
    requests.put("ram", 0, 0x1000)
    requests.clear()
    assert not requests.pending() and stats.postcopy_requests == 3


def test_switch_over_bytes_match_qemu():
    ram = RAMBlock("ram", 1 * MIB)
    registry = SectionRegistry()
    registry.register_device(VirtualClock())
    registry.register_live(RamSection([ram], SoftVcpus(1, None)))
    registry.register_device(GlobalState())
    base = MigrationOptions().snapshot()
    config = dataclasses.replace(base, caps=dataclasses.replace(base.caps, postcopy_ram=True))
    a, b = socket.socketpair()
    received = bytearray()

    def read() -> None:
        while data := b.recv(1 << 16):
            received.extend(data)

    reader = threading.Thread(target=read)
    reader.start()
    f = QEMUFileOut(SocketChannel(a), RateLimiter())
    ctx = SaveContext(config, f, RateLimiter(), RamStats(), XbzrleStats(), CompressionStats(), None,
                      lambda: "postcopy", lambda count: None, lambda dirty, sent: None, PageRequests(RamStats()))
    saver = SaveVM(registry, ctx, "none", None)
    try:
        saver.setup()
        saver.postcopy_switch()
    finally:
        saver.cleanup()
        a.close()
        reader.join(timeout=10)
        b.close()
        ram.close()
    data = bytes(received)

    assert stream.postcopy_advise(0x1000, 0x1000) in data
    discard = stream.postcopy_ram_discard("ram", [(0, 1 * MIB)])
    ping2 = stream.ping(2)
    assert data.index(discard) + len(discard) == data.index(ping2), "never-sent pages are discarded, then PING 2"
    package_at = data.index(ping2) + len(ping2)
    assert data[package_at:package_at + 5] == bytes.fromhex("0800070004")
    size = int.from_bytes(data[package_at + 5:package_at + 9], "big")
    assert size == 201, "QEMU 7.2 -M none sends a 201-byte package"
    blob = data[package_at + 9:package_at + 9 + size]
    assert blob.startswith(bytes.fromhex("0800040000") + bytes.fromhex("0400000000") + b"\x05timer"
                           + bytes.fromhex("0000000000000002"))
    assert b"\x0bglobalstate" in blob
    assert blob.endswith(stream.ping(3) + stream.postcopy_run())
    assert data[package_at + 9 + size:] == stream.ping(4)
