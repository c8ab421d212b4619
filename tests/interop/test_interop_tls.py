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

from pathlib import Path

import pytest

from machines import Machine, Machines
from ramfile import fill_garbage, fill_pattern, first_difference
from tls_certs import CA, make_pki, write_creds
from test_interop_postcopy import postcopy
from transport import Transport, migrate

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


@pytest.mark.parametrize("src_kind", ["qemu", "vmigrate"])
def test_tls_postcopy_with_preempt(machines: Machines, tmp_path, src_kind) -> None:
    """Postcopy with ``postcopy-preempt`` over TLS (docs/postcopy.md): the preempt channel is a
    second TLS session, made by each side with the other implementation's library."""
    server, client = make_pki(tmp_path / "pki")
    dst_kind = "vmigrate" if src_kind == "qemu" else "qemu"
    idle = ("--guest", "idle")
    src = start(machines, src_kind, client, "client", *(idle if src_kind == "vmigrate" else ()), multifd=False)
    fill_pattern(src.ram, src.size, seed=11, random_pages=8000)
    dst = start(machines, dst_kind, server, "server", "-incoming", "tcp:127.0.0.1:0",
                *(idle if dst_kind == "vmigrate" else ()), multifd=False)
    for m in (src, dst):
        m.vm.set_caps(**{"postcopy-ram": True, "postcopy-preempt": True})
    info = postcopy(src, dst, **{"max-bandwidth": 8 << 20, "max-postcopy-bandwidth": 8 << 20})
    assert info["ram"]["postcopy-bytes"] > 0, info["ram"]
    assert first_difference(src.ram, dst.ram, src.size) is None
