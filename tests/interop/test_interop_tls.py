"""TLS migration between real QEMU 7.2 and vmigrate with x509 credentials, both directions.

Both kinds of VM get the same ``tls-creds-x509`` objects (a CA made at test
time, a server certificate for IP:127.0.0.1 and DNS:localhost, a client
certificate; ``verify-peer=on`` on the destination) and ``tls-creds`` on both
sides, as an operator would set up QEMU.  QEMU speaks GnuTLS, vmigrate
Python's ``ssl`` (OpenSSL): the RAM must arrive intact over the main
channel and over multifd channels, and a certificate that does not match
fails the source with QEMU's own ``error-desc``, its guest still running.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from machines import FINAL, Machine, Machines
from ramfile import fill_garbage, fill_pattern, first_difference
from tls_certs import CA, make_pki, write_creds
from transport import Transport, migrate, settle

pytestmark = pytest.mark.timeout(90)

SIZE = "64M"


def tls_object(directory: Path, endpoint: str) -> tuple[str, str]:
    """The same option for both kinds (vmigrate's ``--object`` takes QEMU's ``-object`` syntax)."""
    return "-object", f"tls-creds-x509,id=tls0,dir={directory},endpoint={endpoint},verify-peer=on"


def start(machines: Machines, kind: str, directory: Path, endpoint: str, *args: str, multifd: bool,
          ram: Path | None = None, **params) -> Machine:
    obj = tls_object(directory, endpoint)
    if kind == "vmigrate":
        obj = ("--object", obj[1])
    vm = machines.start(kind, SIZE, *obj, *args, ram=ram)
    vm.vm.set_caps(multifd=multifd)
    vm.vm.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "multifd-channels": 2, **params})
    return vm


@pytest.mark.parametrize("multifd", [False, True], ids=["main", "multifd"])
@pytest.mark.parametrize("src_kind", ["qemu", "vmigrate"])
def test_tls_migration(machines: Machines, tmp_path, src_kind, multifd) -> None:
    server, client = make_pki(tmp_path / "pki")
    dst_kind = "vmigrate" if src_kind == "qemu" else "qemu"
    src = start(machines, src_kind, client, "client", multifd=multifd, **{"max-bandwidth": 10 << 30})
    fill_pattern(src.ram, src.size, seed=7, random_pages=4096)

    def start_dst() -> Machine:
        ram = machines.ram_path(dst_kind)
        fill_garbage(ram, src.size)
        return start(machines, dst_kind, server, "server", "-incoming", "defer", "-S", multifd=multifd, ram=ram)

    if src_kind == "vmigrate":
        src.vm.cmd("stop")  # the RAM file is written by the test, not a guest
    dst = migrate(Transport("tcp", machines.ramdir), src, start_dst)
    dst.require_alive()
    info = src.vm.migrate_status()
    assert info["status"] == "completed", info
    assert (info["ram"]["multifd-bytes"] > 0) == multifd
    assert dst.vm.migrate_status() == {"status": "completed"}
    assert first_difference(src.ram, dst.ram, src.size) is None


@pytest.mark.parametrize("case", ["hostname", "ca"])
@pytest.mark.parametrize("src_kind", ["qemu", "vmigrate"])
def test_refused_certificate_same_error_desc(machines: Machines, tmp_path, src_kind, case) -> None:
    """A server name the certificate lacks, or a server certificate from an unknown CA: QEMU's texts."""
    server, client = make_pki(tmp_path / "pki")
    params = {}
    if case == "hostname":
        params["tls-hostname"] = "example.com"
    else:
        client = write_creds(tmp_path / "pki" / "stranger", CA("another CA"), "client")
    dst = start(machines, "qemu" if src_kind == "vmigrate" else "vmigrate", server, "server",
                "-incoming", "defer", multifd=False)
    dst.vm.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    (address,) = dst.vm.migrate_status()["socket-address"]
    src = start(machines, src_kind, client, "client", multifd=False, **params)
    src.vm.cmd("migrate", uri=f"tcp:127.0.0.1:{address['port']}")
    info = src.vm.wait_migration({"completed", "failed"})
    assert info == {"status": "failed", "error-desc": {
        "hostname": "Certificate does not match the hostname example.com",
        "ca": "The certificate hasn't got a known issuer"}[case]}
    assert src.vm.status() == "running"


def share_socketpair(src: Machine, dst: Machine) -> None:
    """One end of a socketpair as ``fd:mig`` on each side (a socket passed with getfd is two-way)."""
    a, b = socket.socketpair()
    for vm, end in ((src, a), (dst, b)):
        vm.vm.qmp.send_fd(end.fileno())
        vm.vm.cmd("getfd", fdname="mig")
        end.close()


RELAY = f"{sys.executable} {Path(__file__).parent.parent / 'relay.py'}"


@pytest.mark.parametrize("transport", ["exec", "fd"])
@pytest.mark.parametrize("src_kind", ["qemu", "vmigrate"])
def test_tls_over_exec_and_fd(machines: Machines, tmp_path, src_kind, transport) -> None:
    """QEMU 7.2's exec: (the command's stdin and stdout) and fd: (a socket) channels are two-way and
    carry TLS given ``tls-hostname``: exec: commands joined by a unix socket, fd: a socketpair."""
    server, client = make_pki(tmp_path / "pki")
    dst_kind = "vmigrate" if src_kind == "qemu" else "qemu"
    src = start(machines, src_kind, client, "client", multifd=False,
                **{"max-bandwidth": 10 << 30, "tls-hostname": "localhost"})
    fill_pattern(src.ram, src.size, seed=11, random_pages=4096)
    if src_kind == "vmigrate":
        src.vm.cmd("stop")
    ram = machines.ram_path(dst_kind)
    fill_garbage(ram, src.size)
    dst = start(machines, dst_kind, server, "server", "-incoming", "defer", "-S", multifd=False, ram=ram)
    sock = tmp_path / "relay.sock"
    if transport == "fd":
        share_socketpair(src, dst)
        incoming, outgoing = "fd:mig", "fd:mig"
    else:
        incoming, outgoing = f"exec:{RELAY} --listen {sock}", f"exec:{RELAY} {sock}"
    dst.vm.cmd("migrate-incoming", uri=incoming)
    src.vm.cmd("migrate", uri=outgoing)
    assert src.vm.wait_migration(FINAL)["status"] == "completed", src.vm.migrate_status()
    assert settle(dst, 60) == "completed", dst.vm.log()
    assert first_difference(src.ram, dst.ram, src.size) is None


def test_qemu_fd_source_without_hostname_same_error_desc(machines: Machines, tmp_path) -> None:
    """An fd: URI has no host: a verify-peer client needs ``tls-hostname``, with QEMU's text."""
    server, client = make_pki(tmp_path / "pki")
    errors = {}
    for src_kind, dst_kind in (("qemu", "vmigrate"), ("vmigrate", "qemu")):
        src = start(machines, src_kind, client, "client", multifd=False)
        dst = start(machines, dst_kind, server, "server", "-incoming", "defer", multifd=False)
        share_socketpair(src, dst)
        dst.vm.cmd("migrate-incoming", uri="fd:mig")
        src.vm.cmd("migrate", uri="fd:mig")
        errors[src_kind] = src.vm.wait_migration(FINAL)
        assert src.vm.status() == "running"
    assert errors["qemu"] == errors["vmigrate"] == {"status": "failed",
                                                     "error-desc": "No hostname for certificate validation"}
