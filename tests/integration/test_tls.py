"""TLS between two vmigrate processes: x509 credentials, multifd, the return path, refusals,
tls-authz and expired certificates."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from cryptography import x509
from cryptography.x509.oid import NameOID

from procs import listen_with_data, migrate_in_passes, ram_files_equal
from tls_certs import CA, make_pki, write_creds
from vmigrate.harness.launcher import VMStartError
from vmigrate.harness.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20
GUEST = "stress:rate=100,wss=8M"


def creds(directory: Path, endpoint: str, verify_peer: str = "on") -> tuple[str, str]:
    return "--object", f"tls-creds-x509,id=tls0,dir={directory},endpoint={endpoint},verify-peer={verify_peer}"


def start_pair(spawn, tmp_path: Path, src_dir: Path, dst_dir: Path, multifd: bool = False,
               uri: str = "tcp:127.0.0.1:0", src_params: dict | None = None, dst_params: dict | None = None,
               dst_objects: tuple[str, ...] = ()):
    src = spawn("vmigrate", "--accel", "soft", "-m", "32M", "--mem-path", str(tmp_path / "src.ram"),
                "--guest", GUEST, *creds(src_dir, "client"))
    dst = spawn("vmigrate", "--accel", "soft", "-m", "32M", "--mem-path", str(tmp_path / "dst.ram"),
                "--guest", GUEST, "-S", "--incoming", "defer", *creds(dst_dir, "server"), *dst_objects)
    for vm, params in ((src, src_params), (dst, dst_params)):
        vm.set_caps(events=True, multifd=multifd, **{"return-path": True})
        vm.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "multifd-channels": 3, **(params or {})})
    if uri.startswith("fd:"):
        _socketpair_fds(src, dst)
    return src, dst, listen_with_data(tmp_path / "src.ram", dst, uri, seed=5)


@pytest.mark.parametrize("multifd", [False, True], ids=["main", "multifd"])
def test_tls_migration_completes(spawn, tmp_path, multifd):
    server, client = make_pki(tmp_path / "pki")
    src, dst, uri = start_pair(spawn, tmp_path, client, server, multifd=multifd)
    info = migrate_in_passes(src, uri, bandwidth=16 * MIB)
    assert info["status"] == "completed", info
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
    assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")
    assert (info["ram"]["multifd-bytes"] > 8 * MIB) == multifd


def test_tls_hostname_names_the_server_on_a_unix_socket(spawn, tmp_path):
    server, client = make_pki(tmp_path / "pki")
    src, dst, uri = start_pair(spawn, tmp_path, client, server, uri=f"unix:{tmp_path / 'mig.sock'}",
                               src_params={"tls-hostname": "localhost"})
    info = migrate_in_passes(src, uri, passes=1, bandwidth=64 * MIB)
    assert info["status"] == "completed", info
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
    assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")


def _refused(src, dst) -> tuple[dict, dict]:
    info = src.wait_migration({"completed", "failed"})
    assert info["status"] == "failed", info
    assert src.status() == "running"
    return info, dst.wait_migration({"completed", "failed"})


def test_wrong_hostname_fails_cleanly(spawn, tmp_path):
    server, client = make_pki(tmp_path / "pki")
    src, dst, uri = start_pair(spawn, tmp_path, client, server, src_params={"tls-hostname": "example.com"})
    src.cmd("migrate", uri=uri)
    info, dst_info = _refused(src, dst)
    assert info["error-desc"] == "Certificate does not match the hostname example.com"
    assert dst_info["status"] == "failed" and dst_info["error-desc"].startswith("TLS handshake failed")


def test_unknown_ca_fails_cleanly(spawn, tmp_path):
    server, _ = make_pki(tmp_path / "pki")
    stranger = write_creds(tmp_path / "pki" / "stranger", CA("another CA"), "client")
    src, dst, uri = start_pair(spawn, tmp_path, stranger, server)
    src.cmd("migrate", uri=uri)
    info, dst_info = _refused(src, dst)
    assert info["error-desc"] == "The certificate hasn't got a known issuer"
    assert dst_info["status"] == "failed"


@pytest.mark.parametrize("creds_id,transport,desc", [
    ("nope", "tcp", "No TLS credentials with id 'nope'"),
    ("srv", "tcp", "Expected TLS credentials for a client endpoint"),
    ("tls0", "unix", "No hostname for certificate validation"),
])
def test_source_credentials_checked_once_connected(spawn, tmp_path, creds_id, transport, desc):
    """QEMU's migration_tls_client_create runs once the channel is up: its errors fail the migration."""
    server, client = make_pki(tmp_path / "pki")
    src = spawn("vmigrate", "--accel", "soft", "-m", "32M", *creds(client, "client"),
                "--object", f"tls-creds-x509,id=srv,dir={server},endpoint=server")
    uri = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path / 'mig.sock'}"
    dst = spawn("vmigrate", "--accel", "soft", "-m", "32M", "--incoming", uri)
    if transport == "tcp":
        uri = f"tcp:127.0.0.1:{dst.migrate_status()['socket-address'][0]['port']}"
    src.cmd("migrate-set-parameters", **{"tls-creds": creds_id})
    src.cmd("migrate", uri=uri)
    assert src.wait_migration({"completed", "failed"}) == {"status": "failed", "error-desc": desc}
    assert src.status() == "running"


RELAY = f"{sys.executable} {Path(__file__).parent.parent / 'relay.py'}"


def test_tls_over_exec_both_sides(spawn, tmp_path):
    """QEMU 7.2's exec: channel is two-way (the command's stdin and stdout): TLS runs over it, the
    return path inside, the source's command joined to the destination's by a unix socket."""
    server, client = make_pki(tmp_path / "pki")
    sock = tmp_path / "relay.sock"
    src, dst, uri = start_pair(spawn, tmp_path, client, server, uri=f"exec:{RELAY} --listen {sock}",
                               src_params={"tls-hostname": "localhost"})
    info = migrate_in_passes(src, f"exec:{RELAY} {sock}", passes=2, bandwidth=64 * MIB)
    assert info["status"] == "completed", info
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
    assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")


def _socketpair_fds(src, dst) -> None:
    """One end of a socketpair as ``fd:mig`` on each side (a socket passed with getfd is two-way)."""
    a, b = socket.socketpair()
    for vm, end in ((src, a), (dst, b)):
        vm.qmp.send_fd(end.fileno())
        vm.cmd("getfd", fdname="mig")
        end.close()


@pytest.mark.parametrize("hostname", ["localhost", ""], ids=["tls-hostname", "no-hostname"])
def test_tls_over_fd_socket(spawn, tmp_path, hostname):
    """fd: with a socket is two-way: TLS runs over it; with no URI host, verify-peer needs tls-hostname."""
    server, client = make_pki(tmp_path / "pki")
    src, dst, uri = start_pair(spawn, tmp_path, client, server, uri="fd:mig", src_params={"tls-hostname": hostname})
    if not hostname:
        src.cmd("migrate", uri=uri)
        info, _ = _refused(src, dst)
        assert info["error-desc"] == "No hostname for certificate validation"
        return
    info = migrate_in_passes(src, uri, passes=2, bandwidth=64 * MIB)
    assert info["status"] == "completed", info
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
    assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")


def test_cancel_interrupts_a_stalled_handshake(spawn, tmp_path):
    """A destination that accepts and never answers the ClientHello: migrate_cancel still ends it."""
    _, client = make_pki(tmp_path / "pki")
    silent = socket.create_server(("127.0.0.1", 0))
    src = spawn("vmigrate", "--accel", "soft", "-m", "32M", *creds(client, "client"))
    src.set_caps(events=True)
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{silent.getsockname()[1]}")
    conn, _ = silent.accept()
    wait_for(lambda: conn.recv(1, socket.MSG_PEEK), 10, "the ClientHello")
    src.cmd("migrate_cancel")
    assert src.wait_migration({"cancelled", "failed"}, timeout=10)["status"] == "cancelled"
    assert src.status() == "running"
    conn.close()
    silent.close()


def test_credentials_added_over_qmp(spawn, tmp_path):
    """``object-add`` creates the credentials a running VM then migrates with, as ``--object``
    does at start; ``object-del`` removes them, and the next migration names what is missing."""
    server, client = make_pki(tmp_path / "pki")
    src = spawn("vmigrate", "--accel", "soft", "-m", "32M", "--mem-path", str(tmp_path / "src.ram"), "--guest", GUEST)
    dst = spawn("vmigrate", "--accel", "soft", "-m", "32M", "--mem-path", str(tmp_path / "dst.ram"),
                "--guest", GUEST, "-S", "--incoming", "defer")
    src.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls9", "dir": str(client), "endpoint": "client"})
    dst.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls9", "dir": str(server), "endpoint": "server"})
    for vm in (src, dst):
        vm.cmd("migrate-set-parameters", **{"tls-creds": "tls9"})
    uri = listen_with_data(tmp_path / "src.ram", dst, "tcp:127.0.0.1:0", seed=9)
    info = migrate_in_passes(src, uri, passes=1, bandwidth=64 * MIB)
    assert info["status"] == "completed", info
    # The source completes once its last bytes are sent; the destination may still be loading them.
    assert dst.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")

    src.cmd("object-del", id="tls9")
    src.cmd("cont")
    with socket.socket() as listener:  # as in QEMU, the credentials are looked up once connected
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{listener.getsockname()[1]}")
        failed = src.wait_migration({"completed", "failed"})
    assert failed == {"status": "failed", "error-desc": "No TLS credentials with id 'tls9'"}, failed


def test_postcopy_with_preempt_over_tls(spawn_shm, tmp_path):
    """Every channel of a postcopy migration is a TLS session: the main channel with its return
    path, which carries the page requests, and the preempt channel that answers them."""
    spawn, shm = spawn_shm
    server, client = make_pki(tmp_path / "pki")
    guest = ("--guest", "ab:end=16M")
    src = spawn("vmigrate", "--accel", "soft", "-m", "32M", "--mem-path", str(shm / "src.ram"), *guest,
                *creds(client, "client"))
    dst = spawn("vmigrate", "--accel", "soft", "-m", "32M", "--mem-path", str(shm / "dst.ram"), *guest,
                "--incoming", "defer", *creds(server, "server"))
    for vm in (src, dst):
        vm.set_caps(**{"postcopy-ram": True, "postcopy-preempt": True})
        vm.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = dst.migrate_status()["socket-address"][0]["port"]
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 * MIB, "max-postcopy-bandwidth": 4 * MIB})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_for(lambda: src.migrate_status()["status"] == "active", 10, "precopy")
    src.cmd("migrate-start-postcopy")
    info = src.wait_migration({"completed", "failed"}, timeout=30)
    assert info["status"] == "completed", info
    assert info["ram"]["postcopy-requests"] > 0, info["ram"]
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"


#: The client certificate's subject for the tls-authz tests, and the DN QEMU's check sees for it.
CLIENT_SUBJECT = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example, Inc"),
                            x509.NameAttribute(NameOID.COMMON_NAME, "client.example")])
CLIENT_DN = "O=Example\\, Inc,CN=client.example"


def authz_pki(root: Path) -> tuple[Path, Path]:
    ca = CA()
    return write_creds(root / "server", ca, "server"), write_creds(root / "client", ca, "client", subject=CLIENT_SUBJECT)


@pytest.mark.parametrize("authz,allowed", [
    ("authz-simple,id=auth0,identity=O=Example\\,, Inc,,CN=client.example", True),
    ("authz-simple,id=auth0,identity=CN=client.example", False),
    ("authz-list,id=auth0,rules.0.match=*CN=client.ex?mple,rules.0.policy=allow,rules.0.format=glob", True),
    ("authz-list,id=auth0,policy=allow,rules.0.match=O=Example*,rules.0.policy=deny,rules.0.format=glob", False),
], ids=["simple-allowed", "simple-denied", "list-allowed", "list-denied"])
def test_tls_authz(spawn, tmp_path, authz, allowed):
    """The destination checks the client certificate's DN with the authz object, on every channel."""
    server, client = authz_pki(tmp_path / "pki")
    src, dst, uri = start_pair(spawn, tmp_path, client, server, multifd=True, dst_objects=("--object", authz),
                               dst_params={"tls-authz": "auth0"})
    if allowed:
        info = migrate_in_passes(src, uri, passes=1, bandwidth=64 * MIB)
        assert info["status"] == "completed", info
        assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
        assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")
        return
    src.cmd("migrate", uri=uri)
    info, dst_info = _refused(src, dst)
    assert dst_info == {"status": "failed", "error-desc": f"TLS x509 authz check for {CLIENT_DN} is denied"}
    # The session was up when the destination closed it: the source fails on its next read or
    # write (QEMU 7.2's says "Cannot write to TLS channel: Input/output error"; docs/tls.md).
    assert info["error-desc"]
    assert dst.status() == "inmigrate"


@pytest.mark.parametrize("authz_id,desc", [("nope", "Cannot find QAuthZ object ID nope"),
                                           ("tls0", "Object 'tls0' is not a QAuthZ subclass")])
def test_tls_authz_object_checked_at_the_handshake(spawn, tmp_path, authz_id, desc):
    server, client = authz_pki(tmp_path / "pki")
    src, dst, uri = start_pair(spawn, tmp_path, client, server, dst_params={"tls-authz": authz_id})
    src.cmd("migrate", uri=uri)
    _, dst_info = _refused(src, dst)
    assert dst_info == {"status": "failed", "error-desc": desc}


@pytest.mark.parametrize("endpoint", ["server", "client"])
def test_expired_certificate(spawn, tmp_path, endpoint):
    """Refused at start by the sanity check (QEMU's texts); loaded with sanity-check=off, the peer
    refuses it in the handshake with GnuTLS's verdict as QEMU words it."""
    ca = CA()
    dirs = {end: write_creds(tmp_path / end, ca, end, expired=end == endpoint) for end in ("server", "client")}
    own = dirs[endpoint]
    with pytest.raises(VMStartError, match=f"The {endpoint} certificate {own}/{endpoint}-cert.pem has expired"):
        spawn("vmigrate", "-m", "32M", "--object", f"tls-creds-x509,id=tls0,dir={own},endpoint={endpoint}")
    objects = {end: ("--object", f"tls-creds-x509,id=tls0,dir={path},endpoint={end},sanity-check=off")
               for end, path in dirs.items()}
    src = spawn("vmigrate", "-m", "32M", *objects["client"])
    dst = spawn("vmigrate", "-m", "32M", "--incoming", "defer", *objects["server"])
    for vm in (src, dst):
        vm.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{dst.migrate_status()['socket-address'][0]['port']}")
    info, dst_info = _refused(src, dst)
    if endpoint == "server":
        assert info["error-desc"] == "The certificate is not trusted"
    else:
        assert dst_info == {"status": "failed", "error-desc": "The certificate is not trusted"}
