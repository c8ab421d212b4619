"""A real QEMU 7.2 destination loads a stream built only with the wire encoders.

The destination's RAM is a shared file, so after the load the test compares
it with the image the encoder sent; the globalstate run state is checked via
query-status.  Skipped when qemu-system-x86_64 is not installed.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from vmigrate.migration.wire import ram as R
from vmigrate.migration.wire import stream as S
from vmigrate.machine import devices as D
from vmigrate.migration.wire import vmstate as V

QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
NPAGES = 32


class QMP:
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rw", encoding="utf-8")
        self.file.readline()
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments):
        self.file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" not in reply:
                return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


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
    proc = subprocess.Popen(
        [QEMU, "-M", "none,memory-backend=ram0", "-object",
         f"memory-backend-file,id=ram0,size={image.nbytes},mem-path={mem},share=on",
         "-m", f"{image.nbytes // 1024}K", "-nic", "none", "-display", "none", "-nodefaults",
         "-qmp", f"unix:{sock},server=on,wait=off", "-incoming", "defer"],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        qmp = QMP(sock)
        assert qmp.execute("migrate-incoming", uri=f"exec:cat {stream}") == {"return": {}}
        deadline = time.monotonic() + 20
        while (status := qmp.execute("query-status")["return"]["status"]) == "inmigrate":
            assert time.monotonic() < deadline, "QEMU did not finish loading"
            time.sleep(0.05)
        migrate = qmp.execute("query-migrate")["return"]
        qmp.execute("quit")
        qmp.close()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert migrate["status"] == "completed", proc.stderr.read()
    assert status == runstate
    assert mem.read_bytes() == image.tobytes()
