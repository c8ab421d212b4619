"""An ``exec:`` migration command that joins its stdin and stdout to a unix socket, both ways.

``python3 relay.py PATH`` connects to PATH (retrying while nobody listens yet);
``python3 relay.py --listen PATH`` accepts one connection there.  A source's
``exec:`` command and a destination's ``exec:`` command made of these two carry
a two-way migration, TLS included (docs/tls.md, "exec: and fd:"), on a plain
Debian with only Python: no socat needed.

The end of stdin becomes a half-close of the socket, and the socket is read
to its end before the relay exits: closing it with unread input would reset
the connection and could cut what the peer has yet to read.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

CHUNK = 1 << 16
CONNECT_SECONDS = 30


def _open(argv: list[str]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if argv[0] == "--listen":
        sock.bind(argv[1])
        sock.listen(1)
        conn, _ = sock.accept()
        sock.close()
        return conn
    deadline = time.monotonic() + CONNECT_SECONDS
    while True:
        try:
            sock.connect(argv[0])
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _stdin_to_socket(sock: socket.socket) -> None:
    while data := os.read(0, CHUNK):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def main(argv: list[str]) -> None:
    sock = _open(argv)
    sender = threading.Thread(target=_stdin_to_socket, args=(sock,), daemon=True)
    sender.start()
    stdout_open = True
    while data := sock.recv(CHUNK):
        if stdout_open:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(1, view):]
            except BrokenPipeError:
                stdout_open = False  # the migration closed its side; keep draining the socket
    os.close(1)
    sender.join()


if __name__ == "__main__":
    main(sys.argv[1:])
