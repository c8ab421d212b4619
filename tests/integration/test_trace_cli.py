"""``vmigrate run --trace PATTERN``: trace points on the VM process's stderr, like QEMU's ``-trace``."""

from __future__ import annotations

from procs import wait_for


def test_trace_prints_the_matching_points(spawn):
    vm = spawn("vmigrate", "-m", "16M", "--trace", "ram_*", "--trace", "run_*,migrate_*")
    line = wait_for(lambda: next((s for s in vm.log().splitlines() if s.startswith("run_vm ")), None), 10,
                    "the run_vm trace line")
    assert "memory=16777216" in line and "accel=soft" in line and "incoming=None" in line


def test_no_trace_without_the_option(spawn):
    vm = spawn("vmigrate", "-m", "16M", "--trace", "ram_*")
    assert vm.status() == "running"
    assert "run_vm" not in vm.log()
