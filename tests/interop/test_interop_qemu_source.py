"""Real QEMU 7.2 migrating into vmigrate over tcp, unix and exec.

QEMU's RAM is a shared file the test fills with a pattern while QEMU runs;
vmigrate's destination RAM starts out with stale bytes, so only a complete
and exact load makes the two files equal.
"""

from __future__ import annotations

import pytest

import event_trace as trace
from capture import analyze, ram_accounting
from machines import Machines
from query_stats import check_completed
from ramfile import fill_garbage, fill_pattern, first_difference
from transport import Transport, migrate, settle

pytestmark = pytest.mark.timeout(90)

#: Lift QEMU's default 32 MiB/s limit: these tests are about content, not convergence.
FAST = 10 << 30

CASES = [
    # transport, RAM size, QEMU stopped first, vmigrate -S, destination run state
    pytest.param("tcp", "256M", False, False, "running", id="tcp-running"),
    pytest.param("unix", "128M", False, True, "paused", id="unix-dst-S"),
    pytest.param("exec", "128M", True, False, "paused", id="exec-src-stopped"),
]


@pytest.mark.parametrize("name,size,stop_source,dst_paused,dst_state", CASES)
def test_qemu_to_vmigrate(machines: Machines, name, size, stop_source, dst_paused, dst_state) -> None:
    src = machines.qemu(size)
    written = fill_pattern(src.ram, src.size, seed=len(name))
    src.vm.cmd("migrate-set-parameters", **{"max-bandwidth": FAST})
    if stop_source:
        src.vm.cmd("stop")
        assert trace.collect(src.vm, "STOP") == ["STOP"]

    def start_dst():
        ram = machines.ram_path("vmigrate")
        fill_garbage(ram, src.size)
        return machines.vmigrate(size, "--incoming", "defer", *(["-S"] if dst_paused else []), ram=ram)

    transport = Transport(name, machines.ramdir)
    dst = migrate(transport, src, start_dst)
    dst.require_alive()

    info = src.vm.migrate_status()
    ram = check_completed(info, src.size)
    assert dst.vm.migrate_status() == {"status": "completed"}
    assert src.vm.status() == "postmigrate"
    assert dst.vm.status() == dst_state
    assert first_difference(src.ram, dst.ram, src.size) is None
    assert ram["normal"] >= len(written)
    if name == "exec":
        # Validates capture.ram_accounting against QEMU itself.
        report = analyze(transport.capture)
        assert report["ram"]["blocks"] == [{"idstr": "ram", "used_length": src.size}]
        assert ram_accounting(report) == {k: ram[k] for k in ("normal", "duplicate", "transferred")}

    passes = trace.check_source(trace.collect(src.vm, "completed"), was_running=not stop_source)
    assert passes == ram["dirty-sync-count"]
    trace.check_destination(trace.collect(dst.vm, "completed"), resumes=dst_state == "running")


@pytest.mark.parametrize("dst_kind", ["qemu", "vmigrate"])
def test_incoming_on_command_line(machines: Machines, tmp_path, dst_kind) -> None:
    """``-incoming unix:PATH`` at startup; both destinations behave alike, including no ``setup`` event seen."""
    sock = tmp_path / "incoming.sock"
    src = machines.qemu("64M")
    fill_pattern(src.ram, src.size, seed=7, random_pages=1024)
    src.vm.cmd("migrate-set-parameters", **{"max-bandwidth": FAST})
    dst = machines.start(dst_kind, "64M", "-incoming", f"unix:{sock}")
    assert dst.vm.status() == "inmigrate"
    src.vm.cmd("migrate", uri=f"unix:{sock}")
    assert src.vm.wait_migration({"completed", "failed"})["status"] == "completed"
    settle(dst, timeout=30)
    dst.require_alive()
    assert dst.vm.migrate_status() == {"status": "completed"}
    assert dst.vm.status() == "running"
    assert first_difference(src.ram, dst.ram, src.size) is None
    assert trace.collect(dst.vm, "completed") == ["active", "RESUME", "completed"]
