"""set-vcpu-dirty-limit on a KVM guest with a dirty ring (dirtyrate.md §7)."""

from __future__ import annotations

import pytest

from procs import QMPCommandError, wait_for
from vmigrate.migration.dirtylimit import throttle_step

RING = "kvm,dirty-ring-size=4096"  # 16 MiB of pages per ring: it fills, so the limit can bite


def test_dirty_limit_brings_a_vcpu_down_to_its_quota_and_cancel_releases_it(spawn):
    vm = spawn("vmigrate", "--accel", RING, "-m", "256M", "--guest", "stress:rate=200,wss=128M")
    assert vm.cmd("query-vcpu-dirty-limit") == []
    with pytest.raises(QMPCommandError, match="incorrect cpu index specified"):
        vm.cmd("set-vcpu-dirty-limit", **{"cpu-index": 1, "dirty-rate": 50})
    vm.cmd("set-vcpu-dirty-limit", **{"cpu-index": 0, "dirty-rate": 50})

    def limited() -> dict | None:
        (entry,) = vm.cmd("query-vcpu-dirty-limit")
        return entry if 0 < entry["current-rate"] <= 50 + 25 else None

    entry = wait_for(limited, 20, "the vCPU's dirty rate within QEMU's 25 MiB/s tolerance of its quota")
    assert entry["limit-rate"] == 50 and entry["cpu-index"] == 0

    vm.cmd("cancel-vcpu-dirty-limit")
    assert vm.cmd("query-vcpu-dirty-limit") == []
    vm.cmd("calc-dirty-rate", **{"calc-time": 1, "mode": "dirty-ring"})
    info = wait_for(lambda: (i := vm.cmd("query-dirty-rate"))["status"] == "measured" and i, 10, "measured")
    assert info["dirty-rate"] > 150, info


@pytest.mark.parametrize("quota, current, before, after", [
    (50, 60, 1000, 1000),        # within the 25 MiB/s tolerance: unchanged
    (50, 0, 1000, 0),            # nothing dirtied: no sleep
    (50, 200, 0, 3840000),       # far above: proportional step, 75 % of 256 MiB at 200 MiB/s x 3
    (150, 200, 0, 128000),       # close (25 %): a tenth of the time to fill the ring
    (200, 20, 500000, 0),        # far below: step down, clamped at 0
])
def test_throttle_step_follows_qemus_rule(quota, current, before, after):
    assert throttle_step(quota, current, before, ring_mib=256, max_rate=200) == after
