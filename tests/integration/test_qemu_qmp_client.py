"""A vmigrate VM driven by the ``qemu.qmp`` library, the client QEMU users and QEMU's own scripts use.

Everything else drives VMs through vmigrate's QMP client; this keeps the
library's view covered: its greeting and negotiation (OOB enabled, as the
library asks whenever the server offers it), commands and errors, events,
and a file descriptor passed for ``getfd``.
"""

from __future__ import annotations

import socket

import pytest
from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol


@pytest.fixture
def library(spawn):
    """A vmigrate VM and a second connection to it, negotiated by ``qemu.qmp``."""
    vm = spawn("vmigrate", "-m", "16M", "--guest", "ab:end=4M")
    qmp = QEMUMonitorProtocol(str(vm.sock))
    qmp.settimeout(30)
    greeting = qmp.connect(negotiate=True)
    yield vm, qmp, greeting
    qmp.close()


def test_greeting_commands_and_errors(library):
    vm, qmp, greeting = library
    assert greeting["QMP"]["version"]["qemu"]["major"] == 7
    assert greeting["QMP"]["capabilities"] == ["oob"]
    assert qmp.cmd("query-status") == {"status": "running", "singlestep": False, "running": True}
    assert qmp.cmd_raw("migrate-set-parameters", {"downtime-limit": 500}) == {"return": {}}
    assert qmp.cmd("query-migrate-parameters")["downtime-limit"] == 500
    error = qmp.cmd_raw("migrate", {"uri": 1})["error"]
    assert error == {"class": "GenericError", "desc": "Invalid parameter type for 'uri', expected: string"}
    with pytest.raises(ExecuteError, match="The command nosuch has not been found"):
        qmp.cmd("nosuch")


def test_events_reach_the_library(library):
    vm, qmp, _ = library
    qmp.cmd("stop")
    qmp.cmd("cont")
    names = [qmp.pull_event(wait=10.0)["event"] for _ in range(2)]
    assert names == ["STOP", "RESUME"]
    assert vm.status() == "running"


def test_getfd_takes_a_descriptor_passed_by_the_library(library):
    _, qmp, _ = library
    a, b = socket.socketpair()
    with a, b:
        qmp.send_fd_scm(a.fileno())
        assert qmp.cmd_raw("getfd", {"fdname": "mig"}) == {"return": {}}
    assert qmp.cmd_raw("closefd", {"fdname": "mig"}) == {"return": {}}
    assert qmp.cmd_raw("closefd", {"fdname": "mig"})["error"]["desc"] == "File descriptor named 'mig' not found"
