"""The benchmark harness: RAM images, verification, memory sampling, profiles, and tiny end-to-end runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vmigrate.cli.bench import ceiling, images, memwatch, profile, report, runner, scaling
from vmigrate.cli.main import CLIError, main
from vmigrate.harness.migrate import bound_uri

PAGE = 4096


def test_ram_image_has_exactly_the_requested_zero_pages(tmp_path: Path) -> None:
    image = images.fill_ram_image(tmp_path / "ram", 1 << 20, 0.75, seed=3, chunk=64 * PAGE)
    pages = np.fromfile(image.path, dtype=np.uint8).reshape(-1, PAGE)
    zero = ~pages.any(axis=1)
    assert image.zero_pages == int(zero.sum()) == 192
    assert image.sha256 == images.file_sha256(image.path)
    assert image.wire_bytes == 64 * (8 + PAGE) + 192 * (8 + 1)
    again = images.fill_ram_image(tmp_path / "ram2", 1 << 20, 0.75, seed=3)
    assert again.sha256 == image.sha256


def test_verify_reports_the_differing_pages(tmp_path: Path) -> None:
    image = images.fill_ram_image(tmp_path / "src", 64 * PAGE, 0.0, seed=1)
    dst = tmp_path / "dst"
    shutil.copyfile(image.path, dst)
    rec: dict = {"note": ""}
    images.verify(rec, image.path, dst)
    assert rec["verified"] is True
    with open(dst, "r+b") as f:
        for page in (5, 40):
            f.seek(page * PAGE + 100)
            f.write(b"\x00\x01")
    images.verify(rec, image.path, dst)
    assert rec["verified"] is False
    assert rec["note"] == "destination RAM differs from source in 2 pages (first: page 5)"


def test_a_wrong_migration_fails_the_benchmark() -> None:
    runs = [{"impl": "vmigrate", "scenario": "precopy", "status": "completed", "verified": False, "note": "x"}]
    with pytest.raises(CLIError, match="differs from the source in 1 run"):
        report.report_failures(runs)
    ok = [{"impl": "qemu", "scenario": "precopy", "status": "completed", "verified": True},
          {"impl": "qemu", "scenario": "xbzrle", "status": "n/a"},
          {"impl": "vmigrate", "scenario": "xbzrle", "status": "not implemented"}]
    assert report.report_failures(ok) == 0
    assert report.report_failures(ok + [{"impl": "qemu", "scenario": "compress", "status": "failed"}]) == 1


def test_memwatch_keeps_peaks_of_a_live_process() -> None:
    watch = memwatch.MemWatch({"me": os.getpid()}, interval=0.01).start()
    block = np.ones(32 << 20, dtype=np.uint8)
    watch.sample()
    peaks = watch.stop()["me"]
    assert peaks["RssAnon"] >= block.nbytes
    assert peaks["VmHWM"] >= peaks["RssAnon"]
    assert memwatch.read_status(2**22 + 12345) == {}


def test_memwatch_keeps_the_peak_of_child_processes() -> None:
    """A VM's worker processes hold the guest pages they touch: their peak is kept per parent."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; b = bytearray(48 << 20); print('ready', flush=True); "
                              "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        assert child.pid in memwatch.children(os.getpid())
        watch = memwatch.MemWatch({"me": os.getpid()}, interval=0.01).start()
        watch.sample()
    finally:
        child.communicate("", timeout=10)
    watch.stop()
    assert watch.children_peak["me"] >= 48 << 20
    assert memwatch.children(2**22 + 12345) == []


def test_check_space_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(CLIError, match="free, a test needs"):
        images.check_space(tmp_path, 1 << 60, "a test")


def test_loopback_ceiling_moves_every_byte() -> None:
    result = ceiling.loopback_ceiling(3 << 20, chunk=1 << 20, timeout=30)
    assert result["status"] == "completed"
    assert result["bytes"] == 3 << 20


def test_profile_summary_per_thread(tmp_path: Path) -> None:
    raw = tmp_path / "src.txt"
    raw.write_text(
        "thread (1): MainThread;select (selectors.py:468) 50\n"
        "thread (2): live_migration;Thread.run (threading.py:982);_run (vmigrate/m.py:10);write (vmigrate/c.py:5) 30\n"
        "thread (2): live_migration;Thread.run (threading.py:982);_run (vmigrate/m.py:12);scan (vmigrate/r.py:7) 10\n"
    )
    assert profile.profile_threads(raw) == ["thread (2): live_migration"]
    summary = profile.summarize_profile(raw, "thread (2): live_migration")
    assert summary["samples"] == 40
    assert summary["self"] == [["write (vmigrate/c.py)", 75.0], ["scan (vmigrate/r.py)", 25.0]]
    assert summary["self_lines"][0] == ["write (vmigrate/c.py:5)", 75.0]
    assert summary["inclusive"][0] == ["_run (vmigrate/m.py)", 100.0]


def test_bound_uri_takes_the_port_the_destination_bound() -> None:
    info = {"socket-address": [{"type": "inet", "host": "127.0.0.1", "port": "40123"}]}
    assert bound_uri("tcp:127.0.0.1:0", info) == "tcp:127.0.0.1:40123"
    assert bound_uri("tcp:127.0.0.1:4444", info) == "tcp:127.0.0.1:4444"
    assert bound_uri("tcp:[::1]:0", {"socket-address": [{"type": "inet", "host": "::1", "port": "9"}]}) == "tcp:[::1]:9"


def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys) -> None:
    assert main(["bench", "precopy", "--size", "1000K", "--out", str(tmp_path)]) == 1
    assert "multiple of 1 MiB" in capsys.readouterr().err
    assert main(["bench", "matrix", "--scenarios", "warp", "--size", "8M", "--out", str(tmp_path)]) == 1
    assert "unknown scenario 'warp'" in capsys.readouterr().err
    assert main(["bench", "precopy", "--size", "8M,16M", "--out", str(tmp_path)]) == 1
    assert "bench precopy takes one --size" in capsys.readouterr().err
    assert main(["bench", "scaling", "--size", "8M", "--compression", "lz4", "--out", str(tmp_path)]) == 1
    assert "--compression takes a subset of none,zlib,zstd" in capsys.readouterr().err


def test_precopy_end_to_end_tiny(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["bench", "precopy", "--size", "8M", "--zero-fraction", "0.5", "--out", str(out)]) == 0
    doc = json.loads((out / "precopy.json").read_text())
    runs = {r["impl"]: r for r in doc["runs"]}
    for impl in ("vmigrate", "qemu"):
        assert runs[impl]["status"] == "completed"
        assert runs[impl]["verified"] is True
        assert runs[impl]["max_bandwidth_readback"] == runner.UNLIMITED_BANDWIDTH
        assert runs[impl]["zero_pages"] == 1024
        assert runs[impl]["src_peak_shmem"] > 0
    assert runs["ceiling"]["bytes"] == 1024 * (8 + PAGE) + 1024 * 9
    assert doc["summary"]["ratios"]["total_time_vmigrate_over_qemu"] is not None
    assert (out / "precopy.csv").read_text().startswith("impl,")
    assert (out / "precopy.png").stat().st_size > 0


def test_matrix_records_unimplemented_and_impossible_cells(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = main(["bench", "matrix", "--size", "8M", "--scenarios", "precopy,xbzrle", "--dirty-rates", "0,16",
               "--wss", "4M", "--out", str(out)])
    assert rc == 0
    runs = json.loads((out / "matrix.json").read_text())["runs"]
    cells = {(r["scenario"], r["impl"], r["dirty_rate_mib_s"]): r for r in runs}
    assert len(cells) == 8
    assert cells[("precopy", "qemu", 16)]["status"] == "n/a"
    assert cells[("xbzrle", "qemu", 16)]["status"] == "n/a"
    assert cells[("xbzrle", "vmigrate", 0)]["status"] in ("completed", "not implemented")
    for r in runs:
        if r["status"] == "completed":
            assert r["verified"] is True
    assert cells[("precopy", "vmigrate", 16)]["status"] == "completed"
    assert (out / "matrix.png").stat().st_size > 0


def test_scaling_end_to_end_tiny(tmp_path: Path) -> None:
    """Both implementations per cell, multifd and the legacy compress threads; table, plot, ratios."""
    out = tmp_path / "out"
    rc = main(["bench", "scaling", "--size", "8M", "--channels", "1,2", "--compression", "none,zstd",
               "--compress-threads", "2", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "scaling.json").read_text())
    cells = {(r["compression"], r["channels"], r["impl"]): r for r in doc["runs"]}
    assert len(cells) == 10
    for r in doc["runs"]:
        assert (r["status"], r["verified"]) == ("completed", True)
    assert cells[("compress", 2, "qemu")]["scenario"] == "compress"
    rows = doc["summary"]["cells"]
    assert [(r["compression"], r["channels"]) for r in rows] == [("none", 1), ("none", 2), ("zstd", 1), ("zstd", 2),
                                                                   ("compress", 2)]
    assert all(r["ratio"] is not None for r in rows)
    table = (out / "scaling.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) and table[2].startswith("| 8.0 MiB | none | 1 |")
    assert (out / "scaling.png").stat().st_size > 0


def test_scaling_verdict_names_missed_targets_and_drops() -> None:
    def row(method: str, n: int, v: float, q: float) -> dict:
        return {"size_bytes": 1 << 30, "compression": method, "channels": n, "ratio": round(v / q, 3),
                "vmigrate": {"guest_mib_s": 1024 / v}, "qemu": {"guest_mib_s": 1024 / q}}

    good = [row("none", 1, 2.0, 1.0), row("none", 2, 1.0, 1.0), row("zlib", 2, 0.7, 1.0)]
    assert scaling.verdict(good) == ["all targets met"]
    bad = [row("none", 2, 1.0, 1.0), row("none", 4, 1.2, 1.0), row("zlib", 2, 0.9, 1.0)]
    assert scaling.verdict(bad) == [
        "target missed: 1.0 GiB none x4 ratio 1.2 > 1.0",
        "target missed: 1.0 GiB zlib x2 ratio 0.9 > 0.8",
        "not monotonic: 1.0 GiB none, vmigrate MiB/s by count 2: 1,024, 4: 853",
    ]
