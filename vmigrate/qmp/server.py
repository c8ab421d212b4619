"""QMP monitors on unix and tcp sockets, driven by the process's asyncio loop.

Sockets are read with ``recvmsg`` so file descriptors passed with
SCM_RIGHTS (for ``getfd`` and ``fd:`` migration URIs) arrive with the bytes.
Events can be emitted from any thread; they are written from the loop
thread, and an event raised while a command runs is written before that
command's response, as in QEMU.

A monitor's input is parsed on the loop thread while it is small; once the
message being collected grows past ``INLINE_PARSE_LIMIT`` its parsing moves
to a worker thread and the monitor stops reading until that is done, so one
client sending a message near QEMU's 64 MiB limit does not stall the other
monitors (docs/qmp-limits.md).
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import logging
import os
import socket
import sys
import threading
from typing import Any, Callable

from vmigrate.machine.host import release_free_memory
from vmigrate.qmp.protocol import Dispatcher, MonitorProtocol, event_message

MAX_FDS = 16
#: Input bytes (incomplete message plus the bytes just read) parsed on the loop
#: thread; more goes to a worker thread.  Requests are far smaller.
INLINE_PARSE_LIMIT = 64 << 10
#: Pending connections per listener.  QEMU's chardev listens with a backlog of
#: 1 and serves one client at a time; vmigrate serves every client at once, and
#: a burst of connects must not be refused (docs/qmp-limits.md).
LISTEN_BACKLOG = socket.SOMAXCONN

log = logging.getLogger(__name__)


def parse_address(spec: str) -> tuple[str, object]:
    """``unix:PATH`` or ``tcp:HOST:PORT`` (QEMU's ``-qmp`` spellings; options after ``,`` ignored)."""
    spec = spec.split(",", 1)[0]
    kind, sep, rest = spec.partition(":")
    if kind == "unix" and sep and rest:
        return "unix", rest
    if kind == "tcp" and sep:
        host, _, port = rest.rpartition(":")
        if port.isdigit():
            return "tcp", (host.strip("[]") or "127.0.0.1", int(port))
    raise ValueError(f"invalid QMP address '{spec}' (use unix:PATH or tcp:HOST:PORT)")


class _Connection:
    def __init__(self, server: "QMPServer", sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.proto = MonitorProtocol(server.dispatcher, server.version, server.package)
        self.chardev = ""
        self._out = bytearray()
        self._writing = False
        self.closed = False
        sock.setblocking(False)
        loop = server.loop
        loop.add_reader(sock.fileno(), self._on_readable)
        self.send(self.proto.greeting())

    def _on_readable(self) -> None:
        fds = array.array("i")
        try:
            data, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancdata = b"", []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        self.proto.pending_fds.extend(fds)
        if not data:
            self.close()
            return
        if self.proto.buffered() + len(data) <= INLINE_PARSE_LIMIT:
            self._answer(self.proto.parse(data))
            return
        # Like QEMU suspending a busy monitor: read nothing more until parsed.
        loop = self.server.loop
        loop.remove_reader(self.sock.fileno())
        future = loop.run_in_executor(self.server.parsers, self.proto.parse, data)
        future.add_done_callback(self._parsed)

    def _parsed(self, future: "asyncio.Future[list[Any]]") -> None:
        if self.closed or future.cancelled():
            return
        error = future.exception()
        if error is not None:
            log.error("parsing input of monitor %s failed", self.chardev, exc_info=error)
            self.close()
            return
        self._answer(future.result())
        if self.closed:
            return
        if not self.proto.buffered():
            # Once this callback (and the future holding the parsed message) is gone.
            self.server.loop.call_soon(release_free_memory)
        self.server.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _answer(self, messages: list[Any]) -> None:
        for response in self.proto.answer(messages):
            self.send(response)
        self.server.after_request()

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        self._out += data
        self._flush()

    def _flush(self) -> None:
        while self._out:
            try:
                n = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            del self._out[:n]
        if not self._out and sys.getsizeof(self._out) > INLINE_PARSE_LIMIT:
            # A large reply went out (an echoed id of many MiB): let its buffer go.
            self._out = bytearray()
            self.server.loop.call_soon(release_free_memory)
        want = bool(self._out)
        if want != self._writing:
            if want:
                self.server.loop.add_writer(self.sock.fileno(), self._flush)
            else:
                self.server.loop.remove_writer(self.sock.fileno())
            self._writing = want

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.server.loop
        loop.remove_reader(self.sock.fileno())
        if self._writing:
            loop.remove_writer(self.sock.fileno())
        for fd in [*self.proto.pending_fds, *self.proto.named_fds.values()]:
            os.close(fd)
        self.sock.close()
        self.server.connections.discard(self)


class QMPServer:
    """All QMP monitors of one VM process."""

    def __init__(self, dispatcher: Dispatcher, version: dict, package: str, loop: asyncio.AbstractEventLoop) -> None:
        self.dispatcher = dispatcher
        self.version = version
        self.package = package
        self.loop = loop
        self.connections: set[_Connection] = set()
        self._listeners: list[socket.socket] = []
        #: Parses monitor input too large for the loop thread (see INLINE_PARSE_LIMIT).
        self.parsers = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="qmp-parse")
        self._unix_paths: list[str] = []
        self._loop_thread = threading.get_ident()
        #: Called after each batch of requests (e.g. to act on ``quit``).
        self.after_request: Callable[[], None] = lambda: None

    def listen(self, spec: str) -> None:
        kind, addr = parse_address(spec)
        if kind == "unix":
            path = str(addr)
            if os.path.exists(path):
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # Bind and listen under a temporary name, then rename: a client that
            # sees the path can always connect (no bind-to-listen window).
            staging = f"{path}.{os.getpid()}.tmp"
            sock.bind(staging)
            sock.listen(LISTEN_BACKLOG)
            os.rename(staging, path)
            self._unix_paths.append(path)
        else:
            host, port = addr  # type: ignore[misc]
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        self._listeners.append(sock)
        self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listener: socket.socket) -> None:
        """Accept every pending connection: a burst is greeted in one pass."""
        chardev = self.chardev_ids()[self._listeners.index(listener)]
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log.warning("accepting a QMP connection on %s failed: %s", chardev, err)
                return
            conn = _Connection(self, sock)
            conn.chardev = chardev
            self.connections.add(conn)

    def chardev_ids(self) -> list[str]:
        """Each ``--qmp`` is a socket character device to QEMU users: ``compat_monitor<N>``."""
        return [f"compat_monitor{i}" for i in range(len(self._listeners))]

    def yank_chardev(self, chardev: str) -> None:
        """Drop the client connected through *chardev* (QEMU's yank of a socket chardev)."""
        for conn in list(self.connections):
            if conn.chardev == chardev:
                conn.close()

    def emit_event(self, name: str, data: dict | None = None) -> None:
        """Send an event to every negotiated monitor; safe from any thread."""
        message = event_message(name, data)
        if threading.get_ident() == self._loop_thread:
            self._broadcast(message)
        else:
            self.loop.call_soon_threadsafe(self._broadcast, message)

    def _broadcast(self, message: bytes) -> None:
        for conn in list(self.connections):
            if conn.proto.negotiated:
                conn.send(message)

    def close(self) -> None:
        for sock in self._listeners:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        for path in self._unix_paths:
            if os.path.exists(path):
                os.unlink(path)
        for conn in list(self.connections):
            conn._flush()
            conn.close()
        self.parsers.shutdown(wait=False, cancel_futures=True)
