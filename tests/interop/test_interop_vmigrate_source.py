"""vmigrate migrating into real QEMU 7.2 over tcp, unix and exec, with the guest dirtying RAM.

The source starts under a low ``max-bandwidth`` so the guest re-dirties its
working set faster than it can be sent (several passes, no convergence);
then the limits are lifted and the migration completes.  QEMU's RAM file
starts out with stale bytes; at the end it must equal vmigrate's RAM file
as frozen at switchover (the source sits in ``postmigrate``).
"""

from __future__ import annotations

import pytest

from capture import analyze, ram_accounting
import event_trace as trace
from machines import Machine, Machines, converge_after_passes
from query_stats import check_completed
from ramfile import PAGE_SIZE, ab_state, fill_garbage, first_difference, pages
from transport import Transport, migrate
from vmigrate.harness.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

SIZE = "128M"
AB_FIRST, AB_LAST = 256, 6400  # pages [1 MiB, 25 MiB): 24 MiB re-dirtied every few ms
GUESTS = {
    "ab": f"ab:start={AB_FIRST * PAGE_SIZE},end={AB_LAST * PAGE_SIZE}",
    "stress": "stress:rate=200,wss=16M",
}
#: While held back: ~0.5 s per pass, and a switchover threshold (bandwidth × downtime
#: limit, 0.8 MB) that a guest dirtying tens of MB per pass never gets under.
SLOW = {"max-bandwidth": 40_000_000, "downtime-limit": 20}
MIN_PASSES = 3

CASES = [
    # transport, guest, QEMU -S
    pytest.param("tcp", "ab", False, id="tcp-ab"),
    pytest.param("unix", "stress", True, id="unix-stress-dst-S"),
    pytest.param("exec", "ab", False, id="exec-ab"),
]


@pytest.mark.parametrize("name,guest,dst_paused", CASES)
def test_vmigrate_to_qemu(machines: Machines, name, guest, dst_paused) -> None:
    transport = Transport(name, machines.ramdir)
    src = machines.vmigrate(SIZE, "--guest", GUESTS[guest])
    wait_for(lambda: bytes(pages(src.ram, src.size)[0, :8]) == b"VMIGRATE", 10, "the guest to start")
    counter_before = int.from_bytes(bytes(pages(src.ram, src.size)[0, 8:16]), "little")
    src.vm.cmd("migrate-set-parameters", **SLOW)

    def start_dst() -> Machine:
        ram = machines.ram_path("qemu")
        fill_garbage(ram, src.size)
        return machines.qemu(SIZE, "-incoming", "defer", *(["-S"] if dst_paused else []), ram=ram)

    dst = migrate(transport, src, start_dst, drive=lambda src: converge_after_passes(src, MIN_PASSES))
    dst.require_alive()

    info = src.vm.migrate_status()
    ram = check_completed(info, src.size)
    assert dst.vm.migrate_status() == {"status": "completed"}
    assert src.vm.status() == "postmigrate"
    assert dst.vm.status() == ("paused" if dst_paused else "running")
    assert first_difference(src.ram, dst.ram, src.size) is None

    counter = int.from_bytes(bytes(pages(dst.ram, dst.size)[0, 8:16]), "little")
    assert counter > counter_before, "the guest did not run during the migration"
    if guest == "ab":
        counter, broken = ab_state(dst.ram, dst.size, AB_FIRST, AB_LAST)
        assert broken.size == 0, f"ab pattern broken at pages {broken[:8]} (pass {counter})"
    nonzero = int(pages(src.ram, src.size).any(axis=1).sum())
    assert ram["normal"] > nonzero, "no page was sent twice: the guest dirtied nothing during the migration"

    passes = trace.check_source(trace.collect(src.vm, "completed"), was_running=True)
    assert passes == ram["dirty-sync-count"] >= MIN_PASSES + 1
    trace.check_destination(trace.collect(dst.vm, "completed"), resumes=not dst_paused)
    if name == "exec":
        report = analyze(transport.capture)
        assert report["ram"]["blocks"] == [{"idstr": "ram", "used_length": src.size}]
        assert ram_accounting(report) == {k: ram[k] for k in ("normal", "duplicate", "transferred")}


def test_round_trip_guest_continues(machines: Machines) -> None:
    """vmigrate → QEMU → vmigrate: the guest resumes from the state QEMU carried, pattern intact."""
    src = machines.vmigrate("64M", "--guest", GUESTS["ab"])
    wait_for(lambda: bytes(pages(src.ram, src.size)[0, :8]) == b"VMIGRATE", 10, "the guest to start")
    hop = migrate(Transport("unix", machines.ramdir), src,
                  lambda: machines.qemu("64M", "-incoming", "defer", "-S"))
    hop.require_alive()
    assert hop.vm.migrate_status()["status"] == "completed"
    counter_at_hop, broken = ab_state(hop.ram, hop.size, AB_FIRST, AB_LAST)
    assert broken.size == 0, f"ab pattern broken in QEMU's RAM at pages {broken[:8]}"

    back = migrate(Transport("tcp", machines.ramdir), hop,
                   lambda: machines.vmigrate("64M", "--guest", GUESTS["ab"], "--incoming", "defer"))
    assert back.vm.migrate_status()["status"] == "completed"
    assert back.vm.status() == "paused"  # QEMU was paused (-S): the state travels in globalstate
    back.vm.cmd("cont")
    wait_for(lambda: ab_state(back.ram, back.size, AB_FIRST, AB_LAST)[0] > counter_at_hop + 3, 10,
             "the guest to make progress after the round trip")
    back.vm.cmd("stop")
    counter, broken = ab_state(back.ram, back.size, AB_FIRST, AB_LAST)
    assert broken.size == 0, f"ab pattern broken at pages {broken[:8]} (pass {counter})"
