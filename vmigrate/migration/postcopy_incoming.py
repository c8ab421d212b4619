"""The destination's side of postcopy (QEMU's postcopy-ram.c and the postcopy parts of savevm.c).

One :class:`PostcopyIncoming` per incoming attempt with ``postcopy-ram``:

* the PostcopyState machine the stream's commands drive (ADVISE, DISCARD,
  LISTEN, RUN; docs/qemu/postcopy.md §4.1), with QEMU's error texts;
* the received bitmap, one bool per page, set for every page loaded in
  precopy or placed in postcopy;
* from LISTEN on, guest RAM registered with userfaultfd and a fault thread
  that turns each fault on a missing page into a page request on the
  return path (REQ_PAGES_ID / REQ_PAGES, §4.3);
* page placement: a page that arrives in postcopy is copied in atomically
  with UFFDIO_COPY (or UFFDIO_ZEROPAGE), which also wakes whoever waits on
  it;
* the blocktime accounting of ``postcopy-blocktime`` (§10).

The thread that reads the main channel goes on reading it after the
package: it is QEMU's listen thread.  The guest is started by RUN, from
that same thread, while its RAM is still arriving.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from typing import Callable

import numpy as np

from vmigrate.machine.memory import PAGE_SIZE, RAMBlock, page_runs
from vmigrate.machine.userfaultfd import Fault, UserfaultError, UserfaultFd
from vmigrate.migration.channel import Channel, ChannelError
from vmigrate.migration.postcopy import FastThreadSwitch
from vmigrate.migration.savevm import LoadError
from vmigrate.migration.qemu_file import READ_CHUNK
from vmigrate.migration.wire import NEED_DATA, WireError, return_path, stream
from vmigrate.migration.wire import ram as wire_ram
from vmigrate.trace import trace

log = logging.getLogger(__name__)

#: How long the fault thread waits for a fault before it checks whether it should stop.
FAULT_POLL_SECONDS = 0.1
#: How long the end of a load waits for the preempt channel's last pages and EOS.
PREEMPT_DRAIN_SECONDS = 10.0


class PostcopyState(enum.IntEnum):
    """QEMU's PostcopyState (docs/qemu/postcopy.md §4.1); the values appear in its error texts."""

    NONE = 0
    ADVISE = 1
    DISCARD = 2
    LISTENING = 3
    RUNNING = 4
    END = 5


class Blocktime:
    """``postcopy-blocktime`` and ``postcopy-vcpu-blocktime`` (docs/qemu/postcopy.md §10).

    Times are milliseconds since the accounting began.  A vCPU is blocked
    from its fault until the page it waits for is placed; the total counts
    only the time during which every vCPU was blocked at once.
    """

    def __init__(self, vcpu_tids: list[int]) -> None:
        self._index = {tid: i for i, tid in enumerate(vcpu_tids)}
        self._lock = threading.Lock()
        self._start = time.monotonic()
        #: Per vCPU: (block, page) it waits for and since when, or None.
        self._waiting: list[tuple[str, int, float] | None] = [None] * len(vcpu_tids)
        self.vcpu_ms = [0] * len(vcpu_tids)
        self.total_ms = 0
        self._all_down_since = 0.0

    def _now(self) -> float:
        return (time.monotonic() - self._start) * 1000

    def fault(self, tid: int, block: str, page: int) -> None:
        index = self._index.get(tid)
        if index is None:
            return
        with self._lock:
            now = self._now()
            self._waiting[index] = (block, page, now)
            if all(w is not None for w in self._waiting):
                self._all_down_since = now

    def placed(self, block: str, first: int, count: int) -> None:
        """Pages [first, first + count) of *block* arrived: release the vCPUs waiting on them."""
        with self._lock:
            if not any(w is not None for w in self._waiting):
                return
            now = self._now()
            all_down = all(w is not None for w in self._waiting)
            released = False
            for i, w in enumerate(self._waiting):
                if w is not None and w[0] == block and first <= w[1] < first + count:
                    self.vcpu_ms[i] += int(now - w[2])
                    self._waiting[i] = None
                    released = True
            if released and all_down:
                self.total_ms += int(now - self._all_down_since)

    def to_qmp(self, info: dict) -> None:
        info["postcopy-blocktime"] = self.total_ms
        info["postcopy-vcpu-blocktime"] = list(self.vcpu_ms)


class PostcopyIncoming:
    """One incoming attempt's postcopy state, received bitmap, faults and page placement."""

    def __init__(self, blocks: list[RAMBlock], send_rp: Callable[[bytes], None],
                 vcpu_tids: Callable[[], list[int]], blocktime: bool) -> None:
        """*send_rp* writes a return-path message (thread-safe); *vcpu_tids* names the threads
        whose faults count as vCPU blocktime, read at LISTEN (when ``postcopy-blocktime``)."""
        self.blocks = {b.idstr: b for b in blocks}
        self.state = PostcopyState.NONE
        self.received = {b.idstr: np.zeros(b.npages, dtype=np.bool_) for b in blocks}
        self._requested = {b.idstr: np.zeros(b.npages, dtype=np.bool_) for b in blocks}
        self._send_rp = send_rp
        self._vcpu_tids = vcpu_tids
        self._want_blocktime = blocktime
        self.blocktime: Blocktime | None = None
        self._uffd: UserfaultFd | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_requested_block: str | None = None
        self._rp_lock = threading.Lock()
        #: Pages filled with zeros in place, for UFFDIO_COPY where UFFDIO_ZEROPAGE is refused.
        self._zeros = np.zeros((64, PAGE_SIZE), dtype=np.uint8)
        #: The postcopy-preempt channel (set before LISTEN with ``postcopy-preempt``), its loader,
        #: and what to do when it breaks (pause the migration, as a broken main channel does).
        self.preempt_channel: Channel | None = None
        self.on_preempt_broken: Callable[[], None] = lambda: None
        self._preempt_thread: threading.Thread | None = None
        #: Beyond QEMU: seconds from each fault's request to its page in place.
        self.latencies: list[float] = []
        self._asked: dict[tuple[str, int], float] = {}
        self._latency_lock = threading.Lock()
        self._fast_switch = FastThreadSwitch()

    @property
    def running(self) -> bool:
        """The guest runs here: a broken stream pauses instead of failing."""
        return self.state == PostcopyState.RUNNING

    @property
    def placing(self) -> bool:
        """From LISTEN on, pages arrive into registered memory and must be placed atomically."""
        return self.state >= PostcopyState.LISTENING

    # -- commands -------------------------------------------------------------------------

    def advise(self, payload: bytes) -> None:
        """POSTCOPY_ADVISE (QEMU's loadvm_postcopy_handle_advise)."""
        if self.state != PostcopyState.NONE:
            raise LoadError(f"CMD_POSTCOPY_ADVISE in wrong postcopy state ({self.state})")
        self.state = PostcopyState.ADVISE
        sizes = stream.decode_advise(payload)
        if sizes is None:
            raise LoadError("RAM postcopy is enabled but have 0 byte advise")
        summary, target = sizes
        if summary != PAGE_SIZE:
            raise LoadError(f"Postcopy needs matching RAM page sizes (s={summary:x} d={PAGE_SIZE:x})")
        if target != PAGE_SIZE:
            raise LoadError(f"Postcopy needs matching target page sizes (s={target} d={PAGE_SIZE})")

    def discard(self, payload: bytes) -> None:
        """POSTCOPY_RAM_DISCARD: the pages will come again, so they must fault until then."""
        if self.state not in (PostcopyState.ADVISE, PostcopyState.DISCARD):
            raise LoadError(f"CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state ({self.state})")
        self.state = PostcopyState.DISCARD
        name, ranges = stream.decode_discard(payload)
        block = self.blocks.get(name)
        if block is None:
            raise LoadError(f"ram_discard_range: Failed to find block '{name}'")
        received = self.received[name]
        for start, length in ranges:
            if start % PAGE_SIZE or length % PAGE_SIZE or start + length > block.size:
                raise LoadError(f"ram_discard_range: Unaligned or overrun start={start:x} len={length:x} "
                                f"in block '{name}'")
            block.discard(start, length)
            received[start // PAGE_SIZE:(start + length) // PAGE_SIZE] = False
        trace("postcopy_ram_discard", block=name, ranges=len(ranges))

    def listen(self) -> None:
        """POSTCOPY_LISTEN: register guest RAM with userfaultfd and start serving faults."""
        if self.state not in (PostcopyState.ADVISE, PostcopyState.DISCARD):
            raise LoadError(f"CMD_POSTCOPY_LISTEN in wrong postcopy state ({self.state})")
        try:
            uffd = UserfaultFd()
        except UserfaultError as err:
            raise LoadError(f"postcopy_ram_incoming_setup: {err}") from None
        self._uffd = uffd
        try:
            for block in self.blocks.values():
                # The precopy loader's prefault helper would fault on registered pages.
                block.end_incoming()
                uffd.register(block.address, block.size)
        except UserfaultError as err:
            uffd.close()
            self._uffd = None
            raise LoadError(f"postcopy_ram_incoming_setup: {err}") from None
        if self._want_blocktime:
            self.blocktime = Blocktime(self._vcpu_tids())
        self._fast_switch.enter()
        self.state = PostcopyState.LISTENING
        for block in self.blocks.values():
            block.faulting = True
        self._thread = threading.Thread(target=self._serve_faults, name="fault handler", daemon=True)
        self._thread.start()
        self._start_preempt()
        trace("postcopy_ram_enable_notify")

    def _start_preempt(self) -> None:
        channel = self.preempt_channel
        if channel is not None:
            self._preempt_thread = threading.Thread(target=self._load_preempt, args=(channel,),
                                                    name="postcopy preempt", daemon=True)
            self._preempt_thread.start()

    def _load_preempt(self, channel: Channel) -> None:
        """The preempt channel's loader: bare RAM records up to an EOS, with its own "last block"
        (docs/qemu/postcopy.md §6).  A broken channel pauses the migration."""
        records = wire_ram.RecordStream(wire_ram.RamBodyDecoder(
            {name: b.size for name, b in self.blocks.items()}, variable_runs=True))
        try:
            while not records.finished:
                data = channel.read(READ_CHUNK)
                if not data:
                    raise ChannelError("the postcopy preempt channel closed before its EOS")
                records.feed(data)
                while (event := records.next_event()) is not NEED_DATA:
                    if isinstance(event, wire_ram.RamPages):
                        self.place_pages(event.block, event.pages, event.data)
                    elif isinstance(event, wire_ram.RamZeroPages):
                        self.place_zero_pages(event.block, event.pages, event.fill)
                    elif not isinstance(event, wire_ram.RamEOS):
                        raise WireError(f"unexpected {type(event).__name__} on the postcopy preempt channel")
        except (ChannelError, WireError, UserfaultError, OSError) as err:
            if not self._stop.is_set() and channel is self.preempt_channel:
                log.warning("postcopy preempt channel: %s", err)
                self.on_preempt_broken()

    def restart_preempt(self, channel: Channel | None) -> None:
        """A recovery's new preempt channel gets a new loader."""
        self.preempt_channel = channel
        if self._preempt_thread is not None:
            self._preempt_thread.join(timeout=5)
        self._start_preempt()

    def run(self) -> None:
        """POSTCOPY_RUN: the device state is in; the guest may start (the caller starts it)."""
        if self.state != PostcopyState.LISTENING:
            raise LoadError(f"CMD_POSTCOPY_RUN in wrong postcopy state ({self.state})")
        self.state = PostcopyState.RUNNING

    def end(self) -> None:
        """Every page is in (or the load is over): unregister and stop the fault thread.

        The preempt channel ends with its own EOS, which may come after the
        main channel's EOF: its loader is waited for first.
        """
        preempt = self._preempt_thread
        if preempt is not None:
            preempt.join(timeout=PREEMPT_DRAIN_SECONDS)
            if preempt.is_alive() and self.preempt_channel is not None:
                self.preempt_channel.shutdown()
                preempt.join(timeout=5)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for block in self.blocks.values():
            block.faulting = False
        uffd, self._uffd = self._uffd, None
        if uffd is not None:
            self._fast_switch.exit()
            for block in self.blocks.values():
                try:
                    uffd.unregister(block.address, block.size)
                except UserfaultError as err:
                    log.warning("%s", err)
            uffd.close()
        if self.state >= PostcopyState.LISTENING:
            self.state = PostcopyState.END

    # -- pages --------------------------------------------------------------------------------

    def mark_received(self, block: str, pages: np.ndarray) -> None:
        """Pages loaded in precopy."""
        self.received[block][pages] = True

    def place_pages(self, block: str, pages: np.ndarray, data: np.ndarray) -> None:
        """Copy whole pages in, one UFFDIO_COPY per run of consecutive pages."""
        b = self.blocks[block]
        data = np.ascontiguousarray(data)
        src = data.ctypes.data
        offset = 0
        for first, count in page_runs(pages):
            self._uffd.copy(b.address + first * PAGE_SIZE, src + offset * PAGE_SIZE, count * PAGE_SIZE)
            self._placed(block, first, count)
            offset += count

    def place_zero_pages(self, block: str, pages: np.ndarray, fill: np.ndarray) -> None:
        """Zero pages (``fill`` 0) map the zero page; a page of one other byte is copied in."""
        uniform = fill != 0
        if uniform.any():
            filled = np.repeat(fill[uniform][:, None], PAGE_SIZE, axis=1).astype(np.uint8)
            self.place_pages(block, pages[uniform], filled)
        b = self.blocks[block]
        for first, count in page_runs(pages[~uniform]):
            self._zero(b.address + first * PAGE_SIZE, count)
            self._placed(block, first, count)

    def _zero(self, address: int, count: int) -> None:
        try:
            self._uffd.zeropage(address, count * PAGE_SIZE)
        except UserfaultError:
            # Some memory types refuse UFFDIO_ZEROPAGE: copy zeros instead.
            for done in range(0, count, len(self._zeros)):
                n = min(len(self._zeros), count - done)
                self._uffd.copy(address + done * PAGE_SIZE, self._zeros.ctypes.data, n * PAGE_SIZE)

    def _placed(self, block: str, first: int, count: int) -> None:
        self.received[block][first:first + count] = True
        requested = self._requested[block][first:first + count]
        if requested.any():
            now = time.monotonic()
            with self._latency_lock:
                for page in np.flatnonzero(requested) + first:
                    asked = self._asked.pop((block, int(page)), None)
                    if asked is not None:
                        self.latencies.append(now - asked)
        requested[:] = False
        if self.blocktime is not None:
            self.blocktime.placed(block, first, count)

    def latency_qmp(self) -> dict:
        """``x-vmigrate-page-latency``: page requests and their fault-to-placement time in ms."""
        with self._latency_lock:
            times = np.array(self.latencies) * 1000
        if not times.size:
            return {"requests": 0}
        p50, p99 = np.percentile(times, [50, 99])
        return {"requests": int(times.size), "p50-ms": round(float(p50), 3), "p99-ms": round(float(p99), 3),
                "max-ms": round(float(times.max()), 3)}

    # -- faults -------------------------------------------------------------------------------

    def _serve_faults(self) -> None:
        uffd = self._uffd
        while not self._stop.is_set():
            try:
                faults = uffd.read_faults(FAULT_POLL_SECONDS)
            except UserfaultError as err:
                log.error("postcopy fault thread: %s", err)
                return
            for fault in faults:
                try:
                    self._fault(fault)
                except (UserfaultError, OSError) as err:
                    log.error("postcopy fault thread: %s", err)
                    return

    def _fault(self, fault: Fault) -> None:
        """One missing page: in place already (a zero page precopy never had to write), or ask for it."""
        for name, block in self.blocks.items():
            if block.address <= fault.address < block.address + block.size:
                break
        else:
            return
        page = (fault.address - block.address) // PAGE_SIZE
        address = block.address + page * PAGE_SIZE
        trace("postcopy_ram_fault_thread_request", rb=name, offset=page * PAGE_SIZE, tid=fault.tid)
        if self.received[name][page]:
            self._zero(address, 1)
            self._uffd.wake(address, PAGE_SIZE)
            return
        if self.blocktime is not None:
            self.blocktime.fault(fault.tid, name, page)
        requested = self._requested[name]
        if requested[page]:
            return
        requested[page] = True
        with self._latency_lock:
            self._asked[(name, page)] = time.monotonic()
        self.request(name, page)

    def request(self, block: str, page: int) -> None:
        """REQ_PAGES_ID when the block differs from the last request's, else REQ_PAGES.

        While the link is down a request goes nowhere; it stays recorded and
        is sent again after the recovery.
        """
        start = page * PAGE_SIZE
        with self._rp_lock:
            if block != self._last_requested_block:
                message = return_path.req_pages_id(block, start, PAGE_SIZE)
                self._last_requested_block = block
            else:
                message = return_path.req_pages(start, PAGE_SIZE)
            try:
                self._send_rp(message)
            except ChannelError as err:
                log.debug("page request not sent: %s", err)
                self._last_requested_block = None

    def received_bitmap(self, block: str) -> bytes:
        """RP RECV_BITMAP for *block*: the message and the bitmap blob (docs/qemu/postcopy.md §7.2)."""
        if block not in self.received:
            raise LoadError(f"loadvm_handle_recv_bitmap: failed to find block '{block}'")
        return return_path.recv_bitmap(block, self.received[block])

    def resumed(self) -> None:
        """The recovery is done: every request still outstanding is sent again, the first with its block."""
        with self._rp_lock:
            self._last_requested_block = None
        for name, requested in self._requested.items():
            for page in np.flatnonzero(requested & ~self.received[name]):
                self.request(name, int(page))
