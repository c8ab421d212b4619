#!/usr/bin/env python3
"""Regenerate tests/unit/vectors/ from the installed QEMU 7.2.

Each vector is a complete migration stream written by a real
``qemu-system-x86_64`` (``migrate exec:cat > FILE``) plus a JSON sidecar
holding what the test needs to check it: the guest RAM image the VM was
started with and QEMU's own ``query-migrate`` answer, so that decoded pages
and the encoder's byte counts can be compared with QEMU's figures.

Usage: ``tools/capture_vectors.py [--out DIR] [--qemu BINARY] [--only NAME]``

QEMU is started and driven with :mod:`vmigrate.harness`; what the vectors
check is vmigrate's reading of the stream, which no QMP code takes part in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vmigrate.harness.launcher import VMProcess, qemu_argv

PAGE = 4096
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "unit" / "vectors"


def pattern_page(index: int) -> bytes:
    """A deterministic non-zero page that differs from every other index."""
    return bytes(((index * 37 + k * 11) & 0xFF) or 1 for k in range(PAGE))


def mixed_image(npages: int) -> bytes:
    """Zero pages, full pages and edge cases (a single non-zero last byte)."""
    pages = []
    for i in range(npages):
        if i % 3 == 0:
            pages.append(bytes(PAGE))
        elif i == 5:
            pages.append(bytes(PAGE - 1) + b"\x01")
        else:
            pages.append(pattern_page(i))
    return b"".join(pages)


@dataclass
class Scenario:
    """One capture: how QEMU is started and driven before ``migrate``."""

    name: str
    doc: str
    image: bytes | None = None          # file-backed RAM contents (memory-backend-file)
    ram_size: str | None = None         # plain ``-m`` (block "ram") when image is None
    extra_args: list[str] = field(default_factory=list)
    capabilities: dict[str, bool] = field(default_factory=dict)
    before_migrate: list[str] = field(default_factory=list)   # QMP commands without arguments


SCENARIOS = [
    Scenario("small8k", "docs/qemu/stream.md §12: page 0 zero, page 1 all 0x5A, running VM",
             image=bytes(PAGE) + b"\x5a" * PAGE),
    Scenario("mixed64k", "16 pages mixing zero, patterned and almost-zero pages",
             image=mixed_image(16)),
    Scenario("prelaunch8k", "VM started with -S (never run): globalstate 'prelaunch'",
             image=bytes(PAGE) + b"\x5a" * PAGE, extra_args=["-S"]),
    Scenario("paused8k", "VM stopped with QMP 'stop' before migrating: globalstate 'paused'",
             image=bytes(PAGE) + b"\x5a" * PAGE, before_migrate=["stop"]),
    Scenario("ram1m", "-M none -m 1M: block 'ram', 256 zero pages",
             ram_size="1M"),
    Scenario("icount1m", "-icount shift=auto: timer/icount subsection with all three "
             "nested subsections", ram_size="1M", extra_args=["-icount", "shift=auto"]),
    Scenario("uuid8k", "-uuid with validate-uuid: configuration/uuid subsection",
             image=bytes(PAGE) + b"\x5a" * PAGE,
             extra_args=["-uuid", "12345678-9abc-def0-1122-334455667788"],
             capabilities={"validate-uuid": True}),
    Scenario("ignoreshared8k", "x-ignore-shared on a shared backend: capabilities "
             "subsection, MEM_SIZE carries the block GPA, no pages sent",
             image=bytes(PAGE) + b"\x5a" * PAGE,
             capabilities={"x-ignore-shared": True}),
]


def capture(scenario: Scenario, qemu: str, out: Path, work: Path) -> None:
    sock = work / f"{scenario.name}.sock"
    stream = out / f"{scenario.name}.bin"
    if scenario.image is not None:
        mem = work / f"{scenario.name}.img"
        mem.write_bytes(scenario.image)
        args = qemu_argv(sock, *scenario.extra_args, memory=f"{len(scenario.image) // 1024}K", mem_path=mem,
                         backend="ram0", binary=qemu)
    else:
        args = qemu_argv(sock, *scenario.extra_args, memory=scenario.ram_size, binary=qemu)
    with VMProcess(args, sock, work / f"{scenario.name}.log") as vm:
        if scenario.capabilities:
            vm.set_caps(**scenario.capabilities)
        for command in scenario.before_migrate:
            vm.cmd(command)
        status_before = vm.status()
        vm.cmd("migrate", uri=f"exec:cat > {stream}")
        info = vm.wait_migration({"completed", "failed", "cancelled"}, timeout=20)
    if info["status"] != "completed":
        raise RuntimeError(f"{scenario.name}: migration {info['status']}")
    ram = info["ram"]
    sidecar = {
        "doc": scenario.doc,
        "qemu": subprocess.run([qemu, "--version"], capture_output=True, text=True,
                               check=True).stdout.splitlines()[0],
        "command": [a.replace(str(work), "WORK") for a in args],
        "capabilities": scenario.capabilities,
        "runstate_before_migrate": status_before,
        "stats": {k: ram[k] for k in ("transferred", "duplicate", "normal",
                                      "normal-bytes", "total", "dirty-sync-count",
                                      "precopy-bytes", "downtime-bytes")},
        "image": ("zero" if scenario.image is None else
                  {"pages": [_page_summary(scenario.image[i:i + PAGE])
                             for i in range(0, len(scenario.image), PAGE)]}),
    }
    (out / f"{scenario.name}.json").write_text(json.dumps(sidecar, indent=1) + "\n")
    print(f"{stream}: {stream.stat().st_size} bytes, status {info['status']}")


def _page_summary(page: bytes) -> str:
    """Page contents in a form the tests can rebuild (the images are synthetic)."""
    if not any(page):
        return "zero"
    if len(set(page)) == 1:
        return f"fill:{page[0]:#04x}"
    if not any(page[:-1]):
        return f"last:{page[-1]:#04x}"
    for i in range(256):
        if page == pattern_page(i):
            return f"pattern:{i}"
    raise ValueError("page not describable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    parser.add_argument("--only", action="append", help="capture only this scenario")
    args = parser.parse_args(argv)
    if shutil.which(args.qemu) is None:
        print(f"{args.qemu} not found", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vmigrate-vectors-") as tmp:
        for scenario in SCENARIOS:
            if args.only and scenario.name not in args.only:
                continue
            capture(scenario, args.qemu, args.out, Path(tmp))
    os.sync()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
