"""KVM guests migrating between two vmigrate processes, proved by what the guests themselves say.

The ``ab`` guest prints one letter per pass on its UART: the destination's
output must continue the source's letter sequence with no gap.  The
``checksum`` guest prints the result of a long computation: a migration in
the middle must not change it.  RAM is read through ``--mem-path`` files as
in tests/integration/test_precopy.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from procs import wait_guest_passes, wait_passes
from vmigrate.cli.analyze import analyze
from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import GuestSpec
from vmigrate.machine.kvm import KvmVcpus
from vmigrate.machine.memory import RAMBlock
from vmigrate.migration.worker_process import ENV

MIB = 1 << 20


def counter(path: Path) -> int:
    """The guest's pass/round counter from its RAM file (0 before the guest started)."""
    magic, count = np.fromfile(path, dtype=np.uint64, count=2)
    return int(count) if magic.tobytes() == b"VMIGRATE" else 0


def assert_letters_in_sequence(text: bytes) -> None:
    letters = np.frombuffer(text, dtype=np.uint8).astype(int)
    assert ((letters >= ord("a")) & (letters <= ord("z"))).all(), text[-40:]
    gaps = np.flatnonzero((letters[1:] - letters[:-1]) % 26 != 1)
    assert not len(gaps), f"the letter sequence breaks at {gaps[0]}: {text[max(0, gaps[0] - 5):gaps[0] + 5]!r}"


def vm_pair(spawn, tmp_path: Path, guest: str, accel: str, *extra: str, dst_guest: str | None = None,
            caps: dict[str, bool] | None = None, params: dict | None = None):
    """Source and destination (listening on a loopback port), both with *caps* and *params* set."""
    files = {side: (tmp_path / f"{side}.ram", tmp_path / f"{side}.serial") for side in ("src", "dst")}
    common = ("-m", "64M", "--accel", accel, *extra)
    src = spawn("vmigrate", *common, "--guest", guest,
                "--mem-path", str(files["src"][0]), "--serial", str(files["src"][1]))
    dst = spawn("vmigrate", *common, "--guest", dst_guest or guest,
                "--mem-path", str(files["dst"][0]), "--serial", str(files["dst"][1]),
                "-S", "--incoming", "defer")
    for vm in (src, dst):
        if caps:
            vm.set_caps(**caps)
        if params:
            vm.cmd("migrate-set-parameters", **params)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = dst.migrate_status()["socket-address"][0]["port"]
    return src, dst, f"tcp:127.0.0.1:{port}", files


@pytest.mark.parametrize("accel", ["kvm", "kvm,dirty-ring-size=65536"], ids=["bitmap", "dirty-ring"])
def test_ab_guest_migrates_and_its_output_continues(spawn, tmp_path, accel):
    src, dst, uri, files = vm_pair(spawn, tmp_path, "ab:end=24M", accel)
    (src_ram, src_serial), (dst_ram, dst_serial) = files["src"], files["dst"]
    # Past its first passes: until each page of the window has been touched once, the guest
    # crawls (every first touch allocates the page) and precopy may converge at once.
    wait_guest_passes(src_ram, 4)
    # A 1 ms downtime limit: a guest slowed by a busy host must not converge before the third pass.
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 32 * MIB, "downtime-limit": 1})
    src.cmd("migrate", uri=uri)
    wait_passes(src, 3)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": 60000})
    info = src.wait_migration({"completed", "failed"}, timeout=60)
    assert info["status"] == "completed", info
    assert info["ram"]["normal"] > (24 - 1) * MIB // 4096, "the window was sent more than once"
    dst.wait_migration({"completed", "failed"}, timeout=30)
    assert dst.status() == "paused"

    assert np.array_equal(np.fromfile(src_ram, dtype=np.uint8), np.fromfile(dst_ram, dtype=np.uint8))
    passes = counter(dst_ram)
    column = np.fromfile(dst_ram, dtype=np.uint8)[MIB:24 * MIB:4096]
    assert np.isin(column, [passes % 256, (passes - 1) % 256]).all()
    before = src_serial.read_bytes()
    assert dst_serial.read_bytes() == b"", "the destination guest has not run yet"

    dst.cmd("cont")
    wait_for(lambda: len(dst_serial.read_bytes()) > 50, 20, "the guest printing on the destination")
    dst.cmd("stop")
    assert_letters_in_sequence(before + dst_serial.read_bytes())
    assert src_serial.read_bytes() == before and counter(src_ram) == passes, "the source stays frozen"


def unmigrated_checksum(guest: str, serial: Path) -> bytes:
    """What the checksum guest prints when nothing interrupts it (run in this process)."""
    ram = RAMBlock("ram", 64 * MIB)
    vcpus = KvmVcpus(ram, 1, GuestSpec.parse(guest), serial=str(serial))
    try:
        vcpus.resume_all()
        wait_for(lambda: serial.read_bytes().endswith(b"\n"), 60, "the unmigrated result")
    finally:
        vcpus.shutdown()
    return serial.read_bytes()


#: Streams the checksum guest crosses: plain precopy, and the two whose page work runs in
#: worker processes (vmigrate/migration/worker_process.py), forced on at any CPU count.
STREAMS = {
    "precopy": ({}, {}),
    "multifd-workers": ({"multifd": True}, {"multifd-channels": 3, "multifd-compression": "zstd"}),
    "compress-workers": ({"compress": True}, {"compress-threads": 2, "decompress-threads": 2}),
}


@pytest.mark.parametrize("stream", sorted(STREAMS))
def test_checksum_is_unchanged_by_a_migration_in_the_middle(spawn, tmp_path, monkeypatch, stream):
    """The result printed after a migration mid-computation is the unmigrated one.

    The destination is started with ``--guest idle``: it loads no program
    and its vCPU is halted, so it can only finish the computation from the
    vCPU state that came over.  Two vCPUs: the second (never started)
    migrates too.
    """
    guest, rounds = "checksum:size=8M,rounds=1000", 1000
    expected = unmigrated_checksum(guest, tmp_path / "reference.serial")
    assert expected.startswith(b"checksum ") and len(expected) == len("checksum ") + 17
    monkeypatch.setenv(ENV, "0" if stream == "precopy" else "1")
    caps, params = STREAMS[stream]
    src, dst, uri, files = vm_pair(spawn, tmp_path, guest, "kvm", "--smp", "2", "-v", dst_guest="idle",
                                   caps=caps, params=params)
    (src_ram, src_serial), (dst_ram, dst_serial) = files["src"], files["dst"]
    wait_for(lambda: counter(src_ram) >= 10, 20, "the computation to be under way")
    # The guest rewrites all of its 8 MiB every round: allow the downtime that takes.
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": 60000})
    src.cmd("migrate", uri=uri)
    assert src.wait_migration({"completed", "failed"}, timeout=60)["status"] == "completed"
    dst.wait_migration({"completed", "failed"}, timeout=30)
    stopped_at = counter(src_ram)
    assert 10 <= stopped_at < rounds, "the migration happened in the middle"
    assert src_serial.read_bytes() == b""
    dst.cmd("cont")
    wait_for(lambda: dst_serial.read_bytes().endswith(b"\n"), 60, "the result on the destination's UART")
    assert dst_serial.read_bytes() == expected
    assert counter(dst_ram) == rounds + 1
    assert counter(src_ram) == stopped_at
    if stream != "precopy":
        assert "workers (processes)" in src.log() and "workers (processes)" in dst.log()


def test_a_kvm_stream_names_its_own_machine(spawn, tmp_path):
    """``vmigrate-kvm``, not ``none``: a ``-M none`` destination has no vCPUs for the vCPU state.

    So QEMU's ``-M none`` and vmigrate's software vCPU refuse the stream at its
    configuration section instead of dropping the registers (a deviation README.md lists).
    """
    stream = tmp_path / "kvm.bin"
    src = spawn("vmigrate", "-m", "16M", "--accel", "kvm", "--guest", "ab:end=4M")
    src.cmd("migrate", uri=f"exec:cat > {stream}")
    assert src.wait_migration({"completed", "failed"}, timeout=30)["status"] == "completed"
    assert analyze(stream).configuration["machine"] == "vmigrate-kvm"
    dst = spawn("vmigrate", "-m", "16M", "--incoming", f"exec:cat {stream}")
    info = dst.wait_migration({"completed", "failed"}, timeout=30)
    assert info["status"] == "failed"
    assert "Machine type received is 'vmigrate-kvm' and local is 'none'" in info["error-desc"], info
