"""Fixtures that start vmigrate VMs and real QEMU 7.2 processes and always clean up."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from procs import SpawnedVM  # noqa: E402

_counter = itertools.count()


@pytest.fixture
def spawn(tmp_path: Path):
    """``spawn("vmigrate", *args)`` / ``spawn("qemu", *args, memory=, mem_path=, pc=)`` → SpawnedVM."""
    procs: list[SpawnedVM] = []

    def start(kind: str, *args: str, **qemu) -> SpawnedVM:
        proc = SpawnedVM(kind, tmp_path, next(_counter), *args, **qemu)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.close()
