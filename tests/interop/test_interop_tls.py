"""TLS migration between real QEMU 7.2 and vmigrate with x509 credentials, both directions.

Both kinds of VM get the same ``tls-creds-x509`` objects (a CA made at test
time, a server certificate for IP:127.0.0.1 and DNS:localhost, a client
certificate; ``verify-peer=on`` on the destination) and ``tls-creds`` on both
sides, as an operator would set up QEMU.  QEMU speaks GnuTLS, vmigrate
Python's ``ssl`` (OpenSSL): the RAM must arrive intact over the main
channel and over multifd channels, and a certificate that does not match
fails the source with QEMU's own ``error-desc``, its guest still running.
A destination with ``tls-authz`` refuses the other kind's client by its
certificate's DN, and an expired certificate is refused with QEMU's text.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from machines import FINAL, Machine, Machines
from ramfile import fill_garbage, fill_pattern, first_difference
from tls_certs import CA, make_pki, write_creds, write_psk
from test_interop_postcopy import postcopy
from transport import Transport, migrate, settle
from vmigrate.harness.waiting import wait_for
from vmigrate.migration.tls_anon import FFDHE2048_PEM

pytestmark = pytest.mark.timeout(90)

SIZE = "64M"


def tls_object(directory: Path, endpoint: str, psk: bool = False, verify_peer: str = "on",
               anon: bool = False) -> tuple[str, str]:
    """The same option for both kinds (vmigrate's ``--object`` takes QEMU's ``-object`` syntax):
    x509 credentials, PSK ones (a client uses the key of ``username=qemu``) or anonymous ones
    (a server's dir holds ``dh-params.pem`` when it exists)."""
    if anon:
        return "-object", f"tls-creds-anon,id=tls0,endpoint={endpoint}" + (f",dir={directory}" if directory.is_dir()
                                                                            else "")
    if psk:
        return "-object", (f"tls-creds-psk,id=tls0,dir={directory},endpoint={endpoint}"
                           + (",username=qemu" if endpoint == "client" else ""))
    return "-object", f"tls-creds-x509,id=tls0,dir={directory},endpoint={endpoint},verify-peer={verify_peer}"


def start(machines: Machines, kind: str, directory: Path, endpoint: str, *args: str, multifd: bool,
          ram: Path | None = None, psk: bool = False, verify_peer: str = "on", anon: bool = False,
          **params) -> Machine:
    obj = tls_object(directory, endpoint, psk, verify_peer, anon)
    if kind == "vmigrate":
        obj = ("--object", obj[1])
    vm = machines.start(kind, SIZE, *obj, *args, ram=ram)
    vm.vm.set_caps(multifd=multifd)
    vm.vm.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "multifd-channels": 2, **params})
    return vm


@pytest.mark.parametrize("creds", ["x509", "x509-no-client-cert", "psk", "anon", "anon-dh-params"])
@pytest.mark.parametrize("multifd", [False, True], ids=["main", "multifd"])
@pytest.mark.parametrize("src_kind", ["qemu", "vmigrate"])
def test_tls_migration(machines: Machines, tmp_path, src_kind, multifd, creds) -> None:
    """x509 credentials (a client certificate the destination verifies, or none and
    ``verify-peer=off`` there), PSK ones or anonymous ones (the server's DH group its own default, or
    RFC 7919's ffdhe2048 from ``dh-params.pem``); GnuTLS on QEMU's side, OpenSSL on vmigrate's
    (docs/tls.md)."""
    psk = creds == "psk"
    anon = creds.startswith("anon")
    server_verify = "off" if creds == "x509-no-client-cert" else "on"
    if anon:
        client = server = tmp_path / "anon"
        if creds == "anon-dh-params":
            server.mkdir()
            (server / "dh-params.pem").write_text(FFDHE2048_PEM)
    elif psk:
        server = client = write_psk(tmp_path / "psk")
    else:
        server, client = make_pki(tmp_path / "pki")
        if server_verify == "off":
            for name in ("client-cert.pem", "client-key.pem"):
                (client / name).unlink()
    dst_kind = "vmigrate" if src_kind == "qemu" else "qemu"
    src = start(machines, src_kind, client, "client", multifd=multifd, psk=psk, anon=anon,
                **{"max-bandwidth": 10 << 30})
    fill_pattern(src.ram, src.size, seed=7, random_pages=4096)

    def start_dst() -> Machine:
        ram = machines.ram_path(dst_kind)
        fill_garbage(ram, src.size)
        return start(machines, dst_kind, server, "server", "-incoming", "defer", "-S", multifd=multifd, ram=ram,
                     psk=psk, verify_peer=server_verify, anon=anon)

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


#: The client certificate's subject for tls-authz, and the DN QEMU 7.2's check printed for it.
CLIENT_SUBJECT = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "GB"),
                            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example, Inc"),
                            x509.NameAttribute(NameOID.COMMON_NAME, "client.example")])
CLIENT_DN = "C=GB,O=Example\\, Inc,CN=client.example"


def authz_object(kind: str, allowed: bool) -> tuple[str, str]:
    """An authz-list whose glob rule allows or denies the client: QEMU 7.2's -object takes the rules
    only as JSON (``rules.0.match=`` is "Invalid parameter"), vmigrate's in keyval form."""
    policy = "allow" if allowed else "deny"
    if kind == "qemu":
        rule = {"match": "*,CN=client.ex?mple", "policy": policy, "format": "glob"}
        return "-object", json.dumps({"qom-type": "authz-list", "id": "auth0", "policy": "deny", "rules": [rule]})
    return "--object", (f"authz-list,id=auth0,policy=deny,rules.0.match=*,,CN=client.ex?mple,"
                        f"rules.0.policy={policy},rules.0.format=glob")


@pytest.mark.parametrize("allowed", [True, False], ids=["allowed", "denied"])
@pytest.mark.parametrize("src_kind", ["qemu", "vmigrate"])
def test_tls_authz(machines: Machines, tmp_path, src_kind, allowed) -> None:
    """A destination with tls-authz checks the other kind's client certificate DN the same way."""
    ca = CA()
    server = write_creds(tmp_path / "server", ca, "server")
    client = write_creds(tmp_path / "client", ca, "client", subject=CLIENT_SUBJECT)
    dst_kind = "vmigrate" if src_kind == "qemu" else "qemu"
    src = start(machines, src_kind, client, "client", multifd=False, **{"max-bandwidth": 10 << 30})
    fill_pattern(src.ram, src.size, seed=3, random_pages=1024)
    if src_kind == "vmigrate":
        src.vm.cmd("stop")  # the RAM file is written by the test, not a guest

    def start_dst() -> Machine:
        ram = machines.ram_path(dst_kind)
        fill_garbage(ram, src.size)
        return start(machines, dst_kind, server, "server", "-incoming", "defer", "-S",
                     *authz_object(dst_kind, allowed), multifd=False, ram=ram, **{"tls-authz": "auth0"})

    if allowed:
        dst = migrate(Transport("tcp", machines.ramdir), src, start_dst)
        assert src.vm.migrate_status()["status"] == "completed"
        assert dst.vm.migrate_status() == {"status": "completed"}
        assert first_difference(src.ram, dst.ram, src.size) is None
        return
    dst = start_dst()
    dst.vm.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    (address,) = dst.vm.migrate_status()["socket-address"]
    src.vm.cmd("migrate", uri=f"tcp:127.0.0.1:{address['port']}")
    info = src.vm.wait_migration({"completed", "failed"})
    assert info["status"] == "failed" and info["error-desc"], info
    assert src.vm.status() in ("running", "paused")
    denied = f"TLS x509 authz check for {CLIENT_DN} is denied"
    if dst_kind == "qemu":
        # QEMU prints the refusal and keeps listening; its source's error-desc is this.
        wait_for(lambda: denied in dst.vm.log(), 10, "QEMU's refusal")
        assert dst.vm.migrate_status()["socket-address"]
    else:
        assert info["error-desc"] == "Cannot write to TLS channel: Input/output error"
        assert dst.vm.wait_migration({"completed", "failed"}) == {"status": "failed", "error-desc": denied}
    dst.require_alive()


@pytest.mark.parametrize("endpoint", ["server", "client"])
@pytest.mark.parametrize("src_kind", ["qemu", "vmigrate"])
def test_expired_certificate(machines: Machines, tmp_path, src_kind, endpoint) -> None:
    """An expired certificate, loaded with sanity-check=off, is refused by the other kind with
    QEMU's text for GnuTLS's verdict (QEMU's own time check comes after and is not reached)."""
    ca = CA()
    dirs = {end: write_creds(tmp_path / end, ca, end, expired=end == endpoint) for end in ("server", "client")}
    dst_kind = "vmigrate" if src_kind == "qemu" else "qemu"
    kinds = {"client": src_kind, "server": dst_kind}
    vms = {}
    for end in ("server", "client"):
        flag = "-object" if kinds[end] == "qemu" else "--object"
        obj = (flag, f"tls-creds-x509,id=tls0,dir={dirs[end]},endpoint={end},sanity-check=off")
        args = ("-incoming", "defer") if end == "server" else ()
        vms[end] = machines.start(kinds[end], SIZE, *obj, *args)
        vms[end].vm.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    dst, src = vms["server"], vms["client"]
    dst.vm.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    (address,) = dst.vm.migrate_status()["socket-address"]
    src.vm.cmd("migrate", uri=f"tcp:127.0.0.1:{address['port']}")
    info = src.vm.wait_migration({"completed", "failed"})
    assert info["status"] == "failed", info
    assert src.vm.status() == "running"
    if endpoint == "server":
        assert info["error-desc"] == "The certificate is not trusted"
    elif dst_kind == "qemu":
        wait_for(lambda: "The certificate is not trusted" in dst.vm.log(), 10, "QEMU's refusal")
    else:
        assert dst.vm.wait_migration({"completed", "failed"}) == {
            "status": "failed", "error-desc": "The certificate is not trusted"}


@pytest.mark.parametrize("src_kind", ["qemu", "vmigrate"])
def test_wrong_psk_refused(machines: Machines, tmp_path, src_kind) -> None:
    """The client's key differs from the server's: each side's refusal text."""
    dst_kind = "vmigrate" if src_kind == "qemu" else "qemu"
    dst = start(machines, dst_kind, write_psk(tmp_path / "server"), "server", "-incoming", "defer", multifd=False,
                psk=True)
    dst.vm.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    (address,) = dst.vm.migrate_status()["socket-address"]
    src = start(machines, src_kind, write_psk(tmp_path / "client", key="ab" * 16), "client", multifd=False, psk=True)
    src.vm.cmd("migrate", uri=f"tcp:127.0.0.1:{address['port']}")
    info = src.vm.wait_migration({"completed", "failed"})
    assert src.vm.status() == "running"
    if dst_kind == "qemu":
        # GnuTLS fails the binder and closes without an alert; QEMU prints it and keeps listening.
        assert info == {"status": "failed", "error-desc": "TLS handshake failed: the peer closed the connection"}
        wait_for(lambda: "TLS handshake failed: An illegal parameter has been received." in dst.vm.log(),
                 10, "QEMU's refusal")
        assert dst.vm.migrate_status()["socket-address"]
    else:
        assert info == {"status": "failed", "error-desc": "TLS handshake failed: A TLS fatal alert has been received."}
        assert dst.vm.wait_migration({"completed", "failed"}) == {
            "status": "failed", "error-desc": "TLS handshake failed: BINDER_DOES_NOT_VERIFY"}
    dst.require_alive()


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
