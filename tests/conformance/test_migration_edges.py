"""Edge cases of starting a migration where vmigrate once answered differently from QEMU 7.2.

Each test sends the same commands to QEMU 7.2 and to vmigrate and compares
answers, events and ``query-migrate``.
"""

from __future__ import annotations

import os
import socket

from harness import wait_for


def _caps(**states: bool) -> dict:
    return {"capabilities": [{"capability": k.replace("_", "-"), "state": v} for k, v in states.items()]}


def test_migrate_to_a_command_that_exits_goes_active_then_fails(fresh_pair):
    """QEMU's file keeps a write error and the migration thread finds it after setup -> active."""
    p = fresh_pair()
    p.same("migrate-set-capabilities", _caps(events=True))
    p.same("migrate", {"uri": "exec:false"})
    p.events_until(lambda seen: ("MIGRATION", {"status": "failed"}) in seen,
                   expect=["MIGRATION", "MIGRATION_PASS", "MIGRATION", "MIGRATION"])
    p.same("query-migrate")
    p.same("query-status")


def test_fd_incoming_is_not_active_before_data(fresh_pair):
    """An fd: or exec: source is watched for input; the load (and ``active``) begins with the first byte."""
    p = fresh_pair(incoming="defer")
    p.same("migrate-set-capabilities", _caps(events=True))
    writers = []
    for side in p.sides():
        r, w = os.pipe()
        writers.append(w)
        side.proc.qmp.send_fd(r)
        side.proc.qmp.execute("getfd", {"fdname": "src"})
        os.close(r)
    p.same_events()
    p.same("migrate-incoming", {"uri": "fd:src"})
    p.same("query-migrate")
    for w in writers:
        os.write(w, b"not a migration stream")
        os.close(w)
    # Then both load it and fail: QEMU 7.2 exits, vmigrate stays up in 'failed' (README, deviations).
    wait_for(lambda: p.qemu.proc.proc.poll() is not None, 10, "QEMU to give up the load")
    wait_for(lambda: p.vmigrate.proc.cmd("query-migrate").get("status") == "failed", 10, "vmigrate to fail the load")


def test_incoming_on_a_busy_port(fresh_pair):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        p = fresh_pair(incoming="defer")
        p.same("migrate-incoming", {"uri": f"tcp:127.0.0.1:{busy.getsockname()[1]}"})
        p.same("query-migrate")
    finally:
        busy.close()


def test_multifd_after_a_single_channel_incoming(fresh_pair, tmp_path):
    p = fresh_pair(incoming="defer")
    p.same("migrate-set-capabilities", _caps(events=True))
    p.same("migrate-incoming", {"uri": "exec:sleep 5 < /dev/null"})
    p.same("migrate-set-capabilities", _caps(multifd=True))
    p.same("query-migrate-capabilities")
    p.same("query-migrate")
    p.same("migrate-set-capabilities", _caps(multifd=False))
    p.same("query-migrate")
