"""Both ends of a TLS handshake over a socket pair, for the channel unit tests."""

from __future__ import annotations

import socket
import threading

from typing import Mapping

from vmigrate.migration.channel import SocketChannel
from vmigrate.migration.tls import TlsError, client_channel, server_channel


def handshake(objects: Mapping[str, object], server: str, client: str, hostname: str = "",
              authz_id: str = "") -> tuple:
    """(client end, server end): each a TLS channel, or the TlsError its side raised; the
    client checks *hostname* where its credentials verify the server."""
    a, b = socket.socketpair()
    result: dict = {}

    def serve() -> None:
        try:
            result["server"] = server_channel(SocketChannel(b), objects, server, authz_id=authz_id)
        except TlsError as err:
            result["server"] = err
            b.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        result["client"] = client_channel(SocketChannel(a), objects, client, hostname)
    except TlsError as err:
        result["client"] = err
        a.close()
    thread.join(10)
    return result["client"], result["server"]
