"""``object-add`` / ``object-del`` against QEMU 7.2: the answers for the object types migration uses.

The schema of both commands is QEMU's (``tools/gen_qemu_schema.py`` derives it from QEMU's own
introspection), so malformed requests get QEMU's QAPI errors; the objects themselves are
checked as QEMU checks them, with its texts.
"""

from __future__ import annotations

from tls_certs import make_pki


def test_tls_creds_objects(fresh_pair, tmp_path):
    server, client = make_pki(tmp_path / "pki")
    p = fresh_pair()
    p.same("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(server), "endpoint": "server",
                          "verify-peer": True})
    p.same("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(client)})
    p.same("object-add", {"qom-type": "tls-creds-x509", "id": "tls1", "dir": str(client), "verify-peer": False})
    p.same("migrate-set-parameters", {"tls-creds": "tls1"})
    p.same("query-migrate-parameters")
    p.same("object-del", {"id": "tls1"})
    p.same("object-del", {"id": "tls1"})
    p.same("object-del", {"id": "nothing"})
    p.same("object-add", {"qom-type": "tls-creds-x509", "id": "tls2", "dir": str(tmp_path / "missing")})
    p.same("object-add", {"qom-type": "tls-creds-x509", "id": "tls3"})


def test_malformed_object_add(fresh_pair):
    p = fresh_pair()
    p.same("object-add", {"qom-type": "no-such-type", "id": "x"})
    p.same("object-add", {"id": "x"})
    p.same("object-add", {"qom-type": "tls-creds-x509"})
    p.same("object-add", {"qom-type": "tls-creds-x509", "id": "x", "verify-peer": "yes"})
    p.same("object-add", {"qom-type": "tls-creds-x509", "id": "x", "colour": "blue"})
    p.same("object-add", {"qom-type": "tls-creds-x509", "id": "x", "endpoint": "middle"})
    p.same("object-del")


def test_authz_objects(fresh_pair):
    """``authz-list`` rules arrive as a JSON list (``-object`` cannot spell them in QEMU)."""
    p = fresh_pair()
    p.same("object-add", {"qom-type": "authz-simple", "id": "auth0", "identity": "CN=client"})
    p.same("object-add", {"qom-type": "authz-list", "id": "auth1", "policy": "allow",
                          "rules": [{"match": "CN=*", "policy": "deny", "format": "glob"},
                                    {"match": "CN=ok"}]})
    p.same("object-add", {"qom-type": "authz-list", "id": "auth2", "policy": "maybe"})
    p.same("object-add", {"qom-type": "authz-list", "id": "auth3", "rules": [{"policy": "deny"}]})
    p.same("object-add", {"qom-type": "authz-simple", "id": "auth4"})
    p.same("migrate-set-parameters", {"tls-authz": "auth1"})
    p.same("object-del", {"id": "auth1"})
    p.same("object-del", {"id": "auth0"})


def test_psk_objects(fresh_pair, tmp_path):
    (tmp_path / "keys.psk").write_text("qemu:00112233445566778899aabbccddeeff\n")
    p = fresh_pair()
    p.same("object-add", {"qom-type": "tls-creds-psk", "id": "psk0", "dir": str(tmp_path), "endpoint": "server"})
    p.same("object-add", {"qom-type": "tls-creds-psk", "id": "psk1", "dir": str(tmp_path), "username": "qemu"})
    p.same("object-add", {"qom-type": "tls-creds-psk", "id": "psk2", "dir": str(tmp_path), "username": "nobody"})
    p.same("object-add", {"qom-type": "tls-creds-psk", "id": "psk3", "dir": str(tmp_path / "none")})
    p.same("migrate-set-parameters", {"tls-creds": "psk1"})
    p.same("object-del", {"id": "psk0"})


def test_anon_objects(fresh_pair, tmp_path):
    """``dir`` is optional and only a server reads ``dh-params.pem`` from it; ``loaded`` is read-only."""
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dh-params.pem").write_text("garbage\n")
    p = fresh_pair()
    p.same("object-add", {"qom-type": "tls-creds-anon", "id": "anon0"})
    p.same("object-add", {"qom-type": "tls-creds-anon", "id": "anon0", "endpoint": "server"})
    p.same("object-add", {"qom-type": "tls-creds-anon", "id": "anon1", "endpoint": "server",
                          "dir": str(tmp_path / "none")})
    p.same("object-add", {"qom-type": "tls-creds-anon", "id": "anon2", "endpoint": "server",
                          "dir": str(tmp_path / "bad")})
    p.same("object-add", {"qom-type": "tls-creds-anon", "id": "anon3", "dir": str(tmp_path / "bad"),
                          "verify-peer": False})
    p.same("object-add", {"qom-type": "tls-creds-anon", "id": "anon4", "loaded": True})
    p.same("object-add", {"qom-type": "tls-creds-anon", "id": "anon5", "verify-peer": "yes"})
    p.same("object-add", {"qom-type": "tls-creds-anon", "id": "anon6", "endpoint": "middle"})
    p.same("migrate-set-parameters", {"tls-creds": "anon3"})
    p.same("query-migrate-parameters")
    p.same("object-del", {"id": "anon3"})
    p.same("object-del", {"id": "anon3"})
