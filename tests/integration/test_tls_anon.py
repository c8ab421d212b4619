"""Anonymous TLS between two vmigrate processes (docs/tls.md, "Anonymous credentials")."""

from __future__ import annotations

from pathlib import Path

import pytest

from procs import listen_with_data, migrate_in_passes, ram_files_equal
from tls_certs import make_pki

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20
GUEST = "stress:rate=100,wss=8M"


def start_pair(spawn, tmp_path: Path, uri: str, multifd: bool, server_object: str):
    src = spawn("vmigrate", "--accel", "soft", "-m", "32M", "--mem-path", str(tmp_path / "src.ram"),
                "--guest", GUEST, "--object", "tls-creds-anon,id=tls0")
    dst = spawn("vmigrate", "--accel", "soft", "-m", "32M", "--mem-path", str(tmp_path / "dst.ram"),
                "--guest", GUEST, "-S", "--incoming", "defer", "--object", server_object)
    for vm in (src, dst):
        vm.set_caps(events=True, multifd=multifd, **{"return-path": True})
        vm.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "multifd-channels": 3})
    return src, dst, listen_with_data(tmp_path / "src.ram", dst, uri, seed=7)


@pytest.mark.parametrize("multifd", [False, True], ids=["main", "multifd"])
def test_anon_migration_completes_over_unix_without_hostname(spawn, tmp_path, multifd):
    """No certificate, so no tls-hostname, even on a unix: socket; the return path rides the main channel."""
    src, dst, uri = start_pair(spawn, tmp_path, f"unix:{tmp_path / 'mig.sock'}", multifd,
                               "tls-creds-anon,id=tls0,endpoint=server")
    info = migrate_in_passes(src, uri, bandwidth=16 * MIB)
    assert info["status"] == "completed", info
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
    assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")
    assert (info["ram"]["multifd-bytes"] > 8 * MIB) == multifd


def test_anon_client_refused_by_x509_server(spawn, tmp_path):
    """Anonymous and certificate suites do not overlap: both sides fail, the guest keeps running."""
    server, _ = make_pki(tmp_path / "pki")
    src, dst, uri = start_pair(spawn, tmp_path, "tcp:127.0.0.1:0", False,
                               f"tls-creds-x509,id=tls0,dir={server},endpoint=server,verify-peer=off")
    src.cmd("migrate", uri=uri)
    assert src.wait_migration({"completed", "failed"}) == {
        "status": "failed", "error-desc": "TLS handshake failed: SSLV3_ALERT_HANDSHAKE_FAILURE"}
    assert src.status() == "running"
    assert dst.wait_migration({"completed", "failed"}) == {
        "status": "failed", "error-desc": "TLS handshake failed: NO_SHARED_CIPHER"}
