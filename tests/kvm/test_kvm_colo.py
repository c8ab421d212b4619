"""COLO with KVM vCPUs on both sides (docs/colo.md): the secondary's guest runs between
checkpoints and KVM's dirty log says what it wrote, which each checkpoint puts back."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from vmigrate.harness.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20


def counter(path: Path) -> int:
    magic, count = np.fromfile(path, dtype=np.uint64, count=2)
    return int(count) if magic.tobytes() == b"VMIGRATE" else 0


def checkpoints(vm) -> int:
    return vm.migrate_status().get("x-vmigrate-colo", {}).get("checkpoints", 0)


@pytest.mark.parametrize("accel", ["kvm", "kvm,dirty-ring-size=65536"], ids=["bitmap", "dirty-ring"])
def test_kvm_primary_killed_secondary_takes_over(spawn, tmp_path, accel):
    rams = {side: tmp_path / f"{side}.ram" for side in ("primary", "secondary")}
    common = ("-m", "64M", "--accel", accel, "--guest", "ab:end=24M")
    src = spawn("vmigrate", *common, "--mem-path", str(rams["primary"]))
    dst = spawn("vmigrate", *common, "--mem-path", str(rams["secondary"]), "-S", "--incoming", "tcp:127.0.0.1:0")
    port = dst.migrate_status()["socket-address"][0]["port"]
    src.set_caps(**{"x-colo": True})
    src.cmd("migrate-set-parameters", **{"x-checkpoint-delay": 100})
    wait_for(lambda: counter(rams["primary"]) > 0, 10, "guest start")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration({"colo", "failed"}, timeout=30)["status"] == "colo"
    wait_for(lambda: checkpoints(dst) >= 3, 30, "three checkpoints applied")
    wait_for(lambda: dst.status() == "running", 5, "the secondary's guest between checkpoints")

    before = counter(rams["primary"])
    done = checkpoints(src)
    wait_for(lambda: checkpoints(src) > done, 10, "a checkpoint after the counter was read")
    os.kill(src.pid, signal.SIGKILL)
    src.proc.wait(10)
    wait_for(lambda: any(e["event"] == "COLO_EXIT" for e in dst.events(0.1)), 10, "COLO_EXIT")
    dst.cmd("x-colo-lost-heartbeat")
    assert dst.wait_migration({"completed"}, timeout=10)["status"] == "completed"
    wait_for(lambda: counter(rams["secondary"]) > before + 3, 10, "the secondary's guest to run on")
    dst.cmd("stop")
    passes = counter(rams["secondary"])
    column = np.fromfile(rams["secondary"], dtype=np.uint8)[MIB:24 * MIB:4096]
    # A KVM guest stops anywhere in a pass (tests/kvm/test_kvm_migration.py): this pass or the last.
    assert np.isin(column, [passes % 256, (passes - 1) % 256]).all(), "the ab pattern is broken on the secondary"
