"""tls-creds-anon objects and anonymous handshakes over a socket pair (no VM); QEMU 7.2's texts
were observed with ``qemu-system-x86_64 -object tls-creds-anon,...`` (docs/tls.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tls_certs import make_pki
from tls_pair import handshake
from vmigrate.migration import tls_anon
from vmigrate.migration.tls import AnonCreds, TlsChannel, TlsCredsError, TlsError
from vmigrate.objects import UserObjects


def dh_dir(path: Path, text: str = tls_anon.FFDHE2048_PEM) -> str:
    path.mkdir(exist_ok=True)
    (path / "dh-params.pem").write_text(text)
    return str(path)


def test_dir_is_optional_and_read_only_by_a_server(tmp_path):
    assert AnonCreds.from_options({"id": "t"}).endpoint == "client"
    assert AnonCreds.from_options({"id": "t", "endpoint": "server"}).dir == ""
    assert AnonCreds.from_options({"id": "t", "endpoint": "server", "dir": str(tmp_path / "none")})
    bad = dh_dir(tmp_path / "bad", "garbage\n")
    assert AnonCreds.from_options({"id": "t", "dir": bad, "verify-peer": "off"}).endpoint == "client"


@pytest.mark.parametrize("options,desc", [
    ({"id": "t", "loaded": "on"}, "Property 'tls-creds-anon.loaded' is not writable"),
    ({"id": "t", "endpoint": "middle"}, "Parameter 'endpoint' does not accept value 'middle'"),
    ({"id": "t", "priority": "NORMAL"}, "Invalid parameter 'priority'"),
])
def test_creds_refused(options, desc):
    with pytest.raises(TlsCredsError) as err:
        AnonCreds.from_options(options)
    assert str(err.value) == desc


def test_unreadable_dh_params_refused_with_qemus_text(tmp_path):
    directory = dh_dir(tmp_path, "garbage\n")
    with pytest.raises(TlsCredsError) as err:
        AnonCreds.from_options({"id": "t", "dir": directory, "endpoint": "server"})
    assert str(err.value) == (f"Unable to load DH parameters from {directory}/dh-params.pem: "
                              "Base64 unexpected header error.")


@pytest.mark.parametrize("with_dir", [False, True], ids=["ffdhe2048", "dh-params.pem"])
def test_handshake_and_data(tmp_path, with_dir):
    """tls-authz is not consulted (QEMU's check is a no-op for anon): an unknown authz id passes."""
    objects = UserObjects()
    server = {"id": "srv", "endpoint": "server"}
    if with_dir:
        server["dir"] = dh_dir(tmp_path)
    objects.add("tls-creds-anon", server)
    objects.add("tls-creds-anon", {"id": "cli"})
    client, server_side = handshake(objects, "srv", "cli", authz_id="nothing")
    assert isinstance(client, TlsChannel) and isinstance(server_side, TlsChannel), (client, server_side)
    assert client._ssl.version() == "TLSv1.2" and client._ssl.cipher()[0].startswith("ADH-AES")
    client.write(b"QEVM" * 1000)
    data = b""
    while len(data) < 4000:
        data += server_side.read(4000 - len(data))
    assert data == b"QEVM" * 1000
    client.close()
    assert server_side.read(10) == b""
    server_side.close()


def test_anon_client_refused_by_x509_server(tmp_path):
    """An anon client offers no suite a certificate server can pick."""
    server_dir, _ = make_pki(tmp_path / "pki")
    objects = UserObjects()
    objects.add("tls-creds-x509", {"id": "srv", "dir": str(server_dir), "endpoint": "server", "verify-peer": "off"})
    objects.add("tls-creds-anon", {"id": "cli"})
    client, server = handshake(objects, "srv", "cli", authz_id="nothing")
    assert isinstance(client, TlsError) and isinstance(server, TlsError), (client, server)
    assert str(server) == "TLS handshake failed: NO_SHARED_CIPHER"
