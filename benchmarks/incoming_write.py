#!/usr/bin/env python3
"""What a destination pays to put received pages into a RAM file, by the three ways vmigrate has.

A forked sender writes ``--size`` random bytes from a tmpfs file to a
loopback TCP socket with ``sendfile``, in 512 KiB units (one uncompressed
multifd packet); the receiver puts each unit into a fresh RAM file on the
same tmpfs at the same offset, with vmigrate's own code:

* ``mapping``: ``recv_into`` the block's mapping after
  :meth:`RAMBlock.incoming_run` allocated the run (the prefaulter thread
  working ahead): how channel threads received before, and how anonymous RAM
  still does;
* ``pwrite``: ``recv_into`` a buffer, then :meth:`RAMBlock.write_pages`,
  which writes a RAM file with ``pwrite`` (precopy's main channel, decoded
  packets);
* ``splice``: :class:`multifd.Splicer`, socket to pipe to file.

Per run: the receiving process's user and system CPU (its prefaulter thread
included) and its minor faults; the file must equal the source.  Then the
cost a guest pays afterwards for what the receiver did not map: one byte
read per page of the first half of RAM and one byte written per page of
the second half, through the block's own mapping, as a guest's first
touches after the switch-over.  Results:
``incoming-write.json`` / ``.csv`` under ``--out`` (docs/benchmarks.md,
"Writing incoming pages through the RAM file").

Usage: ``python3 benchmarks/incoming_write.py [--size 1G] [--repeat 3]``
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's vmigrate

from vmigrate.cli.bench.images import fill_ram_image  # noqa: E402
from vmigrate.cli.bench.report import median_of, write_outputs  # noqa: E402
from vmigrate.cli.bench.script import prepare, script_parser  # noqa: E402
from vmigrate.machine.memory import PAGE_SIZE, RAMBlock  # noqa: E402
from vmigrate.migration.channel import SocketChannel  # noqa: E402
from vmigrate.migration.multifd import Splicer, recv_exact  # noqa: E402

log = logging.getLogger("benchmarks.incoming_write")

UNIT = 512 << 10
MODES = ("mapping", "pwrite", "splice")
KEYS = ("wall_s", "user_s", "sys_s", "cpu_s", "minor_faults", "read_touch_s", "write_touch_s")


def send(path: Path, port: int, size: int) -> None:
    """The sender, in a forked child: the whole file to the socket, then exit."""
    code = 1
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock, open(path, "rb") as f:
            offset = 0
            while offset < size:
                offset += os.sendfile(sock.fileno(), f.fileno(), offset, size - offset)
        code = 0
    finally:
        os._exit(code)


def receive(mode: str, channel: SocketChannel, block: RAMBlock) -> None:
    pages_per_unit = UNIT // PAGE_SIZE
    scratch = bytearray(UNIT)
    splicer = Splicer(channel.fileno()) if mode == "splice" else None
    try:
        for first in range(0, block.npages, pages_per_unit):
            count = min(pages_per_unit, block.npages - first)
            if splicer is not None:
                splicer.read(block.file, first * PAGE_SIZE, count * PAGE_SIZE)
            elif mode == "mapping":
                recv_exact(channel, memoryview(block.incoming_run(first, count)).cast("B"))
            else:
                view = memoryview(scratch)[:count * PAGE_SIZE]
                recv_exact(channel, view)
                block.write_pages(np.arange(first, first + count),
                                  np.frombuffer(view, np.uint8).reshape(-1, PAGE_SIZE))
    finally:
        if splicer is not None:
            splicer.close()


def run_once(mode: str, image: Path, workdir: Path, size: int) -> dict:
    dst = workdir / "dst.ram"
    with socket.create_server(("127.0.0.1", 0)) as server:
        pid = os.fork()
        if pid == 0:
            send(image, server.getsockname()[1], size)
        conn, _ = server.accept()
    block = RAMBlock("ram", size, str(dst))
    channel = SocketChannel(conn)
    half = block.npages // 2
    firsts = np.memmap(image, np.uint8, "r").reshape(-1, PAGE_SIZE)[half:, 0].copy()
    try:
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        receive(mode, channel, block)
        block.end_incoming()
        wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        int(block.pages[:half, 0].sum())
        t1 = time.perf_counter()
        block.pages[half:, 0] = firsts
        t2 = time.perf_counter()
    finally:
        channel.close()
        os.waitpid(pid, 0)
        block.close()
    with open(image, "rb") as a, open(dst, "rb") as b:
        equal = all(a.read(1 << 24) == b.read(1 << 24) for _ in range(0, size, 1 << 24))
    dst.unlink()
    user, sys_ = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"mode": mode, "equal": equal, "wall_s": round(wall, 3), "user_s": round(user, 3),
            "sys_s": round(sys_, 3), "cpu_s": round(user + sys_, 3),
            "minor_faults": after.ru_minflt - before.ru_minflt, "read_touch_s": round(t1 - t0, 3),
            "write_touch_s": round(t2 - t1, 3)}


def main() -> int:
    parser = script_parser(__doc__, ROOT / "benchmarks" / "results" / "incoming-write")
    args = parser.parse_args()
    size, _, workdir = prepare(args, "incomingwrite")
    records: list[dict] = []
    try:
        image = fill_ram_image(workdir / "src.ram", size, 0.0, args.seed).path
        for rep in range(args.repeat):
            for mode in MODES if rep % 2 == 0 else reversed(MODES):
                rec = run_once(mode, image, workdir, size) | {"rep": rep}
                log.info("%s", rec)
                records.append(rec)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {mode: {k: median_of([r for r in records if r["mode"] == mode], k) for k in KEYS} for mode in MODES}
    write_outputs(Path(args.out), "incoming-write", {"size": size, "repeat": args.repeat, "unit": UNIT},
                  records, summary)
    for mode, figures in summary.items():
        log.info("%s: %s", mode, figures)
    return 0 if all(r["equal"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
