"""Precopy between two vmigrate processes over ``vsock:`` (AF_VSOCK, the local CID 1).

Only where the kernel has a vsock transport that loops back (``vsock_loopback``);
elsewhere the test is skipped.  The answers where vsock cannot connect or bind
are compared with QEMU 7.2 in tests/conformance/test_migration_commands.py.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

VMADDR_CID_LOCAL = 1
LOOPBACK_TIMEOUT_S = 1.0


def vsock_loopback() -> str | None:
    """None if a connect to CID 1 reaches a local listener within a second, else why not."""
    try:
        listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except (AttributeError, OSError) as err:
        return f"no AF_VSOCK sockets: {err}"
    with listener:
        try:
            listener.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
            listener.listen(1)
        except OSError as err:
            return f"cannot listen on vsock: {err}"
        port = listener.getsockname()[1]
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as client:
            client.settimeout(LOOPBACK_TIMEOUT_S)
            try:
                client.connect((VMADDR_CID_LOCAL, port))
            except OSError as err:
                return f"no vsock loopback transport (connect to CID 1: {err or 'timed out'})"
    return None


_NO_LOOPBACK = vsock_loopback()


def ram(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8)


@pytest.mark.skipif(_NO_LOOPBACK is not None, reason=_NO_LOOPBACK or "")
def test_precopy_over_vsock(spawn, tmp_path):
    """The destination listens on every CID, the source connects to the local one."""
    src = spawn("vmigrate", "-m", "32M", "--mem-path", str(tmp_path / "s.ram"), "--guest", "ab:end=8M")
    dst = spawn("vmigrate", "-m", "32M", "--mem-path", str(tmp_path / "d.ram"), "--guest", "ab:end=8M", "-S",
                "--incoming", "defer")
    dst.cmd("migrate-incoming", uri=f"vsock:{socket.VMADDR_CID_ANY}:{socket.VMADDR_PORT_ANY}")
    address = dst.migrate_status()["socket-address"][0]
    assert address["type"] == "vsock" and address["cid"] == str(socket.VMADDR_CID_ANY), address
    src.cmd("migrate", uri=f"vsock:{VMADDR_CID_LOCAL}:{address['port']}")
    info = src.wait_migration({"completed", "failed", "cancelled"}, timeout=60)
    assert info["status"] == "completed", info
    assert dst.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    assert src.status() == "postmigrate" and dst.status() == "paused"
    assert np.array_equal(ram(tmp_path / "s.ram"), ram(tmp_path / "d.ram"))
