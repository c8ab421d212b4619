"""set-vcpu-dirty-limit on a KVM guest with a dirty ring (docs/qemu/dirtyrate.md §7)."""

from __future__ import annotations

import pytest

from vmigrate.harness.waiting import wait_for
from vmigrate.machine.dirtylimit import throttle_step
from vmigrate.qmp.client import QMPClientError

RING = "kvm,dirty-ring-size=4096"  # 16 MiB of pages per ring: it fills, so the limit can bite


def test_dirty_limit_brings_a_vcpu_down_to_its_quota_and_cancel_releases_it(spawn):
    vm = spawn("vmigrate", "--accel", RING, "-m", "256M", "--guest", "stress:rate=200,wss=128M")
    assert vm.cmd("query-vcpu-dirty-limit") == []
    with pytest.raises(QMPClientError, match="incorrect cpu index specified"):
        vm.cmd("set-vcpu-dirty-limit", **{"cpu-index": 1, "dirty-rate": 50})
    vm.cmd("set-vcpu-dirty-limit", **{"cpu-index": 0, "dirty-rate": 50})

    def limited() -> dict | None:
        (entry,) = vm.cmd("query-vcpu-dirty-limit")
        return entry if abs(entry["current-rate"] - 50) <= 50 * 0.15 else None

    entry = wait_for(limited, 20, "the vCPU's dirty rate within 15 % of its quota")
    assert entry["limit-rate"] == 50 and entry["cpu-index"] == 0

    vm.cmd("cancel-vcpu-dirty-limit")
    assert vm.cmd("query-vcpu-dirty-limit") == []
    vm.cmd("calc-dirty-rate", **{"calc-time": 1, "mode": "dirty-ring"})
    info = wait_for(lambda: (i := vm.cmd("query-dirty-rate"))["status"] == "measured" and i, 10, "measured")
    # Released: well above the quota (the guest's own 200 MB/s needs an idle host).
    assert info["dirty-rate"] > 2 * 50, info


@pytest.mark.parametrize("quota, current, before, after", [
    (50, 50, 1000, 1000),        # on the quota: unchanged
    (50, 0, 1000, 0),            # nothing dirtied: no sleep
    (50, 200, 0, 3840000),       # far above: the whole step, 256 MiB x (1/50 - 1/200) s
    (150, 200, 0, 213333),       # near (within half the quota): half of 256 MiB x (1/150 - 1/200) s
    (200, 20, 500000, 0),        # far below: step down, clamped at 0
    (1, 200, 0, 10_000_000),     # clamped at ten seconds per ring
])
def test_throttle_step_solves_for_the_quota(quota, current, before, after):
    assert throttle_step(quota, current, before, ring_mib=256) == after
