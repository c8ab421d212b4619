"""Fixtures for migrations between real QEMU 7.2 and vmigrate.

RAM files live on tmpfs when there is one: page-cache writeback of hundreds
of MiB to disk would dominate the timings.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from machines import Machines


@pytest.fixture
def ramdir(tmp_path: Path):
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)
    path = Path(tempfile.mkdtemp(prefix="vmigrate-interop-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def machines(ramdir: Path, spawn) -> Machines:
    """Requested after ``ramdir`` so the processes are gone before their RAM files are removed."""
    return Machines(spawn, ramdir)
