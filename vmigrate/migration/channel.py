"""Migration transports: tcp, unix, exec and fd URIs, both directions.

Parsing a URI is synchronous (its errors are the ``migrate`` command's own);
connecting happens in the migration thread, so a refused connection ends the
migration in ``failed`` with an ``error-desc`` — the split QEMU 7.2 makes.
Every channel is a blocking byte pipe with ``write``/``read``; the
``shutdown`` method makes a blocked call in another thread fail at once,
which is how cancel interrupts a migration stuck on a full socket.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass

from vmigrate.qmp.errors import QMPError


class ChannelError(Exception):
    """An I/O failure; its text becomes the migration's ``error-desc``."""


@dataclass(frozen=True)
class MigrationAddress:
    """A parsed migration URI."""

    kind: str  # tcp | unix | exec | fd
    host: str = ""
    port: int = 0
    path: str = ""
    command: str = ""
    fdname: str = ""

    @property
    def multi_channel(self) -> bool:
        """Whether multifd / postcopy-preempt channels can be opened (QEMU: socket transports only)."""
        return self.kind in ("tcp", "unix")

    def describe(self) -> str:
        return f"{self.host}:{self.port}" if self.kind == "tcp" else self.path


def parse_uri(uri: str) -> MigrationAddress:
    """Split a migration URI; raises QMPError with QEMU's texts."""
    kind, sep, rest = uri.partition(":")
    if not sep:
        raise QMPError("Parameter 'uri' expects a valid migration protocol")
    if kind == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not port:
            raise QMPError(f"error parsing address '{rest}'")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            number = int(port)
        except ValueError:
            raise QMPError(f"error parsing address '{rest}'") from None
        if not 0 <= number <= 65535:
            raise QMPError(f"Port '{port}' out of range")
        return MigrationAddress("tcp", host=host or "0.0.0.0", port=number)
    if kind == "unix":
        return MigrationAddress("unix", path=rest)
    if kind == "exec":
        return MigrationAddress("exec", command=rest)
    if kind == "fd":
        return MigrationAddress("fd", fdname=rest)
    if kind == "rdma":
        raise QMPError("vmigrate does not implement RDMA migration (rdma:)")
    if kind == "vsock":
        raise QMPError("vmigrate does not implement vsock migration yet")
    raise QMPError("Parameter 'uri' expects a valid migration protocol")


class Channel:
    """A blocking, bidirectional (where the transport allows) byte channel."""

    def write(self, data) -> None:
        raise NotImplementedError

    def read(self, size: int) -> bytes:
        """Up to *size* bytes as a fresh ``bytes`` (b"" at end of stream).

        A new object per read lets the stream decoder keep slices of it
        without copying: the kernel writes the data where it is parsed.
        """
        raise NotImplementedError

    def shutdown(self) -> None:
        """Make blocked reads/writes in other threads fail now."""

    def drain(self, timeout: float) -> None:
        """Half-close and discard input until the peer closes (or *timeout* s).

        Closing a socket with unread input resets the connection, which can
        destroy the last message written; draining first lets it arrive.
        """

    def close(self) -> None:
        raise NotImplementedError

    @property
    def bidirectional(self) -> bool:
        return False


class SocketChannel(Channel):
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._closed = False

    @property
    def bidirectional(self) -> bool:
        return True

    def write(self, data) -> None:
        try:
            self.sock.sendall(data)
        except OSError as err:
            raise ChannelError(f"Unable to write to socket: {os.strerror(err.errno or 32)}") from None

    def read(self, size: int) -> bytes:
        try:
            return self.sock.recv(size)
        except OSError as err:
            raise ChannelError(f"Unable to read from socket: {os.strerror(err.errno or 104)}") from None

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        try:
            self.sock.shutdown(socket.SHUT_WR)
            scratch = bytearray(1 << 16)
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if self.sock.recv_into(scratch) == 0:
                    break
        except OSError:
            pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.sock.close()


class CommandChannel(Channel):
    """``exec:``: the shell command's stdin (outgoing) or stdout (incoming)."""

    def __init__(self, command: str, outgoing: bool) -> None:
        self.outgoing = outgoing
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            stdin=subprocess.PIPE if outgoing else subprocess.DEVNULL,
            stdout=None if outgoing else subprocess.PIPE,
        )
        self._fd = self.proc.stdin.fileno() if outgoing else self.proc.stdout.fileno()

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as err:
            raise ChannelError(f"Unable to write to command: {os.strerror(err.errno or 32)}") from None

    def read(self, size: int) -> bytes:
        try:
            return os.read(self._fd, size)
        except OSError as err:
            raise ChannelError(f"Unable to read from command: {os.strerror(err.errno or 5)}") from None

    def shutdown(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self) -> None:
        stream = self.proc.stdin if self.outgoing else self.proc.stdout
        stream.close()
        try:
            self.proc.wait(timeout=30 if self.outgoing else 1)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class FdChannel(Channel):
    """``fd:NAME``: a descriptor passed with ``getfd``; a socket if it is one."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            self.sock: socket.socket | None = socket.socket(fileno=fd)
        except OSError:
            self.sock = None
        self._inner = SocketChannel(self.sock) if self.sock is not None else None

    @property
    def bidirectional(self) -> bool:
        return self._inner is not None

    def write(self, data) -> None:
        if self._inner is not None:
            return self._inner.write(data)
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as err:
            raise ChannelError(f"Unable to write to file: {os.strerror(err.errno or 5)}") from None

    def read(self, size: int) -> bytes:
        if self._inner is not None:
            return self._inner.read(size)
        try:
            return os.read(self.fd, size)
        except OSError as err:
            raise ChannelError(f"Unable to read from file: {os.strerror(err.errno or 5)}") from None

    def shutdown(self) -> None:
        if self._inner is not None:
            self._inner.shutdown()

    def drain(self, timeout: float) -> None:
        if self._inner is not None:
            self._inner.drain(timeout)

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
        else:
            os.close(self.fd)


def connect(addr: MigrationAddress, timeout: float = 30.0) -> Channel:
    """Open the outgoing channel for a socket address (raises ChannelError)."""
    if addr.kind == "tcp":
        try:
            infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise ChannelError(f"address resolution failed for {addr.host}:{addr.port}: {err.strerror}") from None
        last: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            sock.settimeout(timeout)
            try:
                sock.connect(sockaddr)
                return SocketChannel(sock)
            except OSError as err:
                last = err
                sock.close()
        reason = os.strerror(last.errno) if last is not None and last.errno else "Connection timed out"
        raise ChannelError(f"Failed to connect to '{addr.describe()}': {reason}")
    if addr.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(addr.path)
        except OSError as err:
            sock.close()
            raise ChannelError(f"Failed to connect to '{addr.path}': {os.strerror(err.errno or 111)}") from None
        return SocketChannel(sock)
    raise ValueError(f"not a socket address: {addr.kind}")


class Listener:
    """A listening socket for ``migrate-incoming tcp:/unix:``."""

    def __init__(self, addr: MigrationAddress) -> None:
        self.addr = addr
        if addr.kind == "tcp":
            try:
                infos = socket.getaddrinfo(addr.host or None, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            except socket.gaierror as err:
                raise QMPError(f"address resolution failed for {addr.host}:{addr.port}: {err.strerror}") from None
            family, kind, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockaddr = addr.path
            if os.path.exists(addr.path):
                os.unlink(addr.path)
        try:
            sock.bind(sockaddr)
            sock.listen(16)
        except OSError as err:
            sock.close()
            raise QMPError(f"Failed to bind socket: {os.strerror(err.errno or 98)}") from None
        self.sock = sock
        #: Where we listen, fixed at bind time (query-migrate's ``socket-address``).
        self.address = self._socket_address()

    def _socket_address(self) -> dict:
        """The bound address as QMP's SocketAddress (port 0 resolved; the port is a string)."""
        if self.addr.kind == "unix":
            return {"type": "unix", "path": self.addr.path}
        host, port = self.sock.getsockname()[:2]
        info = {"type": "inet", "host": host, "port": str(port)}
        info["ipv6" if self.sock.family == socket.AF_INET6 else "ipv4"] = True
        return info

    def accept(self) -> SocketChannel:
        try:
            sock, _ = self.sock.accept()
        except OSError as err:
            raise ChannelError(f"Failed to accept migration connection: {os.strerror(err.errno or 5)}") from None
        return SocketChannel(sock)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.addr.kind == "unix" and os.path.exists(self.addr.path):
            os.unlink(self.addr.path)
