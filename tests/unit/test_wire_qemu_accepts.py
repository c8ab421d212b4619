"""A real QEMU 7.2 destination loads a stream built only with the wire encoders.

The destination's RAM is a shared file, so after the load the test compares
it with the image the encoder sent; the globalstate run state is checked via
query-status.  Skipped when qemu-system-x86_64 is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

from vmigrate.harness.launcher import VMProcess, qemu_argv
from vmigrate.harness.waiting import wait_for
from vmigrate.migration.wire import ram as R
from vmigrate.migration.wire import stream as S
from vmigrate.machine import devices as D
from vmigrate.migration.wire import vmstate as V

NPAGES = 32


def build_stream(image: np.ndarray, runstate: str) -> bytes:
    ch = R.ChannelState()
    out = [S.header(), S.configuration("none"),
           S.section_start(2, "ram", 0, 4), R.mem_size([("ram0", image.nbytes)]), R.eos(),
           S.footer(2)]
    # Two passes: the second re-sends dirty pages (one now zero) and starts with CONTINUE.
    first = image.copy()
    first[3] = 0xAB
    for pages, mem in ((np.arange(NPAGES), first), (np.array([3, 5, 9]), image)):
        out += [S.section_part(2), bytes(R.encode_pages("ram0", mem, pages, ch)[0]), R.eos(),
                S.footer(2)]
    out += [S.section_end(2), R.eos(), S.footer(2)]
    devices = [V.DeviceSection(0, "timer", 0, D.TIMER, D.timer_values(123, 456)),
               V.DeviceSection(4, "globalstate", 0, D.GLOBALSTATE, D.globalstate_values(runstate))]
    out += [d.encode() for d in devices]
    out += [S.eof(), S.vmdesc(V.vmdesc_json(devices))]
    return b"".join(out)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("runstate", ["paused", "running"])
def test_qemu_loads_encoded_stream(tmp_path, runstate):
    rng = np.random.default_rng(11)
    image = rng.integers(1, 256, size=(NPAGES, 4096), dtype=np.uint8)
    image[::4] = 0
    image[3] = 0
    stream = tmp_path / "stream.bin"
    stream.write_bytes(build_stream(image, runstate))
    mem = tmp_path / "mem.img"
    mem.write_bytes(b"\xEE" * image.nbytes)
    sock = tmp_path / "qmp.sock"
    argv = qemu_argv(sock, "-incoming", "defer", memory=f"{image.nbytes // 1024}K", mem_path=mem, backend="ram0")
    with VMProcess(argv, sock, tmp_path / "qemu.log") as vm:
        assert vm.cmd("migrate-incoming", uri=f"exec:cat {stream}") == {}
        status = wait_for(lambda: (s := vm.status()) != "inmigrate" and s, 20, "QEMU to finish loading",
                          interval=0.05)
        migrate = vm.migrate_status()
        log = vm.log()
    assert migrate["status"] == "completed", log
    assert status == runstate
    assert mem.read_bytes() == image.tobytes()
