"""TLS-PSK between two vmigrate processes (docs/tls.md, "PSK credentials")."""

from __future__ import annotations

from pathlib import Path

import pytest

from procs import listen_with_data, migrate_in_passes, ram_files_equal
from tls_certs import write_psk

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20
GUEST = "stress:rate=100,wss=8M"


def start_pair(spawn, tmp_path: Path, server_key: str, client_key: str, uri: str, multifd: bool = False):
    objects = {"client": write_psk(tmp_path / "client", client_key),
               "server": write_psk(tmp_path / "server", server_key)}
    src = spawn("vmigrate", "--accel", "soft", "-m", "32M", "--mem-path", str(tmp_path / "src.ram"),
                "--guest", GUEST, "--object", f"tls-creds-psk,id=tls0,dir={objects['client']},username=qemu")
    dst = spawn("vmigrate", "--accel", "soft", "-m", "32M", "--mem-path", str(tmp_path / "dst.ram"),
                "--guest", GUEST, "-S", "--incoming", "defer",
                "--object", f"tls-creds-psk,id=tls0,dir={objects['server']},endpoint=server")
    for vm in (src, dst):
        vm.set_caps(events=True, multifd=multifd, **{"return-path": True})
        vm.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "multifd-channels": 3})
    return src, dst, listen_with_data(tmp_path / "src.ram", dst, uri, seed=7)


@pytest.mark.parametrize("multifd", [False, True], ids=["main", "multifd"])
def test_psk_migration_completes_over_unix_without_hostname(spawn, tmp_path, multifd):
    """PSK needs no tls-hostname, even on a unix: socket (x509 does)."""
    key = "00112233445566778899aabbccddeeff"
    src, dst, uri = start_pair(spawn, tmp_path, key, key, f"unix:{tmp_path / 'mig.sock'}", multifd)
    info = migrate_in_passes(src, uri, bandwidth=16 * MIB)
    assert info["status"] == "completed", info
    assert dst.wait_migration({"completed", "failed"})["status"] == "completed"
    assert ram_files_equal(tmp_path / "src.ram", tmp_path / "dst.ram")
    assert (info["ram"]["multifd-bytes"] > 8 * MIB) == multifd


def test_wrong_key_fails_cleanly(spawn, tmp_path):
    src, dst, uri = start_pair(spawn, tmp_path, "00" * 16, "11" * 16, "tcp:127.0.0.1:0")
    src.cmd("migrate", uri=uri)
    assert src.wait_migration({"completed", "failed"}) == {
        "status": "failed", "error-desc": "TLS handshake failed: SSLV3_ALERT_ILLEGAL_PARAMETER"}
    assert src.status() == "running"
    assert dst.wait_migration({"completed", "failed"}) == {
        "status": "failed", "error-desc": "TLS handshake failed: BINDER_DOES_NOT_VERIFY"}
