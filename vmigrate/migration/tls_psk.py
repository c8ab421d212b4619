"""OpenSSL's PSK callbacks on an ``ssl.SSLContext``, through ctypes (for ``tls-creds-psk``).

Why this exists: Python's ``ssl`` module exposes PSK only from Python 3.13
(``SSLContext.set_psk_client_callback`` / ``set_psk_server_callback``); the
3.11 used here has nothing, nor has pyOpenSSL.  So this module registers
OpenSSL's own callbacks (``SSL_CTX_set_psk_client_callback`` and
``SSL_CTX_set_psk_server_callback``) on the ``SSL_CTX`` underneath a Python
context.  OpenSSL applies these legacy callbacks to TLS 1.3 too, as an
external PSK with SHA-256, which is what QEMU's GnuTLS uses for a PSK given
by ``gnutls_psk_set_*_credentials``.

It is fragile by nature (docs/tls.md, "PSK credentials"): it reads the
``SSL_CTX*`` from CPython's private ``PySSLContext`` layout (the first field
after ``PyObject_HEAD``) and assumes ``_ssl`` is linked against the
``libssl.so.3`` loaded here.  :func:`install` checks both by comparing
``SSL_CTX_get_options`` with ``context.options`` and refuses otherwise.
Remove the module when the project moves to Python 3.13, whose ``ssl`` does
the same with its own API.
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

#: CPython's object header (ob_refcnt, ob_type) on a 64-bit non-debug build; the SSL_CTX* follows.
_PYOBJECT_HEAD = 2 * ctypes.sizeof(ctypes.c_void_p)

_ServerCallback = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p,
                                   ctypes.POINTER(ctypes.c_ubyte), ctypes.c_uint)
_ClientCallback = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p,
                                   ctypes.POINTER(ctypes.c_char), ctypes.c_uint,
                                   ctypes.POINTER(ctypes.c_ubyte), ctypes.c_uint)


class PskUnavailable(RuntimeError):
    """The running Python's ``ssl`` cannot be given PSK callbacks this way."""


def _libssl() -> ctypes.CDLL:
    """The OpenSSL 3 library ``_ssl`` is linked to (already loaded, so the same copy)."""
    try:
        lib = ctypes.CDLL("libssl.so.3")
    except OSError as err:
        raise PskUnavailable(f"TLS-PSK needs libssl.so.3: {err}") from None
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_set_psk_server_callback.restype = None
    lib.SSL_CTX_set_psk_server_callback.argtypes = [ctypes.c_void_p, _ServerCallback]
    lib.SSL_CTX_set_psk_client_callback.restype = None
    lib.SSL_CTX_set_psk_client_callback.argtypes = [ctypes.c_void_p, _ClientCallback]
    lib.SSL_CTX_set_session_id_context.restype = ctypes.c_int
    lib.SSL_CTX_set_session_id_context.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint]
    return lib


def _ssl_ctx(lib: ctypes.CDLL, context: ssl.SSLContext) -> int:
    """The context's ``SSL_CTX*``, checked: a wrong pointer would not give back ``context.options``."""
    if sys.implementation.name != "cpython" or ctypes.sizeof(ctypes.c_void_p) != 8:
        raise PskUnavailable("TLS-PSK needs 64-bit CPython")
    pointer = ctypes.c_void_p.from_address(id(context) + _PYOBJECT_HEAD).value
    if not pointer or lib.SSL_CTX_get_options(pointer) != int(context.options):
        raise PskUnavailable("TLS-PSK: cannot find the OpenSSL context under Python's ssl")
    return pointer


def _copy_key(key: bytes, out: "ctypes._Pointer[ctypes.c_ubyte]", max_len: int) -> int:
    if len(key) > max_len:
        log.warning("PSK of %d bytes exceeds OpenSSL's limit of %d", len(key), max_len)
        return 0
    ctypes.memmove(out, key, len(key))
    return len(key)


def _clear_session_id_context(lib: ctypes.CDLL, ctx: int) -> None:
    """CPython gives every context the session id context "Python"; the TLS 1.3 session OpenSSL
    makes from a callback's key has none, and the mismatch refuses the handshake
    (ATTEMPT_TO_REUSE_SESSION_IN_DIFFERENT_CONTEXT).  Nothing here resumes sessions."""
    if not lib.SSL_CTX_set_session_id_context(ctx, None, 0):
        raise PskUnavailable("TLS-PSK: cannot clear the session id context")


def install_server(context: ssl.SSLContext, lookup: Callable[[str], bytes | None]) -> object:
    """Make *context* accept a client whose identity *lookup* maps to the key it proves.  The
    caller keeps the returned callback as long as the context: OpenSSL holds only its address."""
    lib = _libssl()

    def callback(_ssl: int, identity: bytes | None, psk, max_len: int) -> int:
        name = (identity or b"").decode("utf-8", "replace")
        key = lookup(name)
        if key is None:
            log.info("TLS-PSK: unknown client identity %r", name)
            return 0
        return _copy_key(key, psk, max_len)

    c_callback = _ServerCallback(callback)
    ctx = _ssl_ctx(lib, context)
    lib.SSL_CTX_set_psk_server_callback(ctx, c_callback)
    _clear_session_id_context(lib, ctx)
    return c_callback


def install_client(context: ssl.SSLContext, identity: str, key: bytes) -> object:
    """Make *context* offer *identity* and prove *key* to the server; the returned callback must
    be kept as long as the context."""
    lib = _libssl()
    name = identity.encode("utf-8")

    def callback(_ssl: int, _hint: bytes | None, out_identity, max_identity_len: int, psk, max_len: int) -> int:
        if len(name) + 1 > max_identity_len:
            log.warning("TLS-PSK identity %r is too long", identity)
            return 0
        ctypes.memmove(out_identity, name + b"\0", len(name) + 1)
        return _copy_key(key, psk, max_len)

    c_callback = _ClientCallback(callback)
    ctx = _ssl_ctx(lib, context)
    lib.SSL_CTX_set_psk_client_callback(ctx, c_callback)
    _clear_session_id_context(lib, ctx)
    return c_callback
