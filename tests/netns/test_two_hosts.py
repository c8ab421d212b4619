"""Precopy between two hosts: a link that goes down in the middle, plain and over TLS, and a TLS
peer whose address its certificate does not name.

Left alone, a dead link fails both sides within DEAD_LINK_SECONDS (QEMU's wait
for TCP's retransmission timeout, about 15 minutes).  Before that, what must
hold: ``migrate_cancel`` frees the source at once, its guest runs on with its
memory as it was; ``yank`` frees the destination, which ends ``failed``; and
with the link back, a second migration completes with RAM equal.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tls_certs import make_pki
from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import MAGIC
from vmigrate.migration.channel import DEAD_LINK_SECONDS

MIB = 1 << 20
GUEST = "stress:rate=50,wss=16M"


def tls_options(tmp_path, tls: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(source args, destination args): x509 credentials whose server certificate names
    127.0.0.1 and localhost only (tests/tls_certs.py), or nothing."""
    if not tls:
        return (), ()
    server, client = make_pki(tmp_path / "pki")
    return (("--object", f"tls-creds-x509,id=tls0,dir={client},endpoint=client"),
            ("--object", f"tls-creds-x509,id=tls0,dir={server},endpoint=server,verify-peer=on"))


def start(host, tmp_path, name: str, *args: str):
    """A VM on *host*, its RAM in *name*.ram."""
    return host.run(tmp_path / f"{name}.sock", tmp_path / f"{name}.log", "-m", "64M",
                    "--mem-path", str(tmp_path / f"{name}.ram"), "--guest", GUEST, *args)


def use_tls(*vms, hostname: str | None = None) -> None:
    """tls-creds on every VM; *hostname* as the first one's (the source's) tls-hostname."""
    for vm in vms:
        vm.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    if hostname is not None:
        vms[0].cmd("migrate-set-parameters", **{"tls-hostname": hostname})


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_link_cut_during_precopy(two_hosts, tmp_path, tls):
    src_host, dst_host = two_hosts
    src_args, dst_args = tls_options(tmp_path, tls)
    src = start(src_host, tmp_path, "src", *src_args)
    dst = start(dst_host, tmp_path, "dst", *dst_args, "--incoming", f"tcp:{dst_host.address}:4444")
    try:
        if tls:
            use_tls(src, dst, hostname="localhost")
        wait_for(lambda: (tmp_path / "src.ram").read_bytes()[:8] == MAGIC, 10, "the guest to start")
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 * MIB})
        src.cmd("migrate", uri=f"tcp:{dst_host.address}:4444")
        wait_for(lambda: src.migrate_status().get("ram", {}).get("transferred", 0) > 4 * MIB, 30, "traffic")
        dst_host.set_link(False)

        def stalled() -> bool:
            before = src.migrate_status()["ram"]["transferred"]
            time.sleep(1.0)
            return src.migrate_status()["ram"]["transferred"] == before

        wait_for(stalled, 30, "the stream to stall once the socket buffers are full")
        assert src.migrate_status()["status"] == "active" and dst.migrate_status()["status"] == "active"

        src.cmd("migrate_cancel")
        assert src.wait_migration({"cancelled", "failed"}, timeout=10)["status"] == "cancelled"
        assert src.status() == "running"
        steps = np.fromfile(tmp_path / "src.ram", np.uint64, 2)[1]
        wait_for(lambda: np.fromfile(tmp_path / "src.ram", np.uint64, 2)[1] > steps, 10, "the guest to go on")

        dst.cmd("yank", instances=[{"type": "migration"}])
        info = dst.wait_migration({"failed"}, timeout=10)
        assert info["error-desc"].startswith("load of migration failed: ")
        assert dst.status() == "inmigrate"

        dst_host.set_link(True)
        again = start(dst_host, tmp_path, "again", "-S", *dst_args, "--incoming", f"tcp:{dst_host.address}:4445")
        try:
            if tls:
                use_tls(again)
            src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 30, "downtime-limit": 2000})
            src.cmd("migrate", uri=f"tcp:{dst_host.address}:4445")
            assert src.wait_migration({"completed", "failed"}, timeout=60)["status"] == "completed"
            assert again.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
            assert np.array_equal(np.fromfile(tmp_path / "src.ram", np.uint8),
                                  np.fromfile(tmp_path / "again.ram", np.uint8))
        finally:
            again.close()
    finally:
        src.close()
        dst.close()


def test_a_dead_link_fails_a_precopy_on_both_sides_by_itself(two_hosts, tmp_path):
    """No cancel, no yank: the source fails with an ``error-desc`` and its guest runs on, the
    destination fails too, each within DEAD_LINK_SECONDS of the cut plus a margin."""
    src_host, dst_host = two_hosts
    src = start(src_host, tmp_path, "src")
    dst = start(dst_host, tmp_path, "dst", "--incoming", f"tcp:{dst_host.address}:4444")
    try:
        wait_for(lambda: (tmp_path / "src.ram").read_bytes()[:8] == MAGIC, 10, "the guest to start")
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 * MIB})
        src.cmd("migrate", uri=f"tcp:{dst_host.address}:4444")
        wait_for(lambda: src.migrate_status().get("ram", {}).get("transferred", 0) > 4 * MIB, 30, "traffic")
        dst_host.set_link(False)
        info = src.wait_migration({"completed", "failed", "cancelled"}, timeout=DEAD_LINK_SECONDS + 10)
        assert info["status"] == "failed" and info["error-desc"], info
        assert src.status() == "running"
        dinfo = dst.wait_migration({"completed", "failed"}, timeout=DEAD_LINK_SECONDS + 10)
        assert dinfo["status"] == "failed" and dinfo["error-desc"].startswith("load of migration failed: ")
    finally:
        src.close()
        dst.close()


def test_tls_peer_at_an_address_its_certificate_does_not_name(two_hosts, tmp_path):
    """Without tls-hostname the source checks the URI's host, 10.213.77.2, which the server
    certificate does not name: QEMU's refusal, the guest untouched; naming the server with
    tls-hostname then migrates over the same link."""
    src_host, dst_host = two_hosts
    src_args, dst_args = tls_options(tmp_path, True)
    src = start(src_host, tmp_path, "src", *src_args)
    dst = start(dst_host, tmp_path, "dst", *dst_args, "--incoming", f"tcp:{dst_host.address}:4444")
    again = start(dst_host, tmp_path, "again", "-S", *dst_args, "--incoming", f"tcp:{dst_host.address}:4445")
    try:
        use_tls(src, dst, again)
        wait_for(lambda: (tmp_path / "src.ram").read_bytes()[:8] == MAGIC, 10, "the guest to start")
        src.cmd("migrate", uri=f"tcp:{dst_host.address}:4444")
        info = src.wait_migration({"completed", "failed"}, timeout=30)
        assert info == {"status": "failed", "error-desc": f"Certificate does not match the hostname {dst_host.address}"}
        assert src.status() == "running"
        assert dst.wait_migration({"completed", "failed"}, timeout=10)["status"] == "failed"

        src.cmd("migrate-set-parameters", **{"tls-hostname": "localhost", "downtime-limit": 2000})
        src.cmd("migrate", uri=f"tcp:{dst_host.address}:4445")
        assert src.wait_migration({"completed", "failed"}, timeout=60)["status"] == "completed"
        assert again.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
        assert np.array_equal(np.fromfile(tmp_path / "src.ram", np.uint8), np.fromfile(tmp_path / "again.ram", np.uint8))
    finally:
        for vm in (src, dst, again):
            vm.close()
