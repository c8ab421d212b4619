"""Multifd channel workers in processes of their own (docs/benchmarks.md, "Multifd scaling").

Every packet costs the migration process about 100 µs holding the
interpreter lock on each side with one thread per channel: at QEMU's
16-core rate the lock would be held over 90 % of the time.  Here each
channel's loop runs in a forked worker process (migration/worker_process.py)
with a lock of its own, guest RAM shared through the RAM file's mapping and
its channel's socket inherited.

Source: the migration process keeps the dirty bitmap, the zero test, the
batching and the packet numbering (:class:`MultifdSender`); it sends each
worker jobs ``(block, page list, packet number)`` or a SYNC on a unix
socket, the packets of one of its batches to one worker in one message,
round robin, at most :data:`AHEAD` packets ahead; the worker writes header
and payload with :func:`multifd.send_packet`, the thread path's own
function, and answers one byte per packet or SYNC written.

Destination: a worker reads packets with :func:`multifd.receive_payload`
straight into the RAM file and reports the pages written per block in
batches, and each SYNC, to a relay thread of :class:`MultifdReceiver` that
holds the worker until :meth:`MultifdReceiver.sync_main` releases it.

The stream is the thread path's, byte for byte.  :func:`use_workers` is
where multifd chooses between threads and workers.  A worker is killed and
reaped when the migration ends or fails.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np

from vmigrate.machine.memory import PAGE_SIZE, RAMBlock, page_runs
from vmigrate.migration.channel import Channel, ChannelError, SocketChannel
from vmigrate.migration.compress import write_pages
from vmigrate.migration.multifd import (MultifdError, MultifdReceiver, MultifdSender, Splicer, WAIT_SLICE,
                                        receive_payload, recv_exact, send_packet, sync_header)
from vmigrate.migration.stats import RamStats
from vmigrate.migration.wire import multifd as wire
from vmigrate.migration.wire.errors import WireError
from vmigrate.migration.worker_process import Worker, many_cores, start, wanted

log = logging.getLogger(__name__)

#: Packets a source worker may have queued and unwritten: two of the migration thread's batches
#: (ram.BATCH_PAGES, 8 packets), enough to keep it busy while the migration thread zero-tests the
#: next batches for the other workers, few enough that ``max-bandwidth`` accounting stays close.
AHEAD = 16
#: A source job: block index (-1: SYNC), page count, packet number; the pages follow as int64.
_JOB = struct.Struct("<iIQ")
#: A destination report: kind, count (pages, or bytes of an error text), block index.
_REPORT = struct.Struct("<cIi")
#: Pages a destination worker gathers before it reports them (32 full packets).
_REPORT_PAGES = 32 * wire.PAGES_PER_PACKET


def use_workers(channels: list[Channel], blocks: list[RAMBlock], zero_copy: bool = False) -> bool:
    """Whether multifd runs its channels in worker processes rather than threads.

    Workers need what they can take over by ``fork``: plain sockets (not
    TLS sessions, whose state lives in the VM process) and no zero copy
    (its completions are counted in the VM process); a COLO secondary's
    held pages travel back to it (:meth:`WorkerReceiver.stage`).  By
    default from two channels on, on many-cored hosts only: a worker costs
    as much CPU per packet as a thread or a little more, which two cores pay
    in time (docs/benchmarks.md, "Multifd scaling").
    """
    if zero_copy or not channels or not all(type(ch) is SocketChannel for ch in channels):
        return False
    return wanted(blocks, len(channels) >= 2 and many_cores())


def multifd_sender(channels: list[Channel], method: str, level: int, zero_copy: bool, stats: RamStats,
                   account: Callable[[int], None], blocks: list[RAMBlock]) -> MultifdSender:
    """The source side of multifd on *channels*: workers where :func:`use_workers` says so, else threads."""
    if use_workers(channels, blocks, zero_copy=zero_copy):
        log.info("multifd: %d channel workers (processes) sending", len(channels))
        return WorkerSender(channels, method, level, stats, account, blocks)
    return MultifdSender(channels, method, level, zero_copy, stats, account)


def multifd_receiver(channels: list[Channel], method: str, blocks: list[RAMBlock],
                     on_pages: Callable[[str, np.ndarray], None] | None,
                     on_error: Callable[[str], None] = lambda desc: None) -> MultifdReceiver:
    """The destination side of multifd on *channels*: workers where :func:`use_workers` says so, else threads."""
    if use_workers(channels, blocks):
        log.info("multifd: %d channel workers (processes) receiving", len(channels))
        return WorkerReceiver(channels, method, blocks, on_pages, on_error)
    return MultifdReceiver(channels, method, blocks, on_pages, on_error)


@dataclass
class _Worker(Worker):
    """A channel worker; on the source, jobs sent and not yet answered, SYNCs answered and not yet collected."""

    outstanding: int = 0
    synced: int = 0


def _report_error(ctrl: SocketChannel, err: Exception) -> None:
    text = str(err).encode()
    try:
        ctrl.write(_REPORT.pack(b"E", len(text), 0) + text)
    except ChannelError:
        pass


# -- source -----------------------------------------------------------------------------


def _send_loop(ctrl: SocketChannel, channel: SocketChannel, method: str, level: int,
               blocks: list[RAMBlock]) -> None:
    """A source worker: write each job's packet, answer ``D`` (a packet) or ``S`` (a SYNC)."""
    encoder = wire.PayloadEncoder(method, level)
    files = [os.open(b.mem_path, os.O_RDONLY) for b in blocks] if method == "none" else []
    head = bytearray(_JOB.size)
    pages = np.empty(wire.PAGES_PER_PACKET, np.int64)
    try:
        while recv_exact(ctrl, memoryview(head), eof_ok=True):
            index, count, packet_num = _JOB.unpack(head)
            if index < 0:
                channel.write(sync_header(packet_num))
                ctrl.write(b"S")
                continue
            recv_exact(ctrl, memoryview(pages[:count]).cast("B"))
            if files:
                _send_from_file(channel, files[index], blocks[index].idstr, pages[:count], packet_num)
            else:
                send_packet(channel, encoder, None, blocks[index], pages[:count], packet_num)
            ctrl.write(b"D")
    except (ChannelError, OSError, ValueError) as err:
        _report_error(ctrl, err)


def _send_from_file(channel: SocketChannel, fd: int, idstr: str, pages: np.ndarray, packet_num: int) -> None:
    """An uncompressed packet with ``sendfile`` from the RAM file: the same bytes as
    :func:`multifd.send_packet`, but the worker never maps the pages it sends.

    A forked worker shares the RAM mapping but not its page tables: touching
    guest RAM there costs a minor fault per few pages, about 45 µs per
    packet measured here (docs/benchmarks.md, "Multifd scaling"), which
    ``sendfile`` leaves out.  The header goes with ``MSG_MORE`` so that it
    leaves in one segment with the pages.
    """
    head = wire.packet_header(0, len(pages), len(pages) * PAGE_SIZE, packet_num, idstr,
                              pages.astype(np.uint64) << np.uint64(12))
    sock = channel.sock
    try:
        sock.sendall(head, socket.MSG_MORE)
        for first, count in page_runs(pages):
            offset, end = first * PAGE_SIZE, (first + count) * PAGE_SIZE
            while offset < end:
                sent = os.sendfile(sock.fileno(), fd, offset, end - offset)
                if not sent:
                    raise ChannelError("multifd: the RAM file is shorter than its block")
                offset += sent
    except OSError as err:
        raise ChannelError(f"Unable to write to socket: {os.strerror(err.errno or 32)}") from None


class WorkerSender(MultifdSender):
    """:class:`MultifdSender` whose channels are worker processes; batching and numbering stay here."""

    def __init__(self, channels: list[Channel], method: str, level: int, stats: RamStats,
                 account: Callable[[int], None], blocks: list[RAMBlock]) -> None:
        self._blocks = blocks
        self._index = {b.idstr: i for i, b in enumerate(blocks)}
        super().__init__(channels, method, level, False, stats, account)

    def _start(self, channels: list[Channel], method: str, level: int, zero_copy: bool) -> None:
        self.channels = channels
        self._next = 0
        self.workers: list[_Worker] = []
        for i, ch in enumerate(channels):
            assert isinstance(ch, SocketChannel)
            self.workers.append(start(i, [ch.fileno()], lambda ctrl, ch=ch: _send_loop(ctrl, ch, method, level, self._blocks),
                                      _Worker))
        for w in self.workers:
            w.ctrl.settimeout(WAIT_SLICE)
        #: Jobs of the packets made since the last :meth:`_dispatch`, all for the next worker.
        self._jobs: list[bytes] = []

    def queue(self, block: RAMBlock, pages: np.ndarray) -> None:
        """The packets of one batch go to one worker in one message: one control send and one
        wake-up per batch instead of per packet, the VM process's main cost per packet here."""
        super().queue(block, pages)
        self._dispatch()

    def _hand_over(self, block: RAMBlock, pages: np.ndarray, packet_num: int) -> None:
        job = np.ascontiguousarray(pages, np.int64)
        self._jobs.append(_JOB.pack(self._index[block.idstr], len(job), packet_num) + job.tobytes())

    def _dispatch(self) -> None:
        """The jobs made so far to the next worker, round robin (invisible on the wire, as QEMU's
        choice of an idle channel), at most AHEAD packets ahead."""
        if not self._jobs:
            return
        w = self.workers[self._next]
        self._next = (self._next + 1) % len(self.workers)
        while w.outstanding and w.outstanding + len(self._jobs) > AHEAD:
            self._collect(w)
        self._send(w, b"".join(self._jobs))
        w.outstanding += len(self._jobs)
        self._jobs = []

    def _sync_channels(self, packet_nums: list[int]) -> None:
        self._dispatch()
        for w, num in zip(self.workers, packet_nums):
            self._send(w, _JOB.pack(-1, 0, num))
        for w in self.workers:
            while not w.synced:
                self._collect(w)
            w.synced -= 1

    def _send(self, w: _Worker, data: bytes) -> None:
        try:
            w.ctrl.sendall(data)
        except OSError:
            # The worker is gone: its error text (or its EOF) says why, else this does.
            self._collect(w)
            self.fail(f"multifd: channel worker {w.id} exited")
            self._check()

    def _collect(self, w: _Worker) -> None:
        """Take the worker's answers (waits up to a slice); a failed or vanished worker fails the migration."""
        try:
            data = w.ctrl.recv(4096)
        except socket.timeout:
            self._check()
            return
        except OSError:
            # A reset: the worker died with our jobs unread.
            data = b""
        error = data.find(b"E")
        if error >= 0:
            self.fail(self._error_text(w, data[error:]))
        elif not data:
            self.fail(f"multifd: channel worker {w.id} exited")
        self._check()
        w.outstanding -= data.count(b"D")
        w.synced += data.count(b"S")

    def _error_text(self, w: _Worker, data: bytes) -> str:
        """The worker's error report, which starts in *data* and may continue on the socket."""
        buf = bytearray(data)
        try:
            while len(buf) < _REPORT.size or len(buf) < _REPORT.size + _REPORT.unpack_from(buf)[1]:
                more = w.ctrl.recv(4096)
                if not more:
                    break
                buf += more
        except OSError:
            pass
        if len(buf) < _REPORT.size:
            return f"multifd: channel worker {w.id} exited"
        return buf[_REPORT.size:_REPORT.size + _REPORT.unpack_from(buf)[1]].decode(errors="replace")

    def fail(self, desc: str) -> None:
        with self.lock:
            if self.error is None:
                self.error = desc
        self.stop.set()
        for ch in self.channels:
            ch.shutdown()

    def _wake_all(self) -> None:
        self.stop.set()

    def close(self) -> None:
        self.stop.set()
        for w in self.workers:
            w.stop()
            w.ctrl.close()
        for ch in self.channels:
            ch.shutdown()
            ch.close()


# -- destination ------------------------------------------------------------------------


class _Reports:
    """A destination worker's pages written, gathered per block and sent in batches."""

    def __init__(self, ctrl: SocketChannel) -> None:
        self.ctrl = ctrl
        self.index = -1
        self.pages: list[np.ndarray] = []
        self.count = 0

    def add(self, index: int, pages: np.ndarray) -> None:
        if index != self.index:
            self.flush()
            self.index = index
        self.pages.append(pages)
        self.count += len(pages)
        if self.count >= _REPORT_PAGES:
            self.flush()

    def flush(self) -> None:
        if self.count:
            pages = np.concatenate(self.pages).astype(np.int64)
            self.ctrl.write(_REPORT.pack(b"P", len(pages), self.index) + pages.tobytes())
        self.pages, self.count = [], 0


def _recv_loop(ctrl: SocketChannel, channel: Channel, method: str, channel_id: int,
               blocks: list[RAMBlock]) -> None:
    """A destination worker: packets into the shared RAM, reports ``P``, ``S`` (then waits), ``X`` at EOF.

    Once told to hold (``H``, :meth:`WorkerReceiver.stage`), it writes no page
    but sends each packet's pages and data to the VM process instead (``H``).
    """
    for b in blocks:
        b.forked()
    decoder = wire.PayloadDecoder(method, channel_id)
    index = {b.idstr: i for i, b in enumerate(blocks)}
    used = {b.idstr: b.size for b in blocks}
    head = bytearray(wire.HEADER_SIZE)
    scratch = bytearray(wire.MAX_COMPRESSED_PAYLOAD)
    reports = _Reports(ctrl)
    splicer = Splicer(channel.fileno())
    held = False
    try:
        while recv_exact(channel, memoryview(head), eof_ok=True):
            header = wire.decode_packet_header(bytes(head), used)
            held = held or _told_to_hold(ctrl)
            if header.normal_pages:
                pages = header.offsets >> 12
                i = index[header.ramblock]
                data = receive_payload(channel, decoder, blocks[i], header, pages, scratch, splicer, not held)
                if held:
                    ctrl.writev([_REPORT.pack(b"H", len(pages), i), pages.astype(np.int64), data])
                else:
                    if data is not None:
                        write_pages(blocks[i], pages, np.frombuffer(data, np.uint8).reshape(-1, PAGE_SIZE))
                    reports.add(i, pages)
            if header.sync:
                reports.flush()
                ctrl.write(_REPORT.pack(b"S", 0, 0))
                released = _released(ctrl, held)
                if released is None:
                    return
                held = released
        reports.flush()
        ctrl.write(_REPORT.pack(b"X", 0, 0))
    except (WireError, ChannelError, OSError) as err:
        _report_error(ctrl, err)
    finally:
        splicer.close()


def _told_to_hold(ctrl: SocketChannel) -> bool:
    """Whether the VM process asked to hold pages since the last look (between SYNCs only ``H`` can come)."""
    try:
        got = ctrl.sock.recv(16, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    if not got:
        raise MultifdError("multifd: the VM process is gone")
    return b"H" in got


def _released(ctrl: SocketChannel, held: bool) -> bool | None:
    """Wait for the release (``R``) after a SYNC; whether pages are held from now on, None at EOF."""
    byte = bytearray(1)
    while recv_exact(ctrl, memoryview(byte), eof_ok=True):
        if byte == b"R":
            return held
        held = True
    return None


class WorkerReceiver(MultifdReceiver):
    """:class:`MultifdReceiver` whose channel threads relay for worker processes."""

    def __init__(self, channels: list[Channel], method: str, blocks: list[RAMBlock],
                 on_pages: Callable[[str, np.ndarray], None] | None = None,
                 on_error: Callable[[str], None] = lambda desc: None) -> None:
        self._names = [b.idstr for b in blocks]
        self.workers: list[_Worker] = []
        for i, ch in enumerate(channels):
            assert isinstance(ch, SocketChannel)
            self.workers.append(start(i, [ch.fileno()], lambda ctrl, i=i, ch=ch: _recv_loop(ctrl, ch, method, i, blocks),
                                      _Worker))
        super().__init__(channels, method, blocks, on_pages, on_error)

    def _loop(self, channel_id: int, channel: Channel, decoder: wire.PayloadDecoder) -> None:
        """Relay one worker's reports: pages to ``on_pages`` (or held), SYNCs to :meth:`sync_main`'s hand-shake."""
        try:
            self._relay(channel_id, SocketChannel(self.workers[channel_id].ctrl))
        except ChannelError:
            if not self._stop:
                raise

    def _relay(self, channel_id: int, ctrl: SocketChannel) -> None:
        """Until the worker's end (``X``) or error; its vanishing is an error unless :meth:`close` killed it."""
        head = bytearray(_REPORT.size)
        while not self._stop:
            if not recv_exact(ctrl, memoryview(head), eof_ok=True):
                raise MultifdError(f"multifd: channel worker {channel_id} exited")
            kind, count, index = _REPORT.unpack(head)
            if kind == b"P":
                pages = np.empty(count, np.int64)
                recv_exact(ctrl, memoryview(pages).cast("B"))
                if self.on_pages is not None:
                    self.on_pages(self._names[index], pages)
            elif kind == b"H":
                pages = np.empty(count, np.int64)
                data = bytearray(count * PAGE_SIZE)
                recv_exact(ctrl, memoryview(pages).cast("B"))
                recv_exact(ctrl, memoryview(data))
                with self._cond:
                    self._staged.append((self._names[index], pages, bytes(data)))
            elif kind == b"S":
                self._wait_release()
                ctrl.write(b"R")
            elif kind == b"E":
                text = bytearray(count)
                recv_exact(ctrl, memoryview(text))
                raise MultifdError(text.decode(errors="replace"))
            else:
                return

    def stage(self) -> None:
        """A COLO secondary's checkpoints: the workers send their pages here, where they wait.

        Each worker looks for the ``H`` before every packet; the secondary stages
        before it says CHECKPOINT_READY (ColoSecondary.run; docs/benchmarks.md,
        "Multifd scaling"), so no checkpoint packet is on its way yet.
        """
        super().stage()
        for w in self.workers:
            w.ctrl.sendall(b"H")

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for w in self.workers:
            w.stop()
        super().close()
        for w in self.workers:
            w.ctrl.close()
