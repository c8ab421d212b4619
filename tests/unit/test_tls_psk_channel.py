"""tls-creds-psk objects and PSK handshakes over a socket pair (no VM)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from tls_pair import handshake
from vmigrate.migration import tls_psk
from vmigrate.migration.tls import PskCreds, TlsChannel, TlsCredsError, TlsError
from vmigrate.objects import UserObjects

KEY = "00112233445566778899aabbccddeeff"


def keys(path: Path, text: str) -> str:
    path.mkdir(exist_ok=True)
    (path / "keys.psk").write_text(text)
    return str(path)


def test_ssl_ctx_found_under_python_context():
    """The fragile part (tls_psk's docstring): the pointer read from CPython's struct is the SSL_CTX."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.options |= ssl.OP_NO_COMPRESSION
    lib = tls_psk._libssl()
    assert lib.SSL_CTX_get_options(tls_psk._ssl_ctx(lib, context)) == int(context.options)


@pytest.mark.parametrize("options,desc", [
    ({"id": "t"}, "Missing 'dir' property value"),
    ({"id": "t", "dir": "/x", "sanity-check": "off"}, "Invalid parameter 'sanity-check'"),
    ({"id": "t", "dir": "/nonexistent"}, "Unable to access credentials /nonexistent/keys.psk: "
                                         "No such file or directory"),
])
def test_creds_refused_with_qemus_texts(options, desc):
    with pytest.raises(TlsCredsError) as err:
        PskCreds.from_options(options)
    assert str(err.value) == desc


def test_client_needs_its_username_and_a_hex_key(tmp_path):
    """QEMU 7.2's texts, observed with ``qemu-system-x86_64 -object tls-creds-psk,...``."""
    directory = keys(tmp_path, f"other:{KEY}\n")
    with pytest.raises(TlsCredsError) as err:
        PskCreds.from_options({"id": "t", "dir": directory})
    assert str(err.value) == f"Username qemu not found in PSK file {directory}/keys.psk"
    assert PskCreds.from_options({"id": "t", "dir": directory, "username": "other"}).endpoint == "client"
    keys(tmp_path, "qemu:zz\n")
    with pytest.raises(TlsCredsError) as err:
        PskCreds.from_options({"id": "t", "dir": directory})
    assert str(err.value) == "Cannot set PSK client credentials: Error in parsing."


def _pair(server_dir: str, client_dir: str, username: str = "qemu"):
    objects = UserObjects()
    objects.add("tls-creds-psk", {"id": "srv", "dir": server_dir, "endpoint": "server"})
    objects.add("tls-creds-psk", {"id": "cli", "dir": client_dir, "username": username})
    return handshake(objects, "srv", "cli")


def test_handshake_and_data(tmp_path):
    directory = keys(tmp_path, f"qemu:{KEY}\n")
    client, server = _pair(directory, directory)
    assert isinstance(client, TlsChannel) and isinstance(server, TlsChannel), (client, server)
    client.write(b"QEVM" * 1000)
    data = b""
    while len(data) < 4000:
        data += server.read(4000 - len(data))
    assert data == b"QEVM" * 1000
    client.close()
    assert server.read(10) == b""
    server.close()


@pytest.mark.parametrize("case", ["wrong key", "unknown identity"])
def test_refused(tmp_path, case):
    server_dir = keys(tmp_path / "server", f"qemu:{KEY}\n")
    client_dir = keys(tmp_path / "client", f"qemu:{'ab' * 16}\nnobody:{KEY}\n")
    client, server = _pair(server_dir, client_dir, username="qemu" if case == "wrong key" else "nobody")
    assert isinstance(client, TlsError) and isinstance(server, TlsError), (client, server)
    # An unknown identity makes OpenSSL try a certificate handshake instead, and there is none.
    assert str(server) == ("TLS handshake failed: BINDER_DOES_NOT_VERIFY" if case == "wrong key"
                           else "TLS handshake failed: NO_SUITABLE_SIGNATURE_ALGORITHM")
