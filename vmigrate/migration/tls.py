"""TLS on migration channels with x509 credentials (QEMU's migration/tls.c, crypto/tlscredsx509.c).

A ``tls-creds-x509`` object names a directory holding QEMU's file names
(``ca-cert.pem``, ``server-cert.pem``/``server-key.pem`` or
``client-cert.pem``/``client-key.pem``) and an endpoint; as in QEMU the
files are loaded when the object is created, so a missing file stops the
process at start.  With the ``tls-creds`` parameter set, the source wraps
every channel it opens (main channel, hence the return path, and each
multifd channel) as a TLS client and the destination wraps every channel
it accepts as a TLS server.  The stream inside is unchanged, so the codecs
under ``wire/`` never see TLS.

The channel runs OpenSSL through an ``ssl.SSLObject`` over memory BIOs
rather than an ``ssl.SSLSocket``: the return path reads the main channel in
one thread while the migration thread writes it, and an OpenSSL session
must not be used by two threads at once.  Here the session is touched only
under a lock, and socket I/O happens outside it.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import ssl
import threading
from dataclasses import dataclass
from typing import Mapping

from vmigrate.migration import tls_anon, tls_psk
from vmigrate.migration.authz import Authz
from vmigrate.migration.channel import Channel, ChannelError, FdChannel, SocketChannel

log = logging.getLogger(__name__)

CA_CERT = "ca-cert.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
PSK_FILE = "keys.psk"
DH_PARAMS = "dh-params.pem"
#: Bytes read from the socket per call (one TLS record is at most ~16 KiB).
RECV_CHUNK = 1 << 16


class TlsError(ChannelError):
    """TLS could not be set up on a channel: no usable credentials, or a failed handshake."""


class TlsCredsError(ValueError):
    """A ``tls-creds-x509``, ``tls-creds-psk`` or ``tls-creds-anon`` object that cannot be created
    (the process does not start)."""


def _on_off(name: str, value: str) -> bool:
    """QEMU's boolean property parser (qapi/qobject-input-visitor.c)."""
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise TlsCredsError(f"Parameter '{name}' expects 'on' or 'off'")


@dataclass(frozen=True)
class TlsCreds:
    """One ``tls-creds-x509`` object and the SSL context built from its files."""

    id: str
    dir: str
    endpoint: str  # client | server
    verify_peer: bool
    context: ssl.SSLContext

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> "TlsCreds":
        """``id=ID,dir=DIR[,endpoint=client|server][,verify-peer=on|off]`` (QEMU's defaults: client, on)."""
        obj_id, directory, endpoint = _common_options(
            options, {"id", "dir", "endpoint", "verify-peer", "sanity-check"})
        verify_peer = _on_off("verify-peer", options.get("verify-peer", "on"))
        sanity_check = _on_off("sanity-check", options.get("sanity-check", "on"))
        context = _build_context(directory, endpoint, verify_peer)
        if sanity_check:
            _check_times(directory, endpoint)
        return cls(obj_id, directory, endpoint, verify_peer, context)


def _common_options(options: Mapping[str, str], known: set[str],
                    dir_required: bool = True) -> tuple[str, str, str]:
    """(id, dir, endpoint) with QEMU's texts for the properties every tls-creds type has; *dir* is
    ``""`` when it is optional (anon) and not given."""
    unknown = set(options) - known
    if unknown:
        raise TlsCredsError(f"Invalid parameter '{sorted(unknown)[0]}'")
    if "id" not in options:
        raise TlsCredsError("Parameter 'id' is missing")
    endpoint = options.get("endpoint", "client")
    if endpoint not in ("client", "server"):
        raise TlsCredsError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
    directory = options.get("dir", "")
    if not directory and dir_required:
        raise TlsCredsError("Missing 'dir' property value")
    return options["id"], directory, endpoint


@dataclass(frozen=True)
class PskCreds:
    """One ``tls-creds-psk`` object (QEMU's crypto/tlscredspsk.c): a pre-shared key instead of
    certificates.  ``DIR/keys.psk`` holds ``username:hexkey`` lines; a client proves its
    ``username``'s key (default ``qemu``, read at creation as QEMU does), a server looks the
    client's identity up in the file at each handshake (as GnuTLS's password file is read).
    OpenSSL is given the keys through :mod:`vmigrate.migration.tls_psk`."""

    id: str
    dir: str
    endpoint: str
    context: ssl.SSLContext
    callback: object  # the ctypes callback OpenSSL calls: kept alive with the context
    #: No certificate to verify: a PSK proves both sides, and QEMU needs no ``tls-hostname``.
    verify_peer: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> "PskCreds":
        """``id=ID,dir=DIR[,endpoint=client|server][,username=NAME]`` (QEMU's defaults: client, qemu)."""
        obj_id, directory, endpoint = _common_options(options, {"id", "dir", "endpoint", "username", "verify-peer"})
        _on_off("verify-peer", options.get("verify-peer", "on"))  # accepted, as QEMU does; unused with PSK
        path = _credential(directory, PSK_FILE, required=True)
        assert path is not None
        try:
            if endpoint == "server":
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.verify_mode = ssl.CERT_NONE
                context.num_tickets = 0  # as for x509 (see _build_context)
                callback = tls_psk.install_server(context, lambda identity: _server_key(path, identity))
            else:
                username = options.get("username", "qemu")
                key = _psk_lookup(path, username)
                if key is None:
                    raise TlsCredsError(f"Username {username} not found in PSK file {path}")
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                callback = tls_psk.install_client(context, username, key)
        except tls_psk.PskUnavailable as err:
            raise TlsCredsError(str(err)) from None
        # TLS 1.3 only: Python's default TLS 1.2 cipher list excludes PSK, and QEMU 7.2's GnuTLS
        # negotiates TLS 1.3 with it (docs/tls.md, "PSK credentials").
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        return cls(obj_id, directory, endpoint, context, callback)


@dataclass(frozen=True)
class AnonCreds:
    """One ``tls-creds-anon`` object (QEMU's crypto/tlscredsanon.c): anonymous Diffie-Hellman in
    TLS 1.2, no certificate and no key, so it encrypts but proves nothing about the peer
    (docs/tls.md, "Anonymous credentials").  A server's DH group is ``DIR/dh-params.pem`` when
    there is one; the context comes from :mod:`vmigrate.migration.tls_anon`."""

    id: str
    dir: str
    endpoint: str
    context: ssl.SSLContext
    #: Nothing to verify: QEMU's credential check is a no-op for anon (crypto/tlssession.c), so
    #: no ``tls-hostname`` is needed and ``tls-authz`` is not consulted.
    verify_peer: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> "AnonCreds":
        """``id=ID[,dir=DIR][,endpoint=client|server][,verify-peer=on|off]`` (QEMU's default: client)."""
        if "loaded" in options:
            raise TlsCredsError("Property 'tls-creds-anon.loaded' is not writable")
        obj_id, directory, endpoint = _common_options(
            options, {"id", "dir", "endpoint", "verify-peer"}, dir_required=False)
        _on_off("verify-peer", options.get("verify-peer", "on"))  # accepted, as QEMU does; unused
        if endpoint == "client":
            return cls(obj_id, directory, endpoint, tls_anon.client_context())
        # QEMU reads dh-params.pem only from a server's dir, optional there (qcrypto_tls_creds_anon_load).
        dh_params = _credential(directory, DH_PARAMS, required=False) if directory else None
        try:
            context = tls_anon.server_context(dh_params)
        except tls_anon.DhParamsError as err:
            raise TlsCredsError(str(err)) from None
        return cls(obj_id, directory, endpoint, context)


def _server_key(path: str, identity: str) -> bytes | None:
    """A server's key for the client's *identity*, looked up at each handshake; None refuses it."""
    try:
        return _psk_lookup(path, identity)
    except TlsCredsError as err:
        log.warning("TLS-PSK key for %r in %s: %s", identity, path, err)
        return None


def _psk_lookup(path: str, username: str) -> bytes | None:
    """*username*'s key in a ``keys.psk`` file (QEMU's lookup_key: the first ``username:`` line);
    None when absent.  A key that is not hex is refused with GnuTLS's text, as QEMU reports it."""
    try:
        with open(path, encoding="utf-8", errors="replace") as psk_file:
            lines = psk_file.read().split("\n")
    except OSError as err:
        log.warning("Cannot read PSK file %s: %s", path, err)
        return None
    for line in lines:
        if line.startswith(f"{username}:"):
            try:
                return bytes.fromhex(line[len(username) + 1:])
            except ValueError:
                raise TlsCredsError("Cannot set PSK client credentials: Error in parsing.") from None
    return None


def _credential(directory: str, name: str, required: bool) -> str | None:
    """QEMU's qcrypto_tls_creds_get_path: the file's path, None if optional and absent."""
    path = os.path.join(directory, name)
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        if required:
            raise TlsCredsError(f"Unable to access credentials {path}: {os.strerror(err.errno or 2)}") from None
        return None
    return path


def _build_context(directory: str, endpoint: str, verify_peer: bool) -> ssl.SSLContext:
    """The files QEMU's crypto/tlscredsx509.c loads for the endpoint, as an OpenSSL context.

    The CA certificate is required even with ``verify-peer=off``, as QEMU
    requires it.  A server always presents its certificate and, with ``verify-peer``,
    demands a client certificate signed by the CA; a client checks the
    server's certificate and name unless ``verify-peer=off`` and presents
    its own certificate when the directory has one.
    """
    server = endpoint == "server"
    ca = _credential(directory, CA_CERT, required=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    cert_name, key_name = (SERVER_CERT, SERVER_KEY) if server else (CLIENT_CERT, CLIENT_KEY)
    cert = _credential(directory, cert_name, required=server)
    key = _credential(directory, key_name, required=server)
    try:
        context.load_verify_locations(cafile=ca)
        if cert is not None and key is not None:
            context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as err:
        raise TlsCredsError(f"Unable to load credentials from {directory}: {err}") from None
    if server:
        context.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
        # No TLS 1.3 session tickets: a source that never reads its main channel (no return
        # path) would close with them unread, and the reset could cut the stream's end.
        context.num_tickets = 0
    elif not verify_peer:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _der_items(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(tag, content start, content end) of each DER element in ``data[start:end]``."""
    items = []
    while start < end:
        tag, length, pos = data[start], data[start + 1], start + 2
        if length & 0x80:
            count = length & 0x7F
            length, pos = int.from_bytes(data[pos:pos + count], "big"), pos + count
        items.append((tag, pos, pos + length))
        start = pos + length
    return items


def _validity(pem: str) -> tuple[datetime.datetime, datetime.datetime]:
    """(notBefore, notAfter) of a PEM certificate: Certificate > TBSCertificate > the validity
    SEQUENCE after [version], serial, signature algorithm and issuer (RFC 5280 §4.1).  Read
    here because Python's ``ssl`` shows no certificate it has loaded."""
    der = ssl.PEM_cert_to_DER_cert(pem)
    (_, cert_start, cert_end), = _der_items(der, 0, len(der))
    tbs = _der_items(der, *_der_items(der, cert_start, cert_end)[0][1:])
    fields = tbs[1:] if tbs[0][0] == 0xA0 else tbs
    times = []
    for tag, start, end in _der_items(der, *fields[3][1:]):
        text = der[start:end].decode("ascii")
        if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049
            text = ("19" if int(text[:2]) >= 50 else "20") + text
        times.append(datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.timezone.utc))
    return times[0], times[1]


def _check_times(directory: str, endpoint: str) -> None:
    """The validity part of QEMU's sanity check (qcrypto_tls_creds_check_cert_times, on unless
    ``sanity-check=off``): the endpoint's own certificate, then each CA certificate, with QEMU's
    texts; QEMU's other sanity checks (constraints, key usage) are not made here."""
    own = CLIENT_CERT if endpoint == "client" else SERVER_CERT
    now = datetime.datetime.now(datetime.timezone.utc)
    checks = [(os.path.join(directory, own), f"{endpoint} certificate"),
              (os.path.join(directory, CA_CERT), "CA certificate")]
    for path, what in checks:
        try:
            with open(path, encoding="ascii") as pem_file:
                pems = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", pem_file.read(), re.S)
        except FileNotFoundError:
            continue  # a client's own certificate is optional
        for pem in pems:
            not_before, not_after = _validity(pem)
            if not_after < now:
                raise TlsCredsError(f"The {what} {path} has expired")
            if not_before > now:
                raise TlsCredsError(f"The {what} {path} is not yet active")


def get_creds(objects: Mapping[str, object], creds_id: str, endpoint: str) -> TlsCreds | PskCreds | AnonCreds:
    """QEMU's migration_tls_get_creds and qcrypto_tls_creds_check_endpoint, with their texts."""
    found = objects.get(creds_id)
    if found is None:
        raise TlsError(f"No TLS credentials with id '{creds_id}'")
    if not isinstance(found, (TlsCreds, PskCreds, AnonCreds)):
        raise TlsError(f"Object with id '{creds_id}' is not TLS credentials")
    if found.endpoint != endpoint:
        raise TlsError(f"Expected TLS credentials for a {endpoint} endpoint")
    return found


def client_channel(channel: Channel, objects: Mapping[str, object], creds_id: str,
                   hostname: str) -> "TlsChannel":
    """The source's side (migration_tls_client_create): *hostname* is ``tls-hostname`` or the URI's
    host; a unix socket has none, which only PSK, anon and ``verify-peer=off`` x509 credentials can do without."""
    found = get_creds(objects, creds_id, "client")
    if not hostname and found.verify_peer:
        # QEMU's check of the server's certificate (crypto/tlssession.c) needs a name to match.
        raise TlsError("No hostname for certificate validation")
    return TlsChannel(_two_way(channel), found.context, server_side=False, hostname=hostname or None)


def server_channel(channel: Channel, objects: Mapping[str, object], creds_id: str,
                   authz_id: str = "") -> "TlsChannel":
    """The destination's side (migration_tls_channel_process_incoming); with *authz_id* (``tls-authz``)
    the client's certificate must be allowed by that object once the handshake is done."""
    found = get_creds(objects, creds_id, "server")
    session = TlsChannel(_two_way(channel), found.context, server_side=True, hostname=None)
    # As in QEMU's qcrypto_tls_session_check_certificate, which verify-peer=off skips whole.
    if authz_id and found.verify_peer:
        _check_authz(objects, authz_id, session.peer_dn())
    return session


def _check_authz(objects: Mapping[str, object], authz_id: str, peername: str) -> None:
    """QEMU's qauthz_is_allowed_by_id and the check after it, with their texts: the object is
    looked up at every handshake (docs/tls.md, "Authorizing clients")."""
    found = objects.get(authz_id)
    if found is None:
        raise TlsError(f"Cannot find QAuthZ object ID {authz_id}")
    if not isinstance(found, Authz):
        raise TlsError(f"Object '{authz_id}' is not a QAuthZ subclass")
    if not found.is_allowed(peername):
        log.info("TLS client %s refused by %s", peername, authz_id)
        raise TlsError(f"TLS x509 authz check for {peername} is denied")


#: OpenSSL's long attribute names (as ``getpeercert`` gives them) -> GnuTLS's, which
#: ``gnutls_x509_crt_get_dn`` prints; each one checked against QEMU 7.2's denial text.
_DN_NAMES = {
    "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L", "organizationName": "O",
    "organizationalUnitName": "OU", "commonName": "CN", "emailAddress": "EMAIL", "domainComponent": "DC",
    "userId": "UID", "streetAddress": "street", "title": "title", "serialNumber": "serialNumber",
    "givenName": "givenName", "surname": "surName", "pseudonym": "pseudonym", "postalCode": "postalCode",
    "businessCategory": "businessCategory", "dnQualifier": "dnQualifier", "initials": "initials",
    "generationQualifier": "generationQualifier",
}


def _dn_escape(value: str) -> str:
    """GnuTLS's escaping of an attribute value (lib/x509/dn.c): the RFC 4514 specials anywhere,
    ``#`` and space first, space last."""
    out = []
    for i, char in enumerate(value):
        if char in ',+"\\<>;' or (i == 0 and char in "# ") or (i == len(value) - 1 and char == " "):
            out.append("\\")
        out.append(char)
    return "".join(out)


def format_dn(subject: tuple) -> str:
    """A certificate subject from ``SSLObject.getpeercert()`` as GnuTLS's ``gnutls_x509_crt_get_dn``
    prints it, which is what QEMU hands to the authz object: the RDNs in the certificate's order
    (not RFC 4514's reversed one), ``,`` between them, ``+`` inside a multi-valued one, e.g.
    ``C=GB,O=Example\\, Inc,CN=client.example``.  An attribute GnuTLS has no name for keeps
    OpenSSL's (GnuTLS would print its OID and DER in hex)."""
    return ",".join("+".join(f"{_DN_NAMES.get(name, name)}={_dn_escape(value)}" for name, value in rdn)
                    for rdn in subject)


def _two_way(channel: Channel) -> Channel:
    """A socket, an ``exec:`` command's pipes or an ``fd:`` socket carry TLS, as in QEMU 7.2
    (docs/tls.md, "exec: and fd:"); an ``fd:`` pipe is one-way, and the handshake could not run."""
    if not channel.two_way:
        raise TlsError("TLS needs a two-way channel: the fd: descriptor is not a socket")
    return channel


#: OpenSSL's X509_V_ERR_* codes and the texts of QEMU's certificate check
#: (crypto/tlssession.c qcrypto_tls_session_check_certificate), which a QEMU
#: source puts in its error-desc.
_ISSUER_UNKNOWN = "The certificate hasn't got a known issuer"
#: An expired or not yet valid certificate fails GnuTLS's chain verification before QEMU's
#: own time checks, with its catch-all text (QEMU 7.2 verified for expired ones).
_NOT_TRUSTED = "The certificate is not trusted"
_VERIFY_TEXTS = {2: _ISSUER_UNKNOWN, 18: _ISSUER_UNKNOWN, 19: _ISSUER_UNKNOWN, 20: _ISSUER_UNKNOWN,
                 21: _ISSUER_UNKNOWN, 9: _NOT_TRUSTED, 10: _NOT_TRUSTED, 23: "The certificate has been revoked"}
_X509_V_ERR_HOSTNAME_MISMATCH, _X509_V_ERR_IP_ADDRESS_MISMATCH = 62, 64


def _verify_failure(err: ssl.SSLCertVerificationError, hostname: str | None) -> str:
    """The peer's certificate was refused: QEMU's text for the reason where there is one."""
    if err.verify_code in (_X509_V_ERR_HOSTNAME_MISMATCH, _X509_V_ERR_IP_ADDRESS_MISMATCH):
        return f"Certificate does not match the hostname {hostname}"
    return _VERIFY_TEXTS.get(err.verify_code, f"The certificate is not trusted: {err.verify_message}")


class TlsChannel(Channel):
    """A TLS session over a two-way channel (socket, ``exec:`` pipes, ``fd:`` socket); the handshake
    runs in the constructor.

    ``_lock`` guards the OpenSSL session and its BIOs; ``_send_lock`` keeps
    records on the wire in the order the session produced them when a read
    (a TLS 1.3 key update) and a write both have something to send.
    """

    def __init__(self, raw: Channel, context: ssl.SSLContext, server_side: bool,
                 hostname: str | None) -> None:
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=hostname)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._eof = False
        self._handshake()

    def peer_dn(self) -> str:
        """The verified peer certificate's subject, as QEMU's authz check sees it (:func:`format_dn`)."""
        with self._lock:
            cert = self._ssl.getpeercert()
        return format_dn(cert.get("subject", ()) if cert else ())

    def _handshake(self) -> None:
        while True:
            try:
                with self._lock:
                    self._ssl.do_handshake()
                self._flush()
                log.debug("TLS handshake done: %s %s", self._ssl.version(), self._ssl.cipher())
                return
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise TlsError("TLS handshake failed: the peer closed the connection") from None
            except ssl.SSLCertVerificationError as err:
                self._flush()
                raise TlsError(_verify_failure(err, self._ssl.server_hostname)) from None
            except ssl.SSLError as err:
                self._flush()
                raise TlsError(f"TLS handshake failed: {err.reason or err}") from None

    def _flush(self) -> None:
        """Send what the session has produced (records, alerts)."""
        with self._send_lock:
            with self._lock:
                data = self._out.read()
            if data:
                self.raw.write(data)

    def _fill(self) -> bool:
        """Feed the session one read of the channel; False at its end."""
        data = self.raw.read(RECV_CHUNK)
        with self._lock:
            if data:
                self._in.write(data)
            else:
                self._in.write_eof()
        return bool(data)

    def fileno(self) -> int:
        return self.raw.fileno()

    @property
    def bidirectional(self) -> bool:
        return True

    def write(self, data) -> None:
        with self._send_lock:
            with self._lock:
                try:
                    self._ssl.write(data)
                except ssl.SSLError as err:
                    raise ChannelError(f"Unable to write to TLS channel: {err.reason or err}") from None
                out = self._out.read()
            self.raw.write(out)

    def read(self, size: int) -> bytes:
        while True:
            try:
                with self._lock:
                    if self._eof:
                        return b""
                    data = self._ssl.read(size)
                    pending = self._out.pending
            except ssl.SSLWantReadError:
                if self._out.pending:
                    self._flush()
                self._fill()  # at the channel's end the next read reports it
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # QEMU 7.2 closes without close_notify: an unannounced end is the end of the stream.
                self._eof = True
                return b""
            except ssl.SSLError as err:
                raise ChannelError(f"Unable to read from TLS channel: {err.reason or err}") from None
            if pending:
                self._flush()
            return data

    def shutdown(self) -> None:
        self.raw.shutdown()

    def drain(self, timeout: float) -> None:
        self.raw.drain(timeout)

    def close(self) -> None:
        """Discard input already here (a GnuTLS server's session tickets) before closing: closing
        with unread input resets the connection, which could cut what the peer has yet to read."""
        sock = self.raw.sock if isinstance(self.raw, (SocketChannel, FdChannel)) else None
        if sock is not None:  # a pipe's unread input resets nothing
            try:
                sock.setblocking(False)
                while sock.recv(RECV_CHUNK):
                    pass
            except OSError:
                pass
        self.raw.close()
