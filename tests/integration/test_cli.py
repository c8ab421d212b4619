"""The user-facing commands: run (with qmp-shell), migrate, analyze, demo."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client_json import record_problems
from vmigrate.harness.waiting import wait_for

VMIGRATE = [sys.executable, "-m", "vmigrate"]


def run_cli(*args: str, timeout: float = 120, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*VMIGRATE, *args], capture_output=True, text=True, timeout=timeout, input=stdin)


def test_qmp_shell_talks_to_a_vm(spawn, tmp_path):
    vm = spawn("vmigrate", "-m", "256M", "--guest", "ab")
    # The scripts run pytest with the venv's interpreter without activating the venv: its
    # console scripts sit next to that interpreter, not necessarily on PATH.
    scripts = Path(sys.executable).parent
    shell = shutil.which("qmp-shell", path=f"{scripts}{os.pathsep}{os.environ.get('PATH', os.defpath)}")
    assert shell, "qmp-shell comes with the qemu.qmp package"
    out = subprocess.run([shell, str(vm.sock)], input="query-status\nmigrate-set-parameters downtime-limit=500\n"
                         "query-migrate-parameters\n", capture_output=True, text=True, timeout=30).stdout
    assert '"status": "running"' in out
    assert '"downtime-limit": 500' in out


@pytest.mark.parametrize("args,message", [
    (["run", "-m", "lots"], "invalid size 'lots'"),
    (["run", "--guest", "nosuch"], "unknown guest workload 'nosuch'"),
    (["run", "--accel", "tcg"], "accelerator 'tcg' is not available"),
    (["run", "--qmp", "bogus"], "invalid QMP address 'bogus'"),
    (["run", "--accel", "soft", "--incoming", "vsock:x:1"], "--incoming vsock:x:1: Failed to parse cid 'x'"),
    (["run", "--accel", "soft", "--incoming", "rdma::1"], "--incoming rdma::1: RDMA ERROR: RDMA host is not set!"),
    (["analyze", "/nonexistent/stream"], "/nonexistent/stream"),
])
def test_errors_are_one_clear_line(args, message):
    result = run_cli(*args, timeout=30)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_migrate_client_drives_qemu_to_qemu(spawn, tmp_path):
    """The issue's check: `vmigrate migrate` against a real QEMU 7.2 → QEMU 7.2 migration."""
    pattern = np.random.default_rng(7).integers(0, 256, 16 << 20, dtype=np.uint8)
    pattern[: 8 << 20] = 0
    src_ram, dst_ram = tmp_path / "qsrc.ram", tmp_path / "qdst.ram"
    pattern.tofile(src_ram)
    src = spawn("qemu", memory="16M", mem_path=src_ram)
    dst = spawn("qemu", "-incoming", "defer", memory="16M", mem_path=dst_ram)
    plot = tmp_path / "migration.png"
    result = run_cli("migrate", "--qmp", str(src.tool_sock), "--dest-qmp", str(dst.tool_sock), "--json",
                     "--param", "max-bandwidth=512M", "--plot", str(plot), f"unix:{tmp_path / 'mig.sock'}")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert record_problems(lines) == []
    summary = lines[-1]["summary"]
    assert summary["status"] == "completed" and summary["destination-status"] == "completed"
    assert summary["ram-total-bytes"] == 16 << 20
    assert plot.stat().st_size > 0
    assert np.array_equal(np.fromfile(src_ram, np.uint8), np.fromfile(dst_ram, np.uint8))
    assert src.status() == "postmigrate"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def migrate_pair(spawn, tmp_path: Path, name: str, *client_args: str) -> subprocess.CompletedProcess:
    """`vmigrate migrate` with its live view between two fresh vmigrate VMs whose guest dirties memory."""
    guest = ("-m", "32M", "--guest", "stress:rate=16,wss=16M")
    src = spawn("vmigrate", "--name", f"{name}-src", *guest)
    dst = spawn("vmigrate", "--name", f"{name}-dst", *guest, "--incoming", "tcp:127.0.0.1:0")
    return run_cli("migrate", "--qmp", str(src.tool_sock), "--dest-qmp", str(dst.tool_sock),
                   "--param", "max-bandwidth=32M", "--json-log", str(tmp_path / f"{name}.jsonl"),
                   *client_args, "tcp:127.0.0.1:0")


def test_migrate_client_output_log_and_plots(spawn, tmp_path):
    """The live view, then the summary on its own line; the JSON log as documented; plots of one and two runs."""
    result = migrate_pair(spawn, tmp_path, "plain", "--plot", str(tmp_path / "plain.png"))
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s*migration summary", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"╯[^\n]", result.stdout) is None, result.stdout
    records = [json.loads(line) for line in (tmp_path / "plain.jsonl").read_text().splitlines()]
    assert record_problems(records) == []
    assert records[0]["run"]["source-name"] == "plain-src" and records[-1]["summary"]["status"] == "completed"
    width, height = png_size(tmp_path / "plain.png")
    assert 600 <= width <= 3000 and 400 <= height <= 3000

    assert migrate_pair(spawn, tmp_path, "xbzrle", "--cap", "xbzrle").returncode == 0
    out = tmp_path / "compare.png"
    result = run_cli("plot", str(tmp_path / "plain.jsonl"), str(tmp_path / "xbzrle.jsonl"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert png_size(out)[0] >= 600


def test_plot_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    for args, message in (([str(bad)], "bad.jsonl:1: not a vmigrate migrate JSON record"),
                          ([str(bad)] * 3, "give one JSON log, or two to compare")):
        result = run_cli("plot", *args, timeout=30)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_migrate_client_exit_status_on_failure(spawn, tmp_path):
    src = spawn("vmigrate", "-m", "16M")
    result = run_cli("migrate", "--qmp", str(src.sock), "--json", "tcp:127.0.0.1:1")
    assert result.returncode == 1
    assert "Failed to connect to '127.0.0.1:1'" in result.stderr


def test_analyze_a_vmigrate_stream(spawn, tmp_path):
    src = spawn("vmigrate", "-m", "16M", "--mem-path", str(tmp_path / "s.ram"), "--guest", "ab:end=4M")
    wait_for(lambda: (tmp_path / "s.ram").read_bytes()[:8] == b"VMIGRATE", 10, "guest start")
    stream = tmp_path / "stream.bin"
    src.cmd("migrate", uri=f"exec:cat > {stream}")
    assert src.wait_migration({"completed", "failed"})["status"] == "completed"
    out = tmp_path / "extract"
    result = run_cli("analyze", str(stream), "--extract", str(out))
    assert result.returncode == 0, result.stderr
    assert "globalstate" in result.stdout and "timer" in result.stdout
    assert np.array_equal(np.fromfile(out / "ram.bin", np.uint8), np.fromfile(tmp_path / "s.ram", np.uint8))


def test_demo_runs_to_completion():
    result = run_cli("demo", "-m", "128M", "--guest", "stress:rate=32,wss=64M", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the guest keeps running on the destination" in result.stdout
    assert "completed" in result.stdout
    assert re.search(r"^\s*migration summary", result.stdout, re.MULTILINE), result.stdout
