"""Fixtures that start vmigrate VMs and real QEMU 7.2 processes and always clean up."""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from procs import SpawnedVM  # noqa: E402

_counter = itertools.count()
_spawned = pytest.StashKey[list]()
#: Lines of each VM's log that a failing test's report shows: CI keeps no temporary files.
LOG_TAIL_LINES = 40


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test's report ends with the tail of every VM log it spawned."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for proc in item.stash.get(_spawned, []):
        lines = proc.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        report.sections.append((f"log of {proc.log_path.name} (pid {proc.pid}), last lines", "\n".join(lines)))


@pytest.fixture
def spawn(tmp_path: Path, request: pytest.FixtureRequest):
    """``spawn("vmigrate", *args)`` / ``spawn("qemu", *args, memory=, mem_path=, pc=)`` → SpawnedVM."""
    procs: list[SpawnedVM] = []
    request.node.stash[_spawned] = procs

    def start(kind: str, *args: str, **qemu) -> SpawnedVM:
        proc = SpawnedVM(kind, tmp_path, next(_counter), *args, **qemu)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.close()


@pytest.fixture
def shm():
    """A scratch directory on tmpfs, removed afterwards: postcopy's userfaultfd serves a shared
    RAM file only on shmem (docs/postcopy.md), so RAM files that take part live here."""
    if not os.access("/dev/shm", os.W_OK):
        pytest.fail("postcopy needs a writable tmpfs at /dev/shm for its shared RAM files")
    path = Path(tempfile.mkdtemp(prefix="vmigrate-shm-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spawn_shm(shm, spawn):
    """``spawn`` after ``shm``: fixtures end in reverse, so the processes stop before their RAM
    directory goes."""
    return spawn, shm
