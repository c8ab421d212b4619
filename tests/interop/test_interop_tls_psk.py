"""TLS-PSK migration between real QEMU 7.2 (GnuTLS) and vmigrate (OpenSSL through ctypes), both ways.

Both kinds get the same ``tls-creds-psk`` objects over one ``keys.psk`` file and ``tls-creds``
on both sides; the RAM must arrive intact, and a client whose key differs from the server's is
refused in the handshake, with the texts each side gives (docs/tls.md, "PSK credentials").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from machines import Machine, Machines
from ramfile import fill_garbage, fill_pattern, first_difference
from transport import Transport, migrate
from vmigrate.harness.waiting import wait_for

pytestmark = pytest.mark.timeout(90)

SIZE = "64M"
KEY = "0123456789abcdef0123456789abcdef"


def psk_dir(path: Path, key: str = KEY, username: str = "qemu") -> Path:
    path.mkdir(parents=True)
    (path / "keys.psk").write_text(f"other:{'ff' * 16}\n{username}:{key}\n")
    return path


def start(machines: Machines, kind: str, directory: Path, endpoint: str, *args: str,
          multifd: bool = False, ram: Path | None = None) -> Machine:
    obj = f"tls-creds-psk,id=tls0,dir={directory},endpoint={endpoint}"
    if endpoint == "client":
        obj += ",username=qemu"
    vm = machines.start(kind, SIZE, "-object" if kind == "qemu" else "--object", obj, *args, ram=ram)
    vm.vm.set_caps(multifd=multifd)
    vm.vm.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "multifd-channels": 2})
    return vm


@pytest.mark.parametrize("multifd", [False, True], ids=["main", "multifd"])
@pytest.mark.parametrize("src_kind", ["qemu", "vmigrate"])
def test_psk_migration(machines: Machines, tmp_path, src_kind, multifd) -> None:
    keys = psk_dir(tmp_path / "psk")
    dst_kind = "vmigrate" if src_kind == "qemu" else "qemu"
    src = start(machines, src_kind, keys, "client", multifd=multifd)
    src.vm.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30})
    fill_pattern(src.ram, src.size, seed=9, random_pages=4096)

    def start_dst() -> Machine:
        ram = machines.ram_path(dst_kind)
        fill_garbage(ram, src.size)
        return start(machines, dst_kind, keys, "server", "-incoming", "defer", "-S", multifd=multifd, ram=ram)

    if src_kind == "vmigrate":
        src.vm.cmd("stop")  # the RAM file is written by the test, not a guest
    dst = migrate(Transport("tcp", machines.ramdir), src, start_dst)
    dst.require_alive()
    info = src.vm.migrate_status()
    assert info["status"] == "completed", info
    assert (info["ram"]["multifd-bytes"] > 0) == multifd
    assert dst.vm.migrate_status() == {"status": "completed"}
    assert first_difference(src.ram, dst.ram, src.size) is None


@pytest.mark.parametrize("src_kind", ["qemu", "vmigrate"])
def test_wrong_key_refused(machines: Machines, tmp_path, src_kind) -> None:
    """The client's key differs from the server's: each side's refusal text."""
    dst_kind = "vmigrate" if src_kind == "qemu" else "qemu"
    dst = start(machines, dst_kind, psk_dir(tmp_path / "server"), "server", "-incoming", "defer")
    dst.vm.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    (address,) = dst.vm.migrate_status()["socket-address"]
    src = start(machines, src_kind, psk_dir(tmp_path / "client", key="ab" * 16), "client")
    src.vm.cmd("migrate", uri=f"tcp:127.0.0.1:{address['port']}")
    info = src.vm.wait_migration({"completed", "failed"})
    assert src.vm.status() == "running"
    if dst_kind == "qemu":
        # GnuTLS fails the binder and closes without an alert; QEMU prints it and keeps listening.
        assert info == {"status": "failed", "error-desc": "TLS handshake failed: the peer closed the connection"}
        wait_for(lambda: "TLS handshake failed: An illegal parameter has been received." in dst.vm.log(),
                 10, "QEMU's refusal")
        assert dst.vm.migrate_status()["socket-address"]
    else:
        assert info == {"status": "failed", "error-desc": "TLS handshake failed: A TLS fatal alert has been received."}
        assert dst.vm.wait_migration({"completed", "failed"}) == {
            "status": "failed", "error-desc": "TLS handshake failed: BINDER_DOES_NOT_VERIFY"}
    dst.require_alive()
