"""OpenSSL contexts for ``tls-creds-anon``: anonymous Diffie-Hellman in TLS 1.2.

QEMU 7.2's GnuTLS session for anon credentials uses the priority
``NORMAL:+ANON-DH`` (crypto/tlssession.c, ``TLS_PRIORITY_ADDITIONAL_ANON``):
``DH_anon`` key exchange, which exists only up to TLS 1.2.  OpenSSL names those
suites ``ADH-*`` and puts them at security level 0 (no authentication), so
both sides cap the version at TLS 1.2 and offer the AES-GCM ones, which
GnuTLS's ``NORMAL`` has too (checked against QEMU 7.2 both ways: it settles on
``ADH-AES256-GCM-SHA384``; docs/tls.md, "Anonymous credentials").

A server needs a DH group: ``dh-params.pem`` (PKCS#3 ``DH PARAMETERS``) when
the object's dir has one, as QEMU loads it; else QEMU has GnuTLS generate
2048-bit parameters, and here the fixed RFC 7919 ``ffdhe2048`` group stands in
(generating a safe prime takes seconds to minutes, and a named group is what
RFC 7919 recommends).
"""

from __future__ import annotations

import os
import ssl
import tempfile

#: OpenSSL's anonymous DH suites with AES-GCM; ``@SECLEVEL=0`` because an unauthenticated
#: key exchange is below every other level.
CIPHERS = "ADH+AESGCM:@SECLEVEL=0"

#: RFC 7919 ffdhe2048 as PKCS#3 (``openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048``).
FFDHE2048_PEM = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

_PEM_HEADER = "-----BEGIN DH PARAMETERS-----"


class DhParamsError(ValueError):
    """``dh-params.pem`` cannot be loaded; the text is QEMU's (crypto/tlscreds.c)."""


def _anon(context: ssl.SSLContext) -> ssl.SSLContext:
    """The settings both endpoints share: no certificates, TLS 1.2 at most, the ADH suites."""
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    return context


def client_context() -> ssl.SSLContext:
    """A client that offers only anonymous suites (it has nothing to verify a certificate with)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    return _anon(context)


def server_context(dh_params: str | None) -> ssl.SSLContext:
    """A server with no certificate, the DH group from *dh_params* (a path) or ffdhe2048."""
    context = _anon(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    if dh_params is not None:
        _load_dh_params(context, dh_params)
        return context
    fd, path = tempfile.mkstemp(prefix="vmigrate-dh-", suffix=".pem")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as pem:
            pem.write(FFDHE2048_PEM)
        context.load_dh_params(path)  # Python's ssl takes DH parameters only from a file
    finally:
        os.unlink(path)
    return context


def _load_dh_params(context: ssl.SSLContext, path: str) -> None:
    """Load *path* as QEMU does; a file without a PKCS#3 header (garbage, X9.42 parameters) is
    refused with GnuTLS's text, as QEMU 7.2 words it."""
    prefix = f"Unable to load DH parameters from {path}"
    try:
        with open(path, encoding="ascii", errors="replace") as pem:
            text = pem.read()
    except OSError as err:
        raise DhParamsError(f"{prefix}: {os.strerror(err.errno or 0)}") from None
    if _PEM_HEADER not in text:
        raise DhParamsError(f"{prefix}: Base64 unexpected header error.")
    try:
        context.load_dh_params(path)
    except ssl.SSLError as err:
        raise DhParamsError(f"{prefix}: {err.reason or err}") from None
