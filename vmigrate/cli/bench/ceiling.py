"""The ceiling: how fast two Python processes can move the same bytes over tcp loopback at all."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def loopback_sender(port: int, nbytes: int, chunk: int) -> None:
    """Child side of :func:`loopback_ceiling`: ``sendall`` of one large buffer until *nbytes* went."""
    buf = memoryview(os.urandom(chunk))
    with socket.create_connection(("127.0.0.1", port)) as s:
        left = nbytes
        while left > 0:
            n = min(chunk, left)
            s.sendall(buf[:n])
            left -= n


def loopback_ceiling(nbytes: int, chunk: int = 8 << 20, timeout: float = 300.0) -> dict:
    """Seconds two Python processes need to move *nbytes* over tcp loopback (``sendall`` → ``recv_into``)."""
    code = f"from vmigrate.cli.bench.ceiling import loopback_sender; loopback_sender({{}}, {nbytes}, {chunk})"
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(30)
        port = srv.getsockname()[1]
        child = subprocess.Popen([sys.executable, "-c", code.format(port)])
        try:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(timeout)
                view = memoryview(bytearray(chunk))
                got = 0
                t0 = time.perf_counter()
                while got < nbytes:
                    n = conn.recv_into(view)
                    if not n:
                        break
                    got += n
                seconds = time.perf_counter() - t0
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=10)
    status = "completed" if got == nbytes else "failed"
    return {"impl": "ceiling", "scenario": "precopy", "status": status, "bytes": got, "wall_s": round(seconds, 4),
            "mib_s": round(got / (1 << 20) / seconds, 1) if seconds else None}
