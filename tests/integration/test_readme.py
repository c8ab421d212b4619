"""README.md's "Using it" walk-through, run as a new user would type it.

The commands are read from the README's first code block under "## Using it",
so this test follows the README as it changes: each line runs as written, in
a fresh directory (the README's socket and file paths are relative), with the
console scripts the install put next to this interpreter.  A ``vmigrate run``
keeps running, as the README says, so it is started in the background and
waited for until its QMP socket accepts; every other command must finish
within a bounded time and produce what the README's comment on it promises.
The Quick start scripts themselves are not run here: ``test.sh`` is what runs
this test, and the demo's library path is covered by test_cli.py.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vmigrate.cli.main import build_parser
from vmigrate.harness.waiting import wait_for
from vmigrate.machine.memory import parse_size
from vmigrate.qmp.client import try_connect

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(sys.executable).parent
COMMAND_TIMEOUT = 60.0
START_TIMEOUT = 30.0
#: The programs whose results the walk-through knows how to check.
KNOWN = ("vmigrate", "qmp-shell")


def readme_commands() -> list[list[str]]:
    """The commands of the "Using it" code block, comments dropped, as argv lists."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```[^\n]*\n(.*?)^```", section, re.M | re.S)
    assert block, 'README.md: no code block under "## Using it"'
    return [argv for line in block.group(1).splitlines() if (argv := shlex.split(line, comments=True))]


@pytest.fixture
def background():
    """Start long-running commands; terminate them (bounded) whatever the test's outcome."""
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_readme_walk_through(tmp_path, background):
    commands = readme_commands()
    assert any(argv[:2] == ["vmigrate", "migrate"] for argv in commands), commands
    # The console scripts run this checkout's code, the one whose README is tested, whichever
    # vmigrate the interpreter's site-packages would otherwise import.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    memory: int | None = None
    for n, shown in enumerate(commands):
        line = shlex.join(shown)
        program, args = shown[0], shown[1:]
        assert program in KNOWN, f"README.md shows `{line}`: teach this test what it should produce"
        tool = SCRIPTS / program
        assert tool.exists(), f"{line}: no {program} next to {sys.executable}"
        if args[:1] == ["run"]:
            memory = parse_size(build_parser().parse_args(args).memory)
            log = tmp_path / f"vm{n}.log"
            proc = background([str(tool), *args], tmp_path, env, log)
            for address in (args[i + 1] for i, a in enumerate(args) if a == "--qmp"):
                target = str(tmp_path / address[len("unix:"):]) if address.startswith("unix:") else address

                def accepting(target: str = target) -> bool:
                    assert proc.poll() is None, f"{line} exited: {log.read_text()}"
                    client = try_connect(target, START_TIMEOUT)
                    if client is not None:
                        client.close()
                    return client is not None

                wait_for(accepting, START_TIMEOUT, f"{line}: its QMP socket")
            continue
        stdin = "query-status\n" if program == "qmp-shell" else None
        result = subprocess.run([str(tool), *args], cwd=tmp_path, env=env, input=stdin, capture_output=True,
                                text=True, timeout=COMMAND_TIMEOUT)
        assert result.returncode == 0, f"{line}:\n{result.stdout}\n{result.stderr}"
        if program == "qmp-shell":
            assert '"status": "running"' in result.stdout, f"{line}:\n{result.stdout}"
        elif args[0] == "migrate":
            assert "completed" in result.stdout, f"{line}:\n{result.stdout}"
            for option in ("--json-log", "--plot"):
                if option in args:
                    assert (tmp_path / args[args.index(option) + 1]).stat().st_size > 0, line
        elif args[0] == "plot":
            assert (tmp_path / args[args.index("--out") + 1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", line
        elif args[0] == "analyze":
            assert "RAM blocks:" in result.stdout and "globalstate" in result.stdout, result.stdout
            if "--extract" in args:
                image = tmp_path / args[args.index("--extract") + 1] / "ram.bin"
                assert image.stat().st_size == memory, line
        else:
            pytest.fail(f"README.md shows `{line}`: teach this test what it should produce")
