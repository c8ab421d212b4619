"""Test-time x509 credentials in the layout QEMU's tls-creds-x509 reads (crypto/tlscredsx509.c).

A CA signs a server certificate (subjectAltName IP:127.0.0.1 and
DNS:localhost) and a client certificate; each directory holds the files
one endpoint needs, under QEMU's names.  A second, unrelated CA gives the
"wrong CA" case; a leaf may have a richer subject (what tls-authz checks) or
be expired.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CA:
    """A self-signed certificate authority that issues leaf certificates."""

    def __init__(self, common_name: str = "vmigrate test CA") -> None:
        self.key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, subject: str | x509.Name, server: bool, expired: bool = False) -> tuple[bytes, bytes]:
        """(certificate, key) PEMs for a server (with the SANs) or a client; *subject* is a common
        name or a whole name; an *expired* one ended yesterday."""
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)) if expired else \
            (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        name = _name(subject) if isinstance(subject, str) else subject
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=False,
                                                crl_sign=False, content_commitment=False, data_encipherment=False,
                                                key_agreement=False, encipher_only=False, decipher_only=False),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), _pem_key(key)


def write_creds(directory: Path, ca: CA, endpoint: str, trusted_ca: CA | None = None,
                subject: str | x509.Name | None = None, expired: bool = False) -> Path:
    """*directory* with ca-cert.pem (*trusted_ca*, default *ca*) and the endpoint's own pair signed by
    *ca* (subject ``CN=vmigrate test ENDPOINT`` unless given)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-cert.pem").write_bytes((trusted_ca or ca).pem)
    cert, key = ca.issue(subject or f"vmigrate test {endpoint}", server=endpoint == "server", expired=expired)
    (directory / f"{endpoint}-cert.pem").write_bytes(cert)
    (directory / f"{endpoint}-key.pem").write_bytes(key)
    return directory


def make_pki(root: Path) -> tuple[Path, Path]:
    """(server dir, client dir) under *root*, both trusting one fresh CA."""
    ca = CA()
    return write_creds(root / "server", ca, "server"), write_creds(root / "client", ca, "client")


PSK_KEY = "0123456789abcdef0123456789abcdef"


def write_psk(directory: Path, key: str = PSK_KEY, username: str = "qemu") -> Path:
    """*directory* with the ``keys.psk`` QEMU's tls-creds-psk reads: ``username:hexkey`` lines."""
    directory.mkdir(parents=True)
    (directory / "keys.psk").write_text(f"other:{'ff' * 16}\n{username}:{key}\n")
    return directory
