"""Fixtures that start vmigrate VMs and real QEMU 7.2 processes and always clean up."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from procs import VMProcess, qemu_argv, test_env, vmigrate_argv  # noqa: E402

_counter = itertools.count()


@pytest.fixture
def spawn(tmp_path: Path):
    """``spawn("vmigrate", *args)`` / ``spawn("qemu", *args, memory=, mem_path=)`` → VMProcess."""
    procs: list[VMProcess] = []

    def start(kind: str, *args: str, **kw) -> VMProcess:
        n = next(_counter)
        sock = tmp_path / f"{kind}{n}.sock"
        log = tmp_path / f"{kind}{n}.log"
        if kind == "vmigrate":
            argv, tool_sock = vmigrate_argv(sock, *args), sock
        else:
            # A QEMU monitor serves one client at a time: tools get a second one.
            tool_sock = tmp_path / f"{kind}{n}.tool.sock"
            argv = qemu_argv(sock, "-qmp", f"unix:{tool_sock},server=on,wait=off", *args, **kw)
        proc = VMProcess(argv, sock, log, env=test_env(), started=procs.append)
        proc.tool_sock = tool_sock
        return proc

    yield start
    for proc in procs:
        proc.close()
