"""``validate-uuid`` across implementations, with QEMU → QEMU as the reference.

Observed on QEMU 7.2: a destination with a different ``-uuid`` rejects the
configuration section and exits(1); the source then fails on its next write
(``Unable to write to socket: ...``) and its guest keeps running.  A
destination without a UUID only warns.  vmigrate must behave the same on
either side, except that a vmigrate destination stays alive (its documented
deviation).
"""

from __future__ import annotations

import pytest

import event_trace as trace
from machines import Machine, Machines
from ramfile import fill_pattern
from transport import Transport, migrate

pytestmark = pytest.mark.timeout(60)

SRC_UUID = "6c9bd1b6-0d2b-4b44-9a56-2f7e4f7a0001"
DST_UUID = "6c9bd1b6-0d2b-4b44-9a56-2f7e4f7a0002"
SIZE = "64M"


def uuid_source(machines: Machines, kind: str) -> Machine:
    """A source with a UUID, validate-uuid on, and tens of MiB of non-zero RAM.

    Enough data that the source is still writing when the destination gives
    up, so it fails deterministically instead of completing into a dead peer.
    """
    if kind == "qemu":
        src = machines.qemu(SIZE, "-uuid", SRC_UUID)
        fill_pattern(src.ram, src.size, random_pages=8192)
    else:
        src = machines.vmigrate(SIZE, "--uuid", SRC_UUID, "--guest", "ab:start=1M,end=60M")
    src.vm.set_caps(**{"validate-uuid": True})
    src.vm.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30})
    return src


@pytest.mark.parametrize("src_kind", ["qemu", "vmigrate"])
def test_uuid_mismatch_into_qemu(machines: Machines, src_kind) -> None:
    src = uuid_source(machines, src_kind)
    dst = migrate(Transport("tcp", machines.ramdir), src,
                  lambda: machines.qemu(SIZE, "-uuid", DST_UUID, "-incoming", "defer"))
    info = src.vm.migrate_status()
    assert info["status"] == "failed", info
    assert info["error-desc"].startswith("Unable to write to socket: "), info
    assert src.vm.status() == "running"
    trace.check_failed_source(trace.collect(src.vm, "failed"), was_running=True)

    assert dst.vm.proc.wait(timeout=10) == 1
    assert f"UUID received is {SRC_UUID} and local is {DST_UUID}" in dst.vm.log()


def test_uuid_mismatch_into_vmigrate(machines: Machines) -> None:
    src = uuid_source(machines, "qemu")
    dst = migrate(Transport("tcp", machines.ramdir), src,
                  lambda: machines.vmigrate(SIZE, "--uuid", DST_UUID, "--incoming", "defer"))
    assert src.vm.migrate_status()["status"] == "failed"
    info = dst.vm.migrate_status()
    assert info["status"] == "failed"
    assert info["error-desc"] == f"load of migration failed: UUID received is {SRC_UUID} and local is {DST_UUID}"
    assert dst.vm.proc.poll() is None and dst.vm.status() == "inmigrate"
    trace.check_failed_destination(trace.collect(dst.vm, "failed"))


@pytest.mark.parametrize("src_kind,dst_kind", [("vmigrate", "qemu"), ("qemu", "vmigrate")])
def test_uuid_checked_only_against_a_set_uuid(machines: Machines, src_kind, dst_kind) -> None:
    """Destination without a UUID: QEMU warns and loads; the same UUID on both sides: no warning."""
    for dst_args in ([], ["-uuid" if dst_kind == "qemu" else "--uuid", SRC_UUID]):
        src = uuid_source(machines, src_kind)
        dst = migrate(Transport("unix", machines.ramdir), src,
                      lambda: machines.start(dst_kind, SIZE, *dst_args, "-incoming", "defer"))
        dst.require_alive()
        assert src.vm.migrate_status()["status"] == "completed"
        assert dst.vm.migrate_status()["status"] == "completed"
        if dst_kind == "qemu":
            warned = f"UUID is received {SRC_UUID}, but local uuid isn't set" in dst.vm.log()
            assert warned == (not dst_args)
