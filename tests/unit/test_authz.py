"""tls-authz: the authz-simple and authz-list objects, the client DN as QEMU sees it, the check
on a TLS server channel over a socket pair (no VM), and the certificate validity check at load."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tls_certs import CA, write_creds
from vmigrate.cli.main import CLIError
from vmigrate.cli.run import add_object
from vmigrate.errors import VMError
from vmigrate.migration.authz import ListAuthz, SimpleAuthz, glob_match
from vmigrate.migration.channel import SocketChannel
from vmigrate.migration.tls import TlsCreds, TlsCredsError, TlsError, client_channel, server_channel
from vmigrate.objects import UserObjects


def _rdn(*attrs: tuple) -> x509.RelativeDistinguishedName:
    return x509.RelativeDistinguishedName([x509.NameAttribute(oid, value) for oid, value in attrs])


#: A subject with every attribute name mapped and every escape, and the text QEMU 7.2 printed
#: for it ("TLS x509 authz check for ... is denied", observed with authz-simple).
RICH_SUBJECT = x509.Name([
    _rdn((NameOID.DOMAIN_COMPONENT, "org"), (NameOID.USER_ID, "u1")),
    _rdn((NameOID.STATE_OR_PROVINCE_NAME, "#S;t")), _rdn((NameOID.LOCALITY_NAME, " L<o>n+d\\ ")),
    _rdn((NameOID.STREET_ADDRESS, 'a"b')), _rdn((NameOID.TITLE, "t")), _rdn((NameOID.SERIAL_NUMBER, "42")),
    _rdn((NameOID.GIVEN_NAME, "g")), _rdn((NameOID.SURNAME, "s")), _rdn((NameOID.PSEUDONYM, "p")),
    _rdn((NameOID.POSTAL_CODE, "pc")), _rdn((NameOID.BUSINESS_CATEGORY, "bc")),
    _rdn((NameOID.DN_QUALIFIER, "dq")), _rdn((NameOID.INITIALS, "i")),
    _rdn((NameOID.GENERATION_QUALIFIER, "gq")), _rdn((NameOID.COUNTRY_NAME, "GB")),
    _rdn((NameOID.ORGANIZATION_NAME, "Example, Inc")), _rdn((NameOID.ORGANIZATIONAL_UNIT_NAME, "Dev")),
    _rdn((NameOID.COMMON_NAME, "client.example")), _rdn((NameOID.EMAIL_ADDRESS, "a@b.c")),
])
RICH_DN = ("UID=u1+DC=org,ST=\\#S\\;t,L=\\ L\\<o\\>n\\+d\\\\\\ ,street=a\\\"b,title=t,serialNumber=42,givenName=g,"
           "surName=s,pseudonym=p,postalCode=pc,businessCategory=bc,dnQualifier=dq,initials=i,"
           "generationQualifier=gq,C=GB,O=Example\\, Inc,OU=Dev,CN=client.example,EMAIL=a@b.c")


@pytest.mark.parametrize("pattern,identity,hit", [
    ("*", "", True), ("CN=*", "CN=a,O=b", True), ("CN=?", "CN=ab", False), ("CN=a?", "CN=ab", True),
    ("[a]", "a", False), ("[a]", "[a]", True), ("a\\*", "a\\xyz", True), ("*.example", "x.example.org", False),
])
def test_glob_is_glibs_simple_pattern(pattern, identity, hit):
    assert glob_match(pattern, identity) == hit


def test_authz_list_first_matching_rule_decides():
    authz = ListAuthz.from_options({
        "id": "a", "policy": "allow",
        "rules.0.match": "CN=bad.example", "rules.0.policy": "deny",
        "rules.1.match": "CN=*.example", "rules.1.policy": "allow", "rules.1.format": "glob",
        "rules.2.match": "CN=*", "rules.2.policy": "deny", "rules.2.format": "glob"})
    assert [authz.is_allowed(dn) for dn in ("CN=bad.example", "CN=good.example", "CN=other", "O=x")] == \
        [False, True, False, True]
    assert not ListAuthz.from_options({"id": "a"}).is_allowed("CN=x"), "deny by default"
    exact = ListAuthz.from_options({"id": "a", "rules.0.match": "CN=*", "rules.0.policy": "allow"})
    assert exact.is_allowed("CN=*") and not exact.is_allowed("CN=x"), "exact by default"


@pytest.mark.parametrize("kind,options,desc", [
    ("authz-simple", {"id": "a"}, "The 'identity' property must be set"),
    ("authz-simple", {"id": "a", "identity": "x", "policy": "allow"}, "Invalid parameter 'policy'"),
    ("authz-list", {"id": "a", "policy": "maybe"}, "Parameter 'policy' does not accept value 'maybe'"),
    ("authz-list", {"id": "a", "rules.0.match": "x"}, "Parameter 'rules[0].policy' is missing"),
    ("authz-list", {"id": "a", "rules.0.policy": "allow"}, "Parameter 'rules[0].match' is missing"),
    ("authz-list", {"id": "a", "rules.0.match": "x", "rules.0.policy": "allow", "rules.0.format": "regex"},
     "Parameter 'rules[0].format' does not accept value 'regex'"),
    ("authz-list", {"id": "a", "rules.1.match": "x", "rules.1.policy": "allow"}, "Parameter 'rules' expects array"),
    ("authz-list", {"id": "a", "rules.0.bogus": "x"}, "Invalid parameter 'rules.0.bogus'"),
])
def test_authz_objects_refused(kind, options, desc):
    with pytest.raises(VMError) as err:
        UserObjects().add(kind, options)
    assert err.value.desc == desc


def test_command_line_comma_escape():
    """QEMU's ``,,``: the only way to put a DN's commas into ``identity``."""
    objects = UserObjects()
    add_object(objects, "authz-simple,id=a,identity=CN=client,,O=Example\\,, Inc")
    assert objects["a"] == SimpleAuthz("a", "CN=client,O=Example\\, Inc")
    with pytest.raises(CLIError, match="Invalid parameter 'x'"):
        add_object(objects, "authz-simple,id=b,identity=CN=c,x")


def _handshake(server_dir: Path, client_dir: Path, objects: dict, authz_id: str) -> tuple[object, object]:
    """(client side, server side) of a handshake: a channel or the TlsError."""
    objects = {**objects, "srv": TlsCreds.from_options({"id": "srv", "dir": str(server_dir), "endpoint": "server"}),
               "cli": TlsCreds.from_options({"id": "cli", "dir": str(client_dir)})}
    a, b = socket.socketpair()
    result: dict = {}

    def serve() -> None:
        try:
            result["server"] = server_channel(SocketChannel(b), objects, "srv", authz_id)
        except TlsError as err:
            b.close()
            result["server"] = err

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        result["client"] = client_channel(SocketChannel(a), objects, "cli", "127.0.0.1")
    except TlsError as err:
        result["client"] = err
    thread.join(10)
    a.close()
    return result["client"], result["server"]


@pytest.fixture(scope="module")
def rich_pki(tmp_path_factory) -> tuple[Path, Path]:
    root, ca = tmp_path_factory.mktemp("pki"), CA()
    return write_creds(root / "server", ca, "server"), write_creds(root / "client", ca, "client", subject=RICH_SUBJECT)


@pytest.mark.parametrize("authz,allowed", [
    (SimpleAuthz("auth0", RICH_DN), True),
    (SimpleAuthz("auth0", "CN=client.example"), False),
    (ListAuthz("auth0", "allow", ()), True),
    (ListAuthz.from_options({"id": "auth0", "policy": "allow", "rules.0.match": "*,CN=client.ex?mple,*",
                             "rules.0.policy": "deny", "rules.0.format": "glob"}), False),
])
def test_server_checks_the_client_dn(rich_pki, authz, allowed):
    client, server = _handshake(*rich_pki, {"auth0": authz}, "auth0")
    if allowed:
        assert not isinstance(server, TlsError), server
    else:
        assert str(server) == f"TLS x509 authz check for {RICH_DN} is denied"


@pytest.mark.parametrize("authz_id,desc", [
    ("nope", "Cannot find QAuthZ object ID nope"),
    ("cli", "Object 'cli' is not a QAuthZ subclass"),
])
def test_authz_object_looked_up_at_the_handshake(rich_pki, authz_id, desc):
    _, server = _handshake(*rich_pki, {}, authz_id)
    assert str(server) == desc


def test_no_check_without_verify_peer(rich_pki, tmp_path):
    """QEMU's whole certificate check, authz included, is skipped with verify-peer=off."""
    server_dir, client_dir = rich_pki
    objects = {"srv": TlsCreds.from_options({"id": "srv", "dir": str(server_dir), "endpoint": "server",
                                             "verify-peer": "off"}),
               "cli": TlsCreds.from_options({"id": "cli", "dir": str(client_dir)}),
               "auth0": SimpleAuthz("auth0", "nobody")}
    a, b = socket.socketpair()
    thread = threading.Thread(target=client_channel, args=(SocketChannel(a), objects, "cli", "127.0.0.1"))
    thread.start()
    assert server_channel(SocketChannel(b), objects, "srv", "auth0")
    thread.join(10)
    a.close()
    b.close()


@pytest.mark.parametrize("endpoint", ["server", "client"])
def test_expired_certificate_refused_at_load(tmp_path, endpoint):
    """QEMU's sanity check (qcrypto_tls_creds_check_cert_times) on by default, with its texts."""
    directory = write_creds(tmp_path / endpoint, CA(), endpoint, expired=True)
    options = {"id": "t", "dir": str(directory), "endpoint": endpoint}
    with pytest.raises(TlsCredsError) as err:
        TlsCreds.from_options(options)
    assert str(err.value) == f"The {endpoint} certificate {directory}/{endpoint}-cert.pem has expired"
    assert TlsCreds.from_options({**options, "sanity-check": "off"}).endpoint == endpoint
