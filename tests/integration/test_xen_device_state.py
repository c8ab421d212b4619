"""xen-save-devices-state / xen-load-devices-state: device-only streams (docs/qemu/misc.md §5)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from procs import peak_rss
from vmigrate.machine import devices as D
from vmigrate.migration.wire import stream, vmstate
from vmigrate.qmp.client import QMPClientError


def test_save_writes_a_device_only_stream_and_load_reads_it(spawn, tmp_path):
    vm = spawn("vmigrate", "-m", "16M", "--accel", "soft")  # the device set of -M none
    vm.events()
    path = tmp_path / "devices.bin"
    vm.cmd("xen-save-devices-state", filename=str(path))
    assert [e["event"] for e in vm.events(wait=0.2)] == ["STOP", "RESUME"]
    assert vm.status() == "running"

    decoder = stream.StreamDecoder(D.none_machine_bodies(), require_configuration=False)
    decoder.feed(path.read_bytes())
    decoder.close()
    events = []
    while (ev := decoder.next_event()) is not stream.NEED_DATA and not isinstance(ev, stream.EOF):
        events.append(ev)
    states = {e.idstr: e.values for e in events if isinstance(e, vmstate.DeviceState)}
    assert set(states) == {"timer", "globalstate"}
    assert D.globalstate_runstate(states["globalstate"]) == "running"

    with pytest.raises(QMPClientError, match="Cannot update device state while vm is running"):
        vm.cmd("xen-load-devices-state", filename=str(path))
    vm.cmd("stop")
    vm.cmd("xen-load-devices-state", filename=str(path))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(QMPClientError, match="An IO error has occurred"):
        vm.cmd("xen-load-devices-state", filename=str(path))
    with pytest.raises(QMPClientError, match="Unable to open /nonexistent/x: No such file or directory"):
        vm.cmd("xen-load-devices-state", filename="/nonexistent/x")
    with pytest.raises(QMPClientError, match="Unable to open /nonexistent/x: No such file or directory"):
        vm.cmd("xen-save-devices-state", filename="/nonexistent/x")


def endless_writer(fifo: Path) -> threading.Thread:
    """A thread writing zeros into *fifo* until its reader goes away."""
    def run() -> None:
        try:
            with open(fifo, "wb", buffering=0) as f:
                while True:
                    f.write(bytes(1 << 16))
        except BrokenPipeError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_load_refuses_huge_endless_and_stalled_files(spawn, tmp_path):
    """Past 16 MiB or 2 s the file is no device state stream: an IO error, answered at once,
    memory bounded, the monitor still serving."""
    vm = spawn("vmigrate", "-m", "16M", "--accel", "soft", "-S")
    rss = peak_rss(vm)
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as f:
        f.truncate(64 << 30)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = endless_writer(fifo)
    stalled = tmp_path / "stalled"
    os.mkfifo(stalled)
    held = os.open(stalled, os.O_RDWR)  # a writer that never writes
    try:
        for name, limit in (("/dev/zero", 10), (str(sparse), 1), (str(fifo), 10), (str(stalled), 6)):
            start = time.monotonic()
            with pytest.raises(QMPClientError, match="^GenericError: An IO error has occurred$"):
                vm.cmd("xen-load-devices-state", filename=name)
            assert time.monotonic() - start < limit, name
            assert vm.status() == "prelaunch"
    finally:
        os.close(held)
    writer.join(10)
    assert not writer.is_alive()
    assert peak_rss(vm) - rss < 64 << 20
