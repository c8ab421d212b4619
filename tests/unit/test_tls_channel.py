"""tls-creds-x509 objects and TLS channels over a socket pair (no VM)."""

from __future__ import annotations

import threading

import pytest

from tls_certs import make_pki
from tls_pair import handshake
from vmigrate.migration.tls import TlsChannel, TlsCreds, TlsCredsError, TlsError


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("options,desc", [
    ({"dir": "/x"}, "Parameter 'id' is missing"),
    ({"id": "t"}, "Missing 'dir' property value"),
    ({"id": "t", "dir": "/x", "endpoint": "bogus"}, "Parameter 'endpoint' does not accept value 'bogus'"),
    ({"id": "t", "dir": "/x", "verify-peer": "maybe"}, "Parameter 'verify-peer' expects 'on' or 'off'"),
    ({"id": "t", "dir": "/x", "foo": "1"}, "Invalid parameter 'foo'"),
    ({"id": "t", "dir": "/nonexistent"}, "Unable to access credentials /nonexistent/ca-cert.pem: "
                                         "No such file or directory"),
])
def test_creds_refused_with_qemus_texts(options, desc):
    with pytest.raises(TlsCredsError) as err:
        TlsCreds.from_options(options)
    assert str(err.value) == desc


def test_server_needs_its_key_pair_client_does_not(pki, tmp_path):
    server, client = pki
    (tmp_path / "server-cert.pem").write_bytes((server / "server-cert.pem").read_bytes())
    with pytest.raises(TlsCredsError, match="ca-cert.pem"):
        TlsCreds.from_options({"id": "t", "dir": str(tmp_path), "endpoint": "server", "verify-peer": "off"})
    with pytest.raises(TlsCredsError, match="server-cert.pem"):
        TlsCreds.from_options({"id": "t", "dir": str(client), "endpoint": "server"})
    assert TlsCreds.from_options({"id": "t", "dir": str(server), "endpoint": "client"}).endpoint == "client"


def _pair(pki, hostname: str):
    server, client = pki
    creds = {"srv": TlsCreds.from_options({"id": "srv", "dir": str(server), "endpoint": "server"}),
             "cli": TlsCreds.from_options({"id": "cli", "dir": str(client)})}
    return handshake(creds, "srv", "cli", hostname)


def _read_all(channel: TlsChannel, size: int, out: list) -> None:
    data = bytearray()
    while len(data) < size:
        chunk = channel.read(1 << 16)
        assert chunk
        data += chunk
    out.append(bytes(data))


def test_both_directions_at_once(pki):
    """As with a return path: each side reads in one thread while another writes the same session."""
    client, server = _pair(pki, "127.0.0.1")
    assert isinstance(client, TlsChannel) and isinstance(server, TlsChannel)
    up, down = bytes(range(256)) * 8192, bytes(range(255, -1, -1)) * 8192
    got_up: list = []
    got_down: list = []
    threads = [threading.Thread(target=_read_all, args=(server, len(up), got_up)),
               threading.Thread(target=_read_all, args=(client, len(down), got_down)),
               threading.Thread(target=server.writev, args=([down[:1000], down[1000:]],))]
    for thread in threads:
        thread.start()
    client.writev([up[:5000], up[5000:]])
    for thread in threads:
        thread.join(20)
    assert got_up == [up] and got_down == [down]
    client.close()
    assert server.read(10) == b""
    server.close()


def test_wrong_name_refused(pki):
    client, server = _pair(pki, "example.com")
    assert str(client) == "Certificate does not match the hostname example.com"
    assert isinstance(server, TlsError)
