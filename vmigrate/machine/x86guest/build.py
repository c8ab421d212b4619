"""Assemble the guest programs (and the PC firmware that starts them) with the system's gcc and ld.

The programs are kept as GNU assembler sources next to this module; the flat
binaries are built at first use into a cache directory keyed by a hash of
the sources, so an edited source is rebuilt and concurrent VM processes
share one build.  Only ``gcc`` (which brings ``as``) and ``ld`` are needed:
Debian's ``gcc`` package on a fresh system is enough, no network.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = Path(__file__).resolve().parent
_COMMON = ("guest.h", "common.S")
#: The PC firmware of :mod:`~vmigrate.machine.x86guest.pc`: not a ``--guest`` program.
BIOS = "bios"
#: Where the firmware is linked: a 64 KiB ROM ending at 4 GiB, over the reset vector.
BIOS_BASE = 0xFFFF0000


def _defines(header: Path) -> dict[str, int]:
    """The numeric ``#define``s of a header: the loader and the programs share one layout."""
    found = re.findall(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", header.read_text(), re.MULTILINE)
    return {name: int(value, 0) for name, value in found}


#: The constants of guest.h (layout, selectors, ports, header offsets).
GUEST_H = _defines(SOURCES / "guest.h")
#: Guest-physical address the programs are linked for.
CODE_BASE = GUEST_H["CODE_BASE"]


class GuestBuildError(RuntimeError):
    """The guest program could not be assembled (missing toolchain or a broken source)."""


def program_names() -> list[str]:
    return sorted(p.stem for p in SOURCES.glob("*.S") if p.name not in _COMMON and p.stem != BIOS)


def _link_base(name: str) -> int:
    return BIOS_BASE if name == BIOS else CODE_BASE


def missing_tools() -> list[str]:
    """The build tools not installed here (empty when programs can be assembled)."""
    return [tool for tool in ("gcc", "ld") if shutil.which(tool) is None]


def cache_dir() -> Path:
    root = os.environ.get("VMIGRATE_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(root) / "vmigrate" / "x86guest"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path(tempfile.gettempdir()) / f"vmigrate-x86guest-{os.getuid()}"
        path.mkdir(parents=True, exist_ok=True)
    return path


def _source_key(name: str) -> str:
    digest = hashlib.sha256(f"{_link_base(name):#x}".encode())
    for part in (*_COMMON, f"{name}.S"):
        digest.update((SOURCES / part).read_bytes())
    return digest.hexdigest()[:16]


def image(name: str) -> bytes:
    """The flat binary of program *name*, linked at :data:`CODE_BASE` (the firmware at :data:`BIOS_BASE`)."""
    return binary(name).read_bytes()


def binary(name: str) -> Path:
    """The cached file holding :func:`image` of *name*, built first if needed."""
    if not (SOURCES / f"{name}.S").is_file():
        raise GuestBuildError(f"no guest program '{name}' (have: {', '.join(program_names())})")
    target = cache_dir() / f"{name}-{_source_key(name)}.bin"
    if target.is_file():
        return target
    if missing := missing_tools():
        raise GuestBuildError(f"building the x86 guest program '{name}' needs {' and '.join(missing)} "
                              "(apt-get install gcc)")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, out = Path(tmp) / f"{name}.o", Path(tmp) / f"{name}.bin"
        for argv in (
            ["gcc", "-c", "-I", str(SOURCES), str(SOURCES / f"{name}.S"), "-o", str(obj)],
            ["ld", "-N", f"-Ttext={_link_base(name):#x}", "-e", "_start", "--build-id=none", "--oformat=binary",
             "-o", str(out), str(obj)],
        ):
            result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                detail = (result.stderr or result.stdout).strip().splitlines()
                raise GuestBuildError(f"{argv[0]} failed on {name}.S: {detail[0] if detail else result.returncode}")
        # Atomic publish: a concurrent build of the same sources writes the same bytes.
        os.replace(out, target)
    return target
