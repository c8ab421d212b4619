"""The one blocking QMP client of vmigrate's tools, benchmarks and tests.

It talks to any QMP server — a vmigrate VM or a real QEMU — and keeps
events that arrive between responses in a queue, since the tools follow
``MIGRATION`` events while polling ``query-migrate``.  Every read is
bounded by the connection's timeout.

Besides :meth:`QMPClient.execute`, it gives test and recording tools what
they need to look at the protocol itself: the whole reply to any request
object (errors and ids as the server sent them), the raw lines of a session
that was not negotiated, and file descriptors passed with SCM_RIGHTS for
``getfd`` (QEMU's monitor takes them from the ancillary data of the bytes
that carry the command: chardev/char-socket.c, monitor/misc.c).
"""

from __future__ import annotations

import array
import itertools
import json
import logging
import socket
import time
from collections import deque
from typing import Any

log = logging.getLogger(__name__)


class QMPClientError(Exception):
    """A QMP error response; ``cls`` and ``desc`` as the server sent them."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(f"{cls}: {desc}")
        self.cls = cls
        self.desc = desc


def _open(address: str, timeout: float) -> socket.socket:
    if address.startswith("tcp:"):
        host, _, port = address[4:].rpartition(":")
        return socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout)
    path = address[5:] if address.startswith("unix:") else address
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


#: Events a server may send ahead of its greeting (QEMU does at start-up).
EARLY_EVENTS = 8


class QMPClient:
    """One QMP session: greeting read, then capabilities negotiated unless *negotiate* is false.

    *capabilities* are enabled in the negotiation (``oob``, as the
    ``qemu.qmp`` library enables it whenever the server offers it).
    """

    def __init__(self, address: str, timeout: float = 30.0, negotiate: bool = True,
                 capabilities: tuple[str, ...] = ()) -> None:
        self.address = address
        self.timeout = timeout
        self.sock = _open(address, timeout)
        self._buf = b""
        self._ids = itertools.count(1)
        self.events: deque[dict] = deque()
        try:
            #: The greeting as sent (QEMU ends every line with ``\r\n``), and parsed.
            self.greeting_line = self.read_line()
            self.greeting = json.loads(self.greeting_line)
            # QEMU writes an event emitted while the connection is being opened (RESUME at
            # start-up) before its greeting: keep it, the greeting follows.
            for _ in range(EARLY_EVENTS):
                if "event" not in self.greeting:
                    break
                self.events.append(self.greeting)
                self.greeting_line = self.read_line()
                self.greeting = json.loads(self.greeting_line)
            if "QMP" not in self.greeting:
                raise QMPClientError("GenericError", f"{address} did not greet like a QMP server: "
                                     f"{self.greeting_line[:200]!r}")
            if negotiate:
                self.execute("qmp_capabilities", {"enable": list(capabilities)} if capabilities else None)
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> "QMPClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_line(self) -> bytes:
        """The next line from the server as sent, without its ``\\n`` (QEMU ends lines with ``\\r\\n``)."""
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"QMP connection to {self.address} closed; unread: {self._buf!r}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def read_message(self) -> dict:
        """The next message, objects keeping the member order they were sent in."""
        return json.loads(self.read_line())

    def send(self, data: bytes) -> None:
        """Bytes as they are: for requests no well-behaved client would send."""
        self.sock.sendall(data)

    def request(self, message: dict) -> dict:
        """Send *message* as given; its reply (matched by ``id``, or the next one without) as received.

        Events read on the way are queued for :meth:`poll_events`.
        """
        self.send(json.dumps(message).encode() + b"\n")
        want = message.get("id")
        while True:
            reply = self.read_message()
            if "event" in reply:
                self.events.append(reply)
            elif reply.get("id") == want:
                return reply
            else:
                log.debug("%s: dropped a reply to another request: %s", self.address, reply)

    def execute(self, name: str, args: dict | None = None) -> Any:
        """Run a command; its ``return`` value, or :class:`QMPClientError`."""
        message: dict = {"execute": name, "id": f"vmigrate-{next(self._ids)}"}
        if args:
            message["arguments"] = args
        reply = self.request(message)
        if "error" in reply:
            raise QMPClientError(reply["error"]["class"], reply["error"]["desc"])
        return reply["return"]

    def send_fd(self, fd: int) -> None:
        """Pass *fd* (SCM_RIGHTS) for the next ``getfd``; the caller keeps its own copy."""
        if self.sock.family != socket.AF_UNIX:
            raise QMPClientError("GenericError", "passing file descriptors needs a unix socket")
        self.sock.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])

    def poll_events(self, timeout: float = 0.0) -> list[dict]:
        """Events received so far, waiting up to *timeout* s for at least one."""
        deadline = time.monotonic() + timeout
        while not self.events:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.sock.settimeout(remaining)
            try:
                reply = self.read_message()
            except TimeoutError:
                break
            finally:
                self.sock.settimeout(self.timeout)
            if "event" in reply:
                self.events.append(reply)
        out = list(self.events)
        self.events.clear()
        return out

    def next_event(self, timeout: float = 0.0) -> dict | None:
        """The oldest event not yet taken, waiting up to *timeout* s; None if none came."""
        if not self.events:
            self.events.extend(self.poll_events(timeout))
        return self.events.popleft() if self.events else None

    def close(self) -> None:
        self.sock.close()


def try_connect(address: str, timeout: float = 30.0, negotiate: bool = True,
                capabilities: tuple[str, ...] = ()) -> QMPClient | None:
    """A client, or None while nothing accepts on *address* yet.

    QEMU creates its socket file at bind() and accepts only after listen(),
    so a connect in between is refused: callers retry (bounded).
    """
    try:
        return QMPClient(address, timeout, negotiate, capabilities)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
