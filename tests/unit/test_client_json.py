"""The migration client's output without VMs: JSON records against docs/client-json.md, the
live view's last line, and the plot's marks, from QEMU-shaped ``query-migrate`` answers."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest
from rich.console import Console

from client_json import documented_fields, record_problems
from vmigrate.cli.main import CLIError
from vmigrate.cli.migrate import JsonRecords, drive
from vmigrate.cli.plot import labels_for, plot_runs, require_matplotlib
from vmigrate.harness.migrate import MigrationRun, Sample
from vmigrate.harness.runlog import RunLog, pass_starts, read_log, switchover

MIB = 1 << 20


def ram(passes: int, remaining: int, mbps: float) -> dict:
    return {"transferred": 64 * MIB - remaining, "remaining": remaining, "total": 64 * MIB, "duplicate": 100,
            "normal": 1000, "normal-bytes": 1000 * 4096, "dirty-sync-count": passes, "mbps": mbps,
            "dirty-pages-rate": 256, "page-size": 4096}


#: The source's answers in turn (the last repeats), as QEMU 7.2 gives them.
SOURCE = [
    {"status": "setup"},
    {"status": "active", "setup-time": 2, "total-time": 200, "expected-downtime": 300, "ram": ram(1, 40 * MIB, 800.5)},
    {"status": "active", "setup-time": 2, "total-time": 400, "expected-downtime": 300, "ram": ram(2, 8 * MIB, 790.0)},
    {"status": "active", "setup-time": 2, "total-time": 600, "expected-downtime": 300, "ram": ram(4, MIB, 790.0),
     "cpu-throttle-percentage": 20},
    {"status": "completed", "setup-time": 2, "total-time": 700, "downtime": 40, "ram": ram(5, 0, 812.25)},
]
DEST = [{"status": "setup", "socket-address": [{"type": "inet", "host": "127.0.0.1", "port": "4444"}]},
        {"status": "completed"}]


class FakeQMP:
    """Answers ``query-migrate`` from a script and everything else as QEMU does for a plain VM."""

    def __init__(self, address: str, name: str | None, migrate: list[dict]) -> None:
        self.address, self.name, self.migrate = address, name, list(migrate)

    def execute(self, command: str, args: dict | None = None) -> dict:
        if command == "query-migrate":
            return self.migrate.pop(0) if len(self.migrate) > 1 else self.migrate[0]
        if command == "query-name":
            return {"name": self.name} if self.name else {}
        return {}


def migrate(tmp_path, caps=({"capability": "xbzrle", "state": True},), params=None) -> tuple[RunLog, str]:
    """One scripted migration through the client's own code; the log and what the console showed."""
    mig = MigrationRun(FakeQMP("/run/src.sock", "srcvm", SOURCE), "tcp:127.0.0.1:0",
                       FakeQMP("/run/dst.sock", None, DEST))
    mig.prepare(list(caps), params or {"max-bandwidth": 64 * MIB})
    records = JsonRecords(path=str(tmp_path / "run.jsonl"))
    out = io.StringIO()
    drive(mig, 0.0, 10.0, records, Console(file=out, width=100))
    records.close()
    return read_log(tmp_path / "run.jsonl"), out.getvalue()


def test_records_are_the_documented_ones(tmp_path):
    log, _ = migrate(tmp_path)
    records = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert record_problems(records) == []
    assert log.run["uri"] == "tcp:127.0.0.1:4444"
    assert log.run["source-name"] == "srcvm" and log.run["destination-name"] is None
    assert log.run["capabilities"] == {"xbzrle": True, "events": True}
    assert log.summary["downtime-ms"] == 40 and log.summary["destination-status"] == "completed"


def test_the_doc_has_every_record_type():
    assert set(documented_fields()) == {"run", "sample", "postcopy", "stall", "summary"}
    assert set(documented_fields()["sample"]) == set(Sample.__dataclass_fields__)


def test_summary_starts_on_its_own_line(tmp_path):
    """rich ends a live view without a newline when stdout is no terminal (as under scripts/demo.sh)."""
    _, shown = migrate(tmp_path)
    assert re.search(r"^\s*migration summary", shown, re.MULTILINE), shown
    assert re.search(r"╯[^\n]", shown) is None


def test_json_on_stdout_replaces_the_view(tmp_path, capsys):
    mig = MigrationRun(FakeQMP("/run/src.sock", None, SOURCE), "unix:/run/mig.sock")
    mig.prepare([], {})
    drive(mig, 0.0, 10.0, JsonRecords(stdout=True), Console(file=io.StringIO()))
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record_problems(records) == []
    assert records[0]["run"]["destination"] is None and records[-1]["summary"]["destination-status"] is None


def test_passes_and_switchover_come_from_the_records(tmp_path):
    log, _ = migrate(tmp_path)
    assert [n for _, n in pass_starts(log.samples)] == [1, 2, 4, 5]
    assert switchover(log) == pytest.approx(0.66)
    log.summary = {"status": "cancelled"}
    assert switchover(log) == log.samples[-1].t


def test_a_log_that_is_not_one(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"run": {}}\n{"qmp": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_log(bad)


def artists(fig, gid: str) -> list:
    return [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]


def test_plot_marks_passes_switchover_and_downtime(tmp_path):
    log, _ = migrate(tmp_path, params={"max-bandwidth": 64 * MIB, "downtime-limit": 100})
    png = tmp_path / "run.png"
    fig = plot_runs([log], ["run"], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    title = fig._suptitle.get_text()
    for part in ("srcvm → /run/dst.sock", "tcp:127.0.0.1:4444", "xbzrle", "max-bandwidth=64M",
                 "downtime-limit=100", "downtime 40 ms"):
        assert part in title
    assert [a.get_text() for a in artists(fig, "pass-label")] == ["pass 1", "pass 2", "passes 3–4", "pass 5"]
    assert len(artists(fig, "switchover")) == 3 and len(artists(fig, "downtime")) == 3
    assert [a.get_text() for a in artists(fig, "switchover-label")] == ["switchover, downtime 40 ms"]


def test_plot_compares_two_runs(tmp_path):
    a, _ = migrate(tmp_path)
    b, _ = migrate(tmp_path, caps=())
    fig = plot_runs([a, b], labels_for([tmp_path / "x" / "run.jsonl", tmp_path / "run.jsonl"]), tmp_path / "ab.png")
    assert fig._suptitle.get_text().splitlines()[0].startswith("A: ")
    assert "B: srcvm" in fig._suptitle.get_text() and "capabilities: none" in fig._suptitle.get_text()
    assert len(artists(fig, "switchover-label")) == 2
    assert [t.get_text() for t in fig.axes[2].get_legend().get_texts()] == ["A", "B"]


def test_missing_matplotlib_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(CLIError, match=r"pip install 'vmigrate\[plot\]'"):
        require_matplotlib()


def test_progress_lines_without_a_terminal():
    """Piped or logged, the client prints a line per status or pass change, and at least every few seconds."""
    from vmigrate.cli.migrate import PROGRESS_EVERY, ProgressLines
    from vmigrate.harness.migrate import Sample

    out = io.StringIO()
    lines = ProgressLines(Console(file=out, width=200))
    for t, status, passes in [(0.1, "active", 1), (0.2, "active", 1), (0.3, "active", 2),
                              (0.4 + PROGRESS_EVERY, "active", 2), (0.5 + PROGRESS_EVERY, "completed", 2)]:
        lines.show(Sample(t, status, transferred=1 << 20, remaining=1 << 20, total=4 << 20, passes=passes))
    shown = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in shown] == [
        "t=0.1s active pass 1", "t=0.3s active pass 2", f"t={0.4 + PROGRESS_EVERY:.1f}s active pass 2",
        f"t={0.5 + PROGRESS_EVERY:.1f}s completed pass 2"]
    assert "remaining 1.0 MiB of 4.0 MiB" in shown[0]
