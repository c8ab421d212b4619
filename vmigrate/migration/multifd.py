"""Multifd: page data on N extra connections, one thread per channel (docs/qemu/multifd.md).

Source: the migration thread zero-tests pages itself (zero pages stay on the
main channel) and queues the others here in packets of up to 128 pages of
one block.  A full packet goes to the next idle channel, round robin, as
QEMU's multifd_send_pages does (a queue holds the idle channels, and each
channel thread waits on a job queue of its own); its thread writes
header and payload, the payload straight from guest RAM page run by page
run, through the channel's compression stream if asked (zlib/zstd keep one
stream per channel).  Before every RAM EOS
the migration thread calls :meth:`MultifdSender.sync`: a SYNC packet on
every channel, written after all earlier packets of that channel, and only
then the EOS — the rule that lets the destination know all pages of the
section arrived.

Destination: one :class:`MultifdReceiver` thread per channel reads packets
and puts their pages into guest RAM: uncompressed runs straight into the
RAM, with ``splice`` into a RAM file (:class:`Splicer`) or ``recv_into``
anonymous RAM, no copy on the way; after a SYNC packet it
waits until the main channel's loader reached the matching EOS and called
:meth:`MultifdReceiver.sync_main`.

Zero copy: page payloads leave with ``sendmsg(MSG_ZEROCOPY)`` straight from
guest RAM (only guest RAM, whose pages stay mapped and whose changes the
dirty log re-sends, is ever handed to the kernel this way); completions are
reaped from the socket's error queue before each SYNC, as QEMU flushes
before each sync, and a flush in which the kernel copied every buffer
counts in ``dirty-sync-missed-zero-copy`` (always the case on loopback).

Channel workers: where the channels are plain sockets and guest RAM is a
file, the channels' loops can run in processes of their own instead of
threads (multifd_worker.py, which chooses; docs/benchmarks.md, "Multifd
scaling"); they write and read packets with :func:`send_packet` and
:func:`receive_payload`, and :class:`MultifdSender` / :class:`MultifdReceiver`
keep the batching, numbering and SYNC hand-shake for both.
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import threading
from typing import Callable

import numpy as np

from vmigrate.machine.memory import PAGE_SIZE, RAMBlock, page_runs
from vmigrate.migration.channel import Channel, ChannelError, SocketChannel, ZeroCopySocket
from vmigrate.migration.compress import write_pages
from vmigrate.migration.stats import RamStats
from vmigrate.migration.wire import multifd as wire
from vmigrate.migration.wire.errors import WireError
from vmigrate.trace import trace

#: Page runs of a packet sent (and received) as separate buffers of guest RAM; more scattered
#: pages are gathered (scattered) with one numpy copy, cheaper than a Python step per run.
MAX_IOVEC_RUNS = 16
#: Bound on every wait, so a stuck peer never hangs a thread forever (errors are re-checked).
WAIT_SLICE = 0.5


class MultifdError(ChannelError):
    pass


def open_channels(connect: Callable[[], Channel], count: int, zero_copy: bool, uuid: bytes) -> list[Channel]:
    """Open the ``count`` multifd channels with *connect* (the main channel's address, TLS if set).

    Each channel sends its initial packet as soon as it is open, before the
    next one is opened, as QEMU's do: a QEMU 7.2 destination reads a TLS
    channel's initial packet right after its handshake, in its main loop,
    and handshakes no other channel until it has it.
    """
    channels: list[Channel] = []
    try:
        for channel_id in range(count):
            channel = connect()
            channels.append(channel)
            if zero_copy and not ZeroCopySocket.enable(channel.sock):
                raise MultifdError("Zero copy send feature not detected in host kernel")
            channel.write(wire.initial_packet(uuid, channel_id))
    except ChannelError:
        for channel in channels:
            channel.close()
        raise
    return channels


class _Job:
    __slots__ = ("block", "pages", "packet_num", "sync")

    def __init__(self, block: RAMBlock | None, pages: np.ndarray | None, packet_num: int, sync: bool) -> None:
        self.block = block
        self.pages = pages
        self.packet_num = packet_num
        self.sync = sync


class _SendChannel:
    """One channel thread, woken only by its own job queue (QEMU's ``p->sem``).

    A shared condition woke every channel thread and the migration thread on
    each handed-over packet, each wake-up retaking the interpreter lock
    (docs/benchmarks.md, "Multifd scaling").  The queues are
    ``queue.SimpleQueue``, whose put and get are C calls.
    """

    def __init__(self, owner: "MultifdSender", channel_id: int, channel: Channel, encoder: wire.PayloadEncoder,
                 zero_copy: bool) -> None:
        self.owner = owner
        self.id = channel_id
        self.channel = channel
        self.encoder = encoder
        self.zero_copy = ZeroCopySocket(channel.sock) if zero_copy else None
        #: Packets and SYNCs to write, in order; None wakes the thread to stop.
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"multifdsend_{channel_id}", daemon=True)

    def _run(self) -> None:
        owner = self.owner
        try:
            while not owner.stop.is_set():
                try:
                    job = self.jobs.get(timeout=WAIT_SLICE)
                except queue.Empty:
                    continue
                if job is None or owner.stop.is_set():
                    return
                if job.sync:
                    self._sync(job)
                    owner.synced.put(self.id)
                else:
                    self._send_pages(job)
                    owner.idle.put(self.id)
        except (ChannelError, OSError, ValueError) as err:
            # QEMU's error-desc is the channel's own text (multifd_send_thread), without the channel id.
            trace("multifd_send_error", id=self.id, error=err)
            owner.fail(str(err))

    def _sync(self, job: _Job) -> None:
        if self.zero_copy is not None and self.zero_copy.flush(self.owner.stop):
            self.owner.missed_zero_copy()
        self.channel.write(sync_header(job.packet_num))

    def _send_pages(self, job: _Job) -> None:
        send_packet(self.channel, self.encoder, self.zero_copy, job.block, job.pages, job.packet_num)


def send_packet(channel: Channel, encoder: wire.PayloadEncoder, zero_copy: ZeroCopySocket | None,
                block: RAMBlock, pages: np.ndarray, packet_num: int) -> None:
    """Header and payload; the payload comes from guest RAM run by run, never gathered first.

    Up to :data:`MAX_IOVEC_RUNS` runs (any number with zero copy, which
    may only hand guest RAM to the kernel), uncompressed runs go to
    ``sendmsg`` as views of guest RAM and compressed ones to the
    channel's codec one run at a time (one stream, one flush per packet,
    so the bytes decompress to the same pages); more scattered pages are
    gathered with one numpy copy.  ``sendmsg`` and the codecs release
    the interpreter lock for the whole run.  A channel thread and a channel
    worker process (multifd_worker.py) both write packets with it.
    """
    runs = page_runs(pages)
    if zero_copy is not None or len(runs) <= MAX_IOVEC_RUNS:
        buffers = [block.bytes[first * PAGE_SIZE:(first + count) * PAGE_SIZE] for first, count in runs]
    else:
        buffers = [block.pages[pages]]
    if encoder.method == "none":
        data = buffers
        size = len(pages) * PAGE_SIZE
    else:
        data = encoder.encode(buffers)
        size = sum(map(len, data))
    head = wire.packet_header(encoder.flag, len(pages), size, packet_num, block.idstr,
                              pages.astype(np.uint64) << np.uint64(12))
    if zero_copy is not None:
        channel.write(head)
        zero_copy.send(data)
    else:
        channel.writev([head, *data])


def sync_header(packet_num: int) -> bytes:
    """A SYNC packet: no pages, written after every earlier packet of its channel."""
    return wire.packet_header(wire.FLAG_SYNC, 0, 0, packet_num, None, ())


class MultifdSender:
    """The source side: packet batching, channel choice, sync, accounting (docs/qemu/ram.md §7).

    As QEMU's multifd_send_pages, the migration thread waits for an idle
    channel and hands it the packet; ``idle`` holds the ids of the idle
    channels in the order they became idle (QEMU scans round robin from the
    last one used: the choice is invisible on the wire).  ``account`` adds
    bytes to the main stream's rate-limit window: multifd traffic counts
    against the same ``max-bandwidth`` budget.
    """

    def __init__(self, channels: list[Channel], method: str, level: int, zero_copy: bool,
                 stats: RamStats, account: Callable[[int], None]) -> None:
        self.stats = stats
        self.account = account
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.idle: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        #: A channel's id once it wrote the SYNC packet the migration thread asked for.
        self.synced: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.error: str | None = None
        self._packet_num = 0
        self._block: RAMBlock | None = None
        self._pending: list[np.ndarray] = []
        self._pending_count = 0
        self._start(channels, method, level, zero_copy)

    def _start(self, channels: list[Channel], method: str, level: int, zero_copy: bool) -> None:
        """One thread per channel (multifd_worker.WorkerSender starts processes instead)."""
        self.channels = [_SendChannel(self, i, ch, wire.PayloadEncoder(method, level), zero_copy)
                         for i, ch in enumerate(channels)]
        for ch in self.channels:
            self.idle.put(ch.id)
            ch.thread.start()

    # -- errors ---------------------------------------------------------------

    def fail(self, desc: str) -> None:
        with self.lock:
            if self.error is None:
                self.error = desc
        self._wake_all()
        for ch in self.channels:
            ch.channel.shutdown()

    def _wake_all(self) -> None:
        """Stop: every thread waiting on a queue wakes now and sees ``stop``."""
        self.stop.set()
        self.idle.put(None)
        self.synced.put(None)
        for ch in self.channels:
            ch.jobs.put(None)

    def missed_zero_copy(self) -> None:
        with self.lock:
            self.stats.dirty_sync_missed_zero_copy += 1

    def _check(self) -> None:
        if self.error is not None:
            raise MultifdError(self.error)
        if self.stop.is_set():
            raise MultifdError("multifd channels were shut down")

    def _get(self, ids: "queue.SimpleQueue[int | None]") -> int:
        """The next channel id from *ids*, re-checking for a failed channel every slice."""
        while True:
            try:
                channel_id = ids.get(timeout=WAIT_SLICE)
            except queue.Empty:
                self._check()
                continue
            self._check()
            if channel_id is not None:
                return channel_id

    # -- migration thread ---------------------------------------------------------

    def queue(self, block: RAMBlock, pages: np.ndarray) -> None:
        """Queue non-zero pages of one block (counted as ``normal`` now, like QEMU)."""
        self.stats.normal += len(pages)
        start = 0
        while start < len(pages):
            if self._block is not block and self._pending_count:
                self._send_pending()
            self._block = block
            take = min(wire.PAGES_PER_PACKET - self._pending_count, len(pages) - start)
            self._pending.append(pages[start:start + take])
            self._pending_count += take
            start += take
            if self._pending_count == wire.PAGES_PER_PACKET:
                self._send_pending()

    def _send_pending(self) -> None:
        pages = np.concatenate(self._pending)
        block = self._block
        self._pending, self._pending_count, self._block = [], 0, None
        size = len(pages) * PAGE_SIZE + wire.HEADER_SIZE
        self._hand_over(block, pages, self._next_packet_num())
        self.stats.account_multifd(size)
        self.account(size)

    def _hand_over(self, block: RAMBlock, pages: np.ndarray, packet_num: int) -> None:
        """The packet to the next idle channel (waits for one)."""
        self.channels[self._get(self.idle)].jobs.put(_Job(block, pages, packet_num, False))

    def _next_packet_num(self) -> int:
        num = self._packet_num
        self._packet_num += 1
        return num

    def sync(self) -> None:
        """Before a RAM EOS: pending pages out, then a SYNC packet written on every channel."""
        trace("multifd_send_sync_main", packet_num=self._packet_num)
        if self._pending_count:
            self._send_pending()
        self._check()
        nums = [self._next_packet_num() for _ in self.channels]
        self.stats.account_multifd(wire.HEADER_SIZE * len(self.channels))
        self.account(wire.HEADER_SIZE * len(self.channels))
        self._sync_channels(nums)

    def _sync_channels(self, packet_nums: list[int]) -> None:
        """A SYNC packet (numbered *packet_nums*, one per channel) on every channel; back once all are written."""
        for ch, num in zip(self.channels, packet_nums):
            ch.jobs.put(_Job(None, None, num, True))
        for _ in self.channels:
            self._get(self.synced)

    def close(self) -> None:
        """Stop the threads and close the channels (end of migration, any outcome)."""
        self._wake_all()
        for ch in self.channels:
            ch.channel.shutdown()
        for ch in self.channels:
            ch.thread.join(timeout=10)
            ch.channel.close()


class MultifdReceiver:
    """The destination side: one reader thread per channel, pages straight into guest RAM.

    A channel thread that read a SYNC packet stops until :meth:`sync_main`
    (called at the main channel's RAM EOS) has seen a SYNC from every
    channel; a channel can therefore never be more than one sync ahead.
    """

    def __init__(self, channels: list[Channel], method: str, blocks: list[RAMBlock],
                 on_pages: Callable[[str, np.ndarray], None] | None = None,
                 on_error: Callable[[str], None] = lambda desc: None) -> None:
        """``on_pages(block, page_indices)`` is told about every page written (from a channel thread);
        ``on_error(desc)`` about the first channel that failed, once every channel was shut down."""
        self.blocks = {b.idstr: b for b in blocks}
        self.on_pages = on_pages
        self.on_error = on_error
        self.used = {b.idstr: b.size for b in blocks}
        self.error: str | None = None
        self.channels = channels
        self._cond = threading.Condition()
        self._stop = False
        self._waiting = 0
        self._ended = 0
        self._generation = 0
        #: COLO checkpoints: pages held here until the checkpoint is complete (None: written at once).
        self._staged: list[tuple[str, np.ndarray, bytes]] | None = None
        self.threads = [threading.Thread(target=self._run, args=(i, ch, wire.PayloadDecoder(method, i)),
                                         name=f"multifdrecv_{i}", daemon=True)
                        for i, ch in enumerate(channels)]
        for t in self.threads:
            t.start()

    def _run(self, channel_id: int, channel: Channel, decoder: wire.PayloadDecoder) -> None:
        try:
            self._loop(channel_id, channel, decoder)
        except (WireError, ChannelError, OSError) as err:
            with self._cond:
                first = self.error is None and not self._stop
                if self.error is None:
                    self.error = str(err)
                self._stop = True
            if first:
                # The source may be blocked writing another channel: its reset ends its migration.
                for ch in self.channels:
                    ch.shutdown()
                self.on_error(str(err))
        finally:
            with self._cond:
                self._ended += 1
                self._cond.notify_all()

    def _loop(self, channel_id: int, channel: Channel, decoder: wire.PayloadDecoder) -> None:
        """Read the channel's packets until its end (multifd_worker.WorkerReceiver relays a worker's instead)."""
        head = bytearray(wire.HEADER_SIZE)
        scratch = bytearray(wire.MAX_COMPRESSED_PAYLOAD)
        splicer = Splicer.of(channel)
        try:
            while not self._stop:
                if not recv_exact(channel, memoryview(head), eof_ok=True):
                    return
                header = wire.decode_packet_header(bytes(head), self.used)
                if header.normal_pages:
                    pages = header.offsets >> 12
                    data = receive_payload(channel, decoder, self.blocks[header.ramblock], header, pages, scratch,
                                           splicer, self._staged is None)
                    if data is None:
                        if self.on_pages is not None:
                            self.on_pages(header.ramblock, pages)
                    elif self._staged is not None:
                        with self._cond:
                            self._staged.append((header.ramblock, pages, bytes(data)))
                    else:
                        self._write(header.ramblock, pages, data)
                if header.sync:
                    self._wait_release()
        finally:
            if splicer is not None:
                splicer.close()

    def _write(self, block: str, pages: np.ndarray, data: bytes | memoryview) -> None:
        write_pages(self.blocks[block], pages, np.frombuffer(data, np.uint8).reshape(-1, PAGE_SIZE))
        if self.on_pages is not None:
            self.on_pages(block, pages)

    def stage(self) -> None:
        """From now on pages wait in memory until :meth:`apply_staged`: a COLO secondary applies
        a checkpoint only once all of it arrived (docs/colo.md), QEMU 7.2's colo_cache aside."""
        with self._cond:
            self._staged = []

    def apply_staged(self) -> None:
        """Write the pages held since the last call (after :meth:`sync_main`: all of them)."""
        if self._staged is None:
            return
        with self._cond:
            staged, self._staged = self._staged, []
        for block, pages, data in staged:
            self._write(block, pages, data)

    def _wait_release(self) -> None:
        with self._cond:
            generation = self._generation
            self._waiting += 1
            self._cond.notify_all()
            while self._generation == generation and not self._stop:
                self._cond.wait(WAIT_SLICE)

    def sync_main(self) -> None:
        """At a RAM EOS on the main channel: wait for one SYNC per channel, then release them."""
        trace("multifd_recv_sync_main", channels=len(self.channels))
        with self._cond:
            while self._waiting < len(self.channels):
                if self.error is not None:
                    raise MultifdError(self.error)
                if self._ended:
                    raise MultifdError("multifd: a channel closed before its SYNC packet")
                self._cond.wait(WAIT_SLICE)
            self._waiting = 0
            self._generation += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for ch in self.channels:
            ch.shutdown()
        for t in self.threads:
            t.join(timeout=10)
        for ch in self.channels:
            ch.close()


def receive_payload(channel: Channel, decoder: wire.PayloadDecoder, block: RAMBlock, header: wire.PacketHeader,
                    pages: np.ndarray, scratch: bytearray, splicer: "Splicer | None",
                    direct: bool) -> bytes | memoryview | None:
    """A packet's payload: None once it is in guest RAM, else its pages' bytes, decoded.

    With *direct*, uncompressed packets go straight to guest RAM, no copy
    on the way: into a RAM file with the channel's *splicer*, else, up to
    :data:`MAX_IOVEC_RUNS` runs, with ``recv_into`` the mapping; the rest
    go through *scratch*.  A channel thread and a channel worker process
    (multifd_worker.py) both read packets with it.
    """
    decoder.check_flags(header)
    runs = page_runs(pages) if direct and decoder.method == "none" else []
    if runs and splicer is not None and block.writes_to_file():
        for first, count in runs:
            splicer.read(block.file, first * PAGE_SIZE, count * PAGE_SIZE)
        return None
    if 0 < len(runs) <= MAX_IOVEC_RUNS:
        for first, count in runs:
            recv_exact(channel, memoryview(block.incoming_run(first, count)).cast("B"))
        return None
    view = memoryview(scratch)[:decoder.payload_size(header)]
    recv_exact(channel, view)
    return decoder.decode(header, view)


class Splicer:
    """Moves a channel's uncompressed pages from its socket into the RAM file with ``splice``.

    Socket to pipe moves the received buffers without a copy; pipe to file
    copies each page once into the page cache, where a fresh tmpfs page
    written whole is never zeroed and no page table is filled for it.  A
    receiver that maps guest RAM and ``recv_into`` it pays a fault, a zeroed
    page and the copy: twice the kernel time per page on the reference host
    (docs/benchmarks.md, "Writing incoming pages through the RAM file").
    QEMU 7.2 reads into its mapping (multifd_recv_thread).
    """

    #: The pipe's size: the most moved per pair of calls (the default limit for an unprivileged user).
    PIPE_BYTES = 1 << 20

    def __init__(self, sock: int) -> None:
        self.sock = sock
        self.r, self.w = os.pipe()
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, self.PIPE_BYTES)
        except OSError:
            pass
        self.size = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)

    @classmethod
    def of(cls, channel: Channel) -> "Splicer | None":
        """A splicer for a plain socket channel; None for others (TLS, whose bytes need decrypting)."""
        return cls(channel.fileno()) if type(channel) is SocketChannel else None

    def read(self, fd: int, offset: int, length: int) -> None:
        """The next *length* bytes of the socket into file *fd* at *offset*."""
        end = offset + length
        while offset < end:
            try:
                moved = os.splice(self.sock, self.w, min(end - offset, self.size))
            except OSError as err:
                raise ChannelError(f"Unable to read from socket: {os.strerror(err.errno or 104)}") from None
            if not moved:
                raise MultifdError("multifd: connection closed in the middle of a packet")
            while moved:
                written = os.splice(self.r, fd, moved, offset_dst=offset)
                if not written:
                    raise OSError(errno.EIO, "the RAM file took no bytes")
                offset += written
                moved -= written

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def recv_exact(channel: Channel, view: memoryview, eof_ok: bool = False) -> bool:
    """Fill ``view`` from the socket; False on a clean EOF before the first byte if ``eof_ok``."""
    got = 0
    while got < len(view):
        n = channel.recv_into(view[got:])
        if n == 0:
            if got == 0 and eof_ok:
                return False
            raise MultifdError("multifd: connection closed in the middle of a packet")
        got += n
    return True
