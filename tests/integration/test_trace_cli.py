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


def test_migration_trace_points_follow_the_status_table(spawn):
    """Both sides trace each status change and the section loop, as QEMU's ``-trace migrate_*`` would."""
    points = "migrate_set_state,savevm_state_*,loadvm_state_setup,migration_thread_setup_complete"
    src = spawn("vmigrate", "-m", "16M", "--trace", points)
    dst = spawn("vmigrate", "-m", "16M", "--trace", points, "--incoming", "tcp:127.0.0.1:0")
    port = dst.migrate_status()["socket-address"][0]["port"]
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration({"completed", "failed"}, timeout=60)["status"] == "completed"
    assert dst.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"

    def traced(vm) -> list[str]:
        return [line for line in vm.log().splitlines() if line.split(" ")[0] in (
            "migrate_set_state", "savevm_state_setup", "savevm_state_complete_precopy", "loadvm_state_setup",
            "migration_thread_setup_complete")]

    assert traced(src) == ["migrate_set_state new_state=setup", "savevm_state_setup",
                           "migrate_set_state new_state=active", "migration_thread_setup_complete",
                           "savevm_state_complete_precopy", "migrate_set_state new_state=completed"]
    assert traced(dst) == ["migrate_set_state new_state=active", "loadvm_state_setup",
                           "migrate_set_state new_state=completed"]
