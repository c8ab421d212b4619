"""A KVM guest that runs on the destination before its RAM has arrived (docs/qemu/postcopy.md §4).

The x86 ``ab`` program's accesses to missing pages fault inside KVM_RUN;
KVM resolves them through the destination's userfaultfd, which turns them
into page requests, exactly as a software vCPU's faults.  The letters the
guest prints on its UART must continue the source's sequence without a
gap.  RAM lives on /dev/shm: userfaultfd serves shared memory only there.
"""

from __future__ import annotations

import time

import numpy as np

from procs import wait_guest_passes
from test_kvm_migration import assert_letters_in_sequence, counter
from vmigrate.harness.waiting import wait_for

MIB = 1 << 20
FINAL = {"completed", "failed", "cancelled"}



def test_kvm_guest_runs_on_the_destination_during_postcopy(spawn, shm):
    files = {side: (shm / f"{side}.ram", shm / f"{side}.serial") for side in ("src", "dst")}
    common = ("-m", "64M", "--accel", "kvm", "--guest", "ab:end=24M")
    src = spawn("vmigrate", *common, "--mem-path", str(files["src"][0]), "--serial", str(files["src"][1]))
    dst = spawn("vmigrate", *common, "--mem-path", str(files["dst"][0]), "--serial", str(files["dst"][1]),
                "--incoming", "tcp:127.0.0.1:0")
    port = dst.migrate_status()["socket-address"][0]["port"]
    for vm in (src, dst):
        vm.set_caps(**{"postcopy-ram": True})
    # Past its first passes (the first touch of each page is slow): the guest then rewrites its
    # window faster than postcopy brings it, so it must fault.
    wait_guest_passes(files["src"][0], 4)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 * MIB, "max-postcopy-bandwidth": 8 * MIB})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    time.sleep(1.0)
    src.cmd("migrate-start-postcopy")
    info = src.wait_migration(FINAL, timeout=30)
    assert info["status"] == "completed", info
    assert info["ram"]["postcopy-requests"] > 0, f"the KVM vCPU must have faulted on missing pages: {info}"
    assert dst.wait_migration(FINAL, timeout=10)["status"] == "completed"
    before = files["src"][1].read_bytes()

    wait_for(lambda: len(files["dst"][1].read_bytes()) > 50, 20, "the guest printing on the destination")
    dst.cmd("stop")
    passes = counter(files["dst"][0])
    column = np.fromfile(files["dst"][0], dtype=np.uint8)[MIB:24 * MIB:4096]
    assert np.isin(column, [passes % 256, (passes - 1) % 256]).all()
    assert_letters_in_sequence(before + files["dst"][1].read_bytes())
