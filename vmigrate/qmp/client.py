"""A small blocking QMP client for vmigrate's own tools (migrate, demo, bench).

It talks to any QMP server — a vmigrate VM or a real QEMU — and keeps
events that arrive between responses in a queue, since the tools follow
``MIGRATION`` events while polling ``query-migrate``.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections import deque
from typing import Any


class QMPClientError(Exception):
    """A QMP error response; ``cls`` and ``desc`` as the server sent them."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def _open(address: str, timeout: float) -> socket.socket:
    if address.startswith("tcp:"):
        host, _, port = address[4:].rpartition(":")
        return socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout)
    path = address[5:] if address.startswith("unix:") else address
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


class QMPClient:
    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.address = address
        self.sock = _open(address, timeout)
        self.sock.settimeout(timeout)
        self._buf = b""
        self._ids = itertools.count(1)
        self.events: deque[dict] = deque()
        self.greeting = self._read_message()
        if "QMP" not in self.greeting:
            raise QMPClientError("GenericError", f"{address} did not greet like a QMP server")
        self.execute("qmp_capabilities")

    def _read_message(self) -> dict:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"QMP connection to {self.address} closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def execute(self, name: str, args: dict | None = None) -> Any:
        req_id = f"vmigrate-{next(self._ids)}"
        msg: dict = {"execute": name, "id": req_id}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read_message()
            if "event" in reply:
                self.events.append(reply)
            elif reply.get("id") == req_id:
                if "error" in reply:
                    raise QMPClientError(reply["error"]["class"], reply["error"]["desc"])
                return reply["return"]

    def poll_events(self, timeout: float = 0.0) -> list[dict]:
        """Events received so far, waiting up to *timeout* s for at least one."""
        deadline = time.monotonic() + timeout
        while not self.events:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.sock.settimeout(remaining)
            try:
                reply = self._read_message()
            except (TimeoutError, socket.timeout):
                break
            finally:
                self.sock.settimeout(30.0)
            if "event" in reply:
                self.events.append(reply)
        out = list(self.events)
        self.events.clear()
        return out

    def close(self) -> None:
        self.sock.close()
