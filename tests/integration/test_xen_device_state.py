"""xen-save-devices-state / xen-load-devices-state: device-only streams (docs/qemu/misc.md §5)."""

from __future__ import annotations

import pytest

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
