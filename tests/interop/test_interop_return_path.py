"""A QEMU 7.2 source with the ``return-path`` capability into vmigrate.

The source sends OPEN_RETURN_PATH and PINGs, and reports ``completed`` only
after the destination's SHUT(0) — so its ``downtime`` also measures how
long the destination takes to load the final part of the stream and start
the guest.
"""

from __future__ import annotations

import pytest

from machines import Machines
from query_stats import check_completed
from ramfile import fill_pattern, first_difference
from transport import Transport, migrate

pytestmark = pytest.mark.timeout(90)

RP = {"return-path": True}


@pytest.mark.parametrize("name", ["tcp", "unix"])
def test_qemu_source_with_return_path(machines: Machines, name) -> None:
    src = machines.qemu("128M")
    fill_pattern(src.ram, src.size, seed=11)
    src.vm.set_caps(**RP)
    src.vm.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30})

    def start_dst():
        dst = machines.vmigrate("128M", "--incoming", "defer")
        dst.vm.set_caps(**RP)
        return dst

    dst = migrate(Transport(name, machines.ramdir), src, start_dst)
    dst.require_alive()
    check_completed(src.vm.migrate_status(), src.size)
    assert dst.vm.migrate_status() == {"status": "completed"}
    assert dst.vm.status() == "running"
    assert first_difference(src.ram, dst.ram, src.size) is None
