"""``vmigrate migrate --postcopy`` between two real QEMU 7.2 processes, and two vmigrate ones.

At 8 MiB/s, 128 MiB of random RAM would take precopy ~16 s, so the client
must switch: at a fixed time, or because the forecast misses
``--max-precopy``.  RAM lives on /dev/shm (the ``ramdir`` fixture): QEMU's
postcopy on shared memory registers the file's pages with userfaultfd
(docs/qemu/postcopy.md §1); the destination starts with stale bytes that
the postcopy discard must clear.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import event_trace as trace
from client_json import record_problems
from machines import Machines
from ramfile import fill_garbage, fill_pattern, first_difference

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("kind", ["qemu", "vmigrate"])
@pytest.mark.parametrize("mode", [["after=1"], ["auto", "--max-precopy", "2"]], ids=["after", "auto"])
def test_client_switches_to_postcopy(machines: Machines, mode: list[str], kind: str) -> None:
    """The same client drives QEMU 7.2 (its forecast computed from QEMU's counters) and vmigrate
    (whose ``x-vmigrate-forecast`` it shows)."""
    guest = ("--guest", "idle") if kind == "vmigrate" else ()
    src = machines.start(kind, "256M", *guest)
    fill_pattern(src.ram, src.size, seed=3, random_pages=32768)
    dst_ram = machines.ram_path(kind)
    fill_garbage(dst_ram, src.size)
    dst = machines.start(kind, "256M", *guest, "-incoming", "defer", ram=dst_ram)
    result = subprocess.run(
        [sys.executable, "-m", "vmigrate", "migrate", "--qmp", str(src.vm.tool_sock), "--dest-qmp",
         str(dst.vm.tool_sock), "--json", "--param", "max-bandwidth=8M", "--postcopy", *mode,
         f"unix:{machines.ramdir / 'mig.sock'}"], capture_output=True, text=True, timeout=45)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert record_problems(records) == []
    (postcopy,) = [r["postcopy"] for r in records if "postcopy" in r]
    summary = records[-1]["summary"]
    assert summary["status"] == "completed" and summary["destination-status"] == "completed"
    assert summary["postcopy-start-s"] == postcopy["t"] < 5
    if mode[0] == "auto":
        assert postcopy["reason"].startswith("precopy would need")
        assert any(r["sample"]["forecast"] for r in records if "sample" in r)
    else:
        assert postcopy["reason"] == "1 s after the start" and postcopy["t"] >= 1
    events = trace.collect(src.vm, "completed")
    assert "postcopy-active" in events, events
    dst.require_alive()
    assert first_difference(src.ram, dst.ram, src.size) is None
