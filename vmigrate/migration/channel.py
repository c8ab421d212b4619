"""Migration transports: tcp, unix, vsock, exec and fd URIs, both directions.

Parsing a URI is synchronous (its errors are the ``migrate`` command's own);
connecting happens in the migration thread, so a refused connection ends the
migration in ``failed`` with an ``error-desc`` — the split QEMU 7.2 makes.
Every channel is a blocking byte pipe with ``write``/``read``; the
``shutdown`` method makes a blocked call in another thread fail at once,
which is how cancel interrupts a migration stuck on a full socket.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass

from vmigrate.migration import rdma
from vmigrate.migration.errors import MigrationError


class ChannelError(Exception):
    """An I/O failure; its text becomes the migration's ``error-desc``."""


@dataclass(frozen=True)
class MigrationAddress:
    """A parsed migration URI (QEMU's SocketAddress, or exec/fd)."""

    kind: str  # tcp | unix | vsock | exec | fd
    host: str = ""
    #: vsock's context id, a string checked when the socket is opened (as QEMU does).
    cid: str = ""
    #: A service string, resolved by getaddrinfo when the channel is opened (QEMU keeps it a string too).
    port: str = ""
    path: str = ""
    command: str = ""
    fdname: str = ""
    family: int = socket.AF_UNSPEC
    #: ``,to=N``: a listener tries ports port..N.
    to: int | None = None

    @property
    def multi_channel(self) -> bool:
        """Whether multifd / postcopy-preempt channels can be opened (QEMU: socket transports only)."""
        return self.kind in SOCKET_KINDS

    def describe(self) -> str:
        if self.kind == "vsock":
            return f"{self.cid}:{self.port}"
        return f"{self.host}:{self.port}" if self.kind == "tcp" else self.path


#: The transports QEMU opens through its socket address code (migration/socket.c).
SOCKET_KINDS = ("tcp", "unix", "vsock")


INVALID_PROTOCOL = "Parameter 'uri' expects a valid migration protocol"


def parse_uri(uri: str, incoming: bool = False) -> MigrationAddress:
    """Split a migration URI as QEMU 7.2 does, with its error texts.

    ``tcp:`` hands the rest to the socket-address parser (so ``tcp:unix:/x``
    is a unix socket, as in QEMU); ``unix:`` and ``vsock:`` go to it whole.
    """
    if uri.startswith("tcp:"):
        return _socket_address(uri[4:])
    if uri.startswith(("unix:", "vsock:")):
        return _socket_address(uri)
    if uri.startswith("rdma:"):
        try:
            addr = _inet_address(uri[5:])
        except MigrationError:
            raise rdma.bad_address(uri[5:]) from None
        raise rdma.refusal(addr.host, incoming)
    if uri.startswith("exec:"):
        return MigrationAddress("exec", command=uri[5:])
    if uri.startswith("fd:"):
        return MigrationAddress("fd", fdname=uri[3:])
    raise MigrationError(f"unknown migration protocol: {uri}" if incoming else INVALID_PROTOCOL)


def _socket_address(text: str) -> MigrationAddress:
    """QEMU's socket_parse: ``unix:PATH``, ``fd:NAME``, ``vsock:CID:PORT``, ``[tcp:]HOST:PORT[,opts]``."""
    if text.startswith("unix:"):
        if not text[5:]:
            raise MigrationError("invalid Unix socket address")
        return MigrationAddress("unix", path=text[5:])
    if text.startswith("fd:"):
        if not text[3:]:
            raise MigrationError("invalid file descriptor address")
        return MigrationAddress("fd", fdname=text[3:])
    if text.startswith("vsock:"):
        return _vsock_address(text[6:])
    return _inet_address(text[4:] if text.startswith("tcp:") else text)


def _vsock_address(text: str) -> MigrationAddress:
    """QEMU's vsock_parse: ``CID:PORT``, each kept as text until the socket is opened."""
    m = re.match(r"([^:]{1,32}):([^,]{1,32})", text)
    if not m:
        raise MigrationError(f"error parsing address '{text}'")
    if m.end() != len(text):
        raise MigrationError(f"trailing characters in address '{text}'")
    return MigrationAddress("vsock", cid=m.group(1), port=m.group(2))


def vsock_sockaddr(addr: MigrationAddress) -> tuple[int, int]:
    """QEMU's vsock_parse_vaddr_to_sockaddr: both numbers decimal and 32-bit, as parse_uint_full takes them.

    Raises ChannelError: outgoing, its text is the migration's ``error-desc``.
    """
    numbers = []
    for what, text in (("cid", addr.cid), ("port", addr.port)):
        if not re.fullmatch(r"[ \t\n\v\f\r]*\+?[0-9]+", text) or int(text) > 0xFFFFFFFF:
            raise ChannelError(f"Failed to parse {what} '{text}'")
        numbers.append(int(text))
    return numbers[0], numbers[1]


def _inet_address(text: str) -> MigrationAddress:
    """QEMU's inet_parse: the sscanf patterns, then the ``,to=`` and flag options."""
    if text.startswith(":"):
        m = re.match(r":([^,]{1,32})", text)
        if not m:
            raise MigrationError(f"error parsing port in address '{text}'")
        host, port = "", m.group(1)
    elif text.startswith("["):
        m = re.match(r"\[([^\]]{1,64})\]:([^,]{1,32})", text)
        if not m:
            raise MigrationError(f"error parsing IPv6 address '{text}'")
        host, port = m.groups()
    else:
        m = re.match(r"([^:]{1,64}):([^,]{1,32})", text)
        if not m:
            raise MigrationError(f"error parsing address '{text}'")
        host, port = m.groups()
    options = text[m.end():]
    to = None
    pos = options.find(",to=")
    if pos >= 0:
        tm = re.match(r"[+-]?\d+(?=,|$)", options[pos + 4:])
        if not tm:
            raise MigrationError("error parsing to= argument")
        to = int(tm.group())
    flags = {name: _inet_flag(name, options) for name in ("ipv4", "ipv6", "keep-alive", "mptcp")}
    return MigrationAddress("tcp", host=host, port=port, family=_inet_family(host, flags["ipv4"], flags["ipv6"]), to=to)


def _inet_flag(name: str, options: str) -> bool | None:
    """``,NAME``, ``,NAME=on`` or ``,NAME=off``; None when absent."""
    pos = options.find("," + name)
    if pos < 0:
        return None
    rest = options[pos + 1 + len(name):]
    end = rest.find(",")
    if end >= 0 and rest[end + 1 : end + 2] == ",":
        raise MigrationError(f"error parsing '{name}' flag '{rest}'")
    value = rest if end < 0 else rest[:end]
    if value in ("", "=on"):
        return True
    if value == "=off":
        return False
    raise MigrationError(f"error parsing '{name}' flag '{rest}'")


def _inet_family(host: str, ipv4: bool | None, ipv6: bool | None) -> int:
    """QEMU's inet_ai_family_from_address."""
    if ipv4 is False and ipv6 is False:
        raise MigrationError("Cannot disable IPv4 and IPv6 at same time")
    if ipv4 and ipv6:
        return socket.AF_INET6 if not host else socket.AF_UNSPEC
    if ipv6 or ipv4 is False:
        return socket.AF_INET6
    if ipv4 or ipv6 is False:
        return socket.AF_INET
    return socket.AF_UNSPEC


def resolve(addr: MigrationAddress, passive: bool = False) -> list:
    """getaddrinfo for a tcp address, failing with QEMU's text.

    Only a listener narrows the address family by the ipv4/ipv6 flags; QEMU's
    outgoing connect resolves without them.
    """
    try:
        return socket.getaddrinfo(addr.host or None, addr.port or None,
                                  family=addr.family if passive else socket.AF_UNSPEC,
                                  type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE if passive else 0)
    except socket.gaierror as err:
        raise ChannelError(f"address resolution failed for {addr.host}:{addr.port}: {err.strerror}") from None


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

    def writev(self, buffers: list) -> None:
        """Write several buffers in order (one gathered send where the transport can)."""
        for buffer in buffers:
            self.write(buffer)

    def recv_into(self, view: memoryview) -> int:
        """Read into *view* (multifd's payloads land in place); 0 at end of stream."""
        data = self.read(len(view))
        view[:len(data)] = data
        return len(data)

    def shutdown(self) -> None:
        """Make blocked reads/writes in other threads fail now."""

    def drain(self, timeout: float) -> None:
        """Half-close and discard input until the peer closes (or *timeout* s).

        Closing a socket with unread input resets the connection, which can
        destroy the last message written; draining first lets it arrive.
        """

    def close(self) -> None:
        raise NotImplementedError

    def fileno(self) -> int:
        """The descriptor reads come from (to wait for input without reading)."""
        raise NotImplementedError

    @property
    def bidirectional(self) -> bool:
        """Whether the return path runs over this channel."""
        return False

    @property
    def two_way(self) -> bool:
        """Whether bytes flow both ways, as a TLS session needs (docs/tls.md, "exec: and fd:")."""
        return self.bidirectional


#: A TCP peer that acknowledges nothing for this long is gone (docs/postcopy.md, "Recovery").
DEAD_LINK_SECONDS = 20
_KEEPALIVE_INTERVAL = 2


def _detect_dead_links(sock: socket.socket) -> None:
    """Make a dead link an error within :data:`DEAD_LINK_SECONDS`, on either side.

    QEMU leaves its sockets at the kernel's defaults: data that a cut link
    never acknowledges is retransmitted for about 15 minutes, and a reader
    with nothing to send waits for ever, so neither a precopy nor a postcopy
    notices a cable pulled out.  A user timeout fails the writer, keepalive
    probes the reader; a postcopy then pauses and can be recovered.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    probes = 5
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, DEAD_LINK_SECONDS - probes * _KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, DEAD_LINK_SECONDS * 1000)


class SocketChannel(Channel):
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _detect_dead_links(sock)
        self._closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

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

    def writev(self, buffers: list) -> None:
        try:
            sendmsg_all(self.sock, buffers)
        except OSError as err:
            raise ChannelError(f"Unable to write to socket: {os.strerror(err.errno or 32)}") from None

    def recv_into(self, view: memoryview) -> int:
        try:
            return self.sock.recv_into(view)
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
    """``exec:``: ``/bin/sh -c COMMAND`` with a pipe on its stdin and one on its stdout, whichever
    the direction, as QEMU 7.2 spawns it (``O_RDWR``; docs/tls.md, "exec: and fd:").

    The stream goes to the command's stdin (outgoing) or comes from its stdout (incoming);
    the other pipe carries the peer's side of a TLS session.  Without TLS the return path
    does not use it (:attr:`bidirectional` is false), so a plain ``exec:`` migration behaves
    as a one-way one.
    """

    def __init__(self, command: str, outgoing: bool) -> None:
        self.outgoing = outgoing
        self.proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._write_fd = self.proc.stdin.fileno()
        self._read_fd = self.proc.stdout.fileno()

    def fileno(self) -> int:
        return self._read_fd

    @property
    def two_way(self) -> bool:
        return True

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.write(self._write_fd, view)
                view = view[n:]
        except OSError as err:
            raise ChannelError(f"Unable to write to command: {os.strerror(err.errno or 32)}") from None

    def read(self, size: int) -> bytes:
        try:
            return os.read(self._read_fd, size)
        except OSError as err:
            raise ChannelError(f"Unable to read from command: {os.strerror(err.errno or 5)}") from None

    def shutdown(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self) -> None:
        """Both pipes closed, then the command reaped (QEMU's qio_channel_command_close): the
        command sees the end of its input; a source waits for it to finish writing the stream."""
        self.proc.stdin.close()
        self.proc.stdout.close()
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

    def fileno(self) -> int:
        return self.fd

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
        last: OSError | None = None
        for family, kind, proto, _, sockaddr in resolve(addr):
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
    if addr.kind == "vsock":
        return _connect_vsock(addr)
    raise ValueError(f"not a socket address: {addr.kind}")


def _connect_vsock(addr: MigrationAddress) -> SocketChannel:
    """QEMU's vsock_connect_addr: a blocking connect, so the kernel's vsock connect timeout
    (2 s unless SO_VM_SOCKETS_CONNECT_TIMEOUT says otherwise) decides when it gives up."""
    sockaddr = vsock_sockaddr(addr)
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as err:
        raise ChannelError(f"Failed to create socket family {socket.AF_VSOCK}: "
                           f"{os.strerror(err.errno or errno.EAFNOSUPPORT)}") from None
    try:
        sock.connect(sockaddr)
    except OSError as err:
        sock.close()
        raise ChannelError(f"Failed to connect to '{addr.describe()}': "
                           f"{os.strerror(err.errno or errno.ETIMEDOUT)}") from None
    return SocketChannel(sock)


class Listener:
    """A listening socket for ``migrate-incoming tcp:/unix:/vsock:``."""

    def __init__(self, addr: MigrationAddress) -> None:
        self.addr = addr
        if addr.kind == "tcp":
            self.sock = self._bind_tcp(addr)
        elif addr.kind == "vsock":
            self.sock = self._bind_vsock(addr)
        else:
            self.sock = self._bind_unix(addr.path)
        #: Where we listen, fixed at bind time (query-migrate's ``socket-address``).
        self.address = self._socket_address()

    @staticmethod
    def _bind_unix(path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(path):
            os.unlink(path)
        try:
            sock.bind(path)
            sock.listen(16)
        except OSError as err:
            sock.close()
            raise MigrationError(f"Failed to bind socket to {path}: {os.strerror(err.errno or 98)}") from None
        return sock

    @staticmethod
    def _bind_vsock(addr: MigrationAddress) -> socket.socket:
        """QEMU's vsock_listen_saddr, with its texts."""
        try:
            sockaddr = vsock_sockaddr(addr)
        except ChannelError as err:
            raise MigrationError(str(err)) from None
        try:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        except OSError as err:
            raise MigrationError(f"Failed to create socket: {os.strerror(err.errno or errno.EAFNOSUPPORT)}") from None
        for step, what in ((lambda: sock.bind(sockaddr), "bind socket"), (lambda: sock.listen(16), "listen on socket")):
            try:
                step()
            except OSError as err:
                sock.close()
                raise MigrationError(f"Failed to {what}: {os.strerror(err.errno or errno.EINVAL)}") from None
        return sock

    @staticmethod
    def _bind_tcp(addr: MigrationAddress) -> socket.socket:
        """Like QEMU's inet_listen_saddr: each resolved address, ports port..to, first that binds."""
        try:
            infos = resolve(addr, passive=True)
        except ChannelError as err:
            raise MigrationError(str(err)) from None
        error = errno.EADDRINUSE
        for family, kind, proto, _, sockaddr in infos:
            first = sockaddr[1]
            for port in range(first, (addr.to if addr.to is not None else first) + 1):
                sock = socket.socket(family, kind, proto)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((sockaddr[0], port, *sockaddr[2:]))
                    sock.listen(16)
                    return sock
                except OSError as err:
                    sock.close()
                    error = err.errno or error
                    if error != errno.EADDRINUSE:
                        raise MigrationError(f"Failed to bind socket: {os.strerror(error)}") from None
        raise MigrationError(f"Failed to find an available port: {os.strerror(error)}")

    def _socket_address(self) -> dict:
        """The bound address as QMP's SocketAddress (port 0 resolved; the port is a string)."""
        if self.addr.kind == "unix":
            return {"type": "unix", "path": self.addr.path}
        if self.addr.kind == "vsock":
            # QEMU's member order for a vsock SocketAddress, as query-migrate sends it.
            cid, port = self.sock.getsockname()
            return {"port": str(port), "cid": str(cid), "type": "vsock"}
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


# -- zero-copy sends (QEMU's io/channel-socket.c, QIO_CHANNEL_WRITE_FLAG_ZERO_COPY) --

SO_ZEROCOPY = 60
MSG_ZEROCOPY = 0x4000000
SO_EE_ORIGIN_ZEROCOPY = 5
SO_EE_CODE_ZEROCOPY_COPIED = 1
_SOCK_EE = struct.Struct("=IBBBBII")


#: Bound on each wait for zero-copy completions, so a stop request is seen.
ZERO_COPY_POLL_SLICE = 0.5


def sendmsg_all(sock: socket.socket, buffers: list, flags: int = 0) -> int:
    """Write every buffer, resuming after partial writes; returns the sendmsg calls made."""
    views = [memoryview(b).cast("B") for b in buffers]
    calls = 0
    while views:
        sent = sock.sendmsg(views, [], flags)
        calls += 1
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]
    return calls


class ZeroCopySocket:
    """MSG_ZEROCOPY bookkeeping of one socket (QEMU's zero_copy_queued/sent)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.queued = 0
        self.done = 0

    @staticmethod
    def enable(sock: socket.socket) -> bool:
        """SO_ZEROCOPY; False where the kernel or the socket type cannot do it (e.g. AF_UNIX)."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
        except OSError:
            return False
        return True

    def send(self, buffers: list) -> None:
        try:
            self.queued += sendmsg_all(self.sock, buffers, MSG_ZEROCOPY)
        except OSError as err:
            if err.errno == errno.ENOBUFS:
                raise ChannelError("Process can't lock enough memory for using MSG_ZEROCOPY") from None
            raise

    def flush(self, stop: threading.Event) -> bool:
        """Wait for every queued send's completion; True if all of them fell back to copying."""
        if self.done == self.queued:
            return False
        copied_only = True
        poller = select.poll()
        poller.register(self.sock, select.POLLERR)
        while self.done < self.queued:
            if stop.is_set():
                raise ChannelError("multifd channel stopped while flushing zero-copy sends")
            try:
                _, ancdata, _, _ = self.sock.recvmsg(0, 256, socket.MSG_ERRQUEUE)
            except BlockingIOError:
                poller.poll(int(ZERO_COPY_POLL_SLICE * 1000))
                continue
            for _level, _type, data in ancdata:
                ee_errno, origin, _kind, code, _pad, info, last = _SOCK_EE.unpack_from(data)
                if ee_errno:
                    raise ChannelError(f"Error on socket: {os.strerror(ee_errno)}")
                if origin != SO_EE_ORIGIN_ZEROCOPY:
                    raise ChannelError("Error not from zero copy")
                self.done += last - info + 1
                if not code & SO_EE_CODE_ZEROCOPY_COPIED:
                    copied_only = False
        return copied_only
