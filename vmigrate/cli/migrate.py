"""``vmigrate migrate``: drive the migration of any QMP-speaking VM, with a live view.

Works against vmigrate VMs and real QEMU alike: it only uses QMP commands
both have.  Samples of ``query-migrate`` are kept as JSON records for
``--json`` and ``--json-log`` (docs/client-json.md) and for ``--plot``; the
exit status says how the migration ended (0 completed, 1 failed, 2
cancelled or interrupted, a stalled migration included).

Beyond QEMU, each sample carries a convergence forecast
(:mod:`vmigrate.migration.forecast`); ``--postcopy`` switches to postcopy
on it or at a fixed time, and ``--stall`` gives up on a migration that no
longer moves (:mod:`vmigrate.cli.steer`, docs/client-json.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, TextIO

from vmigrate.cli.main import CLIError
from vmigrate.cli.plot import plot_runs, require_matplotlib
from vmigrate.cli.steer import Steering, forecast_line
from vmigrate.harness.migrate import MigrationRun, Sample
from vmigrate.harness.postcopy import PostcopyPlan
from vmigrate.harness.runlog import RunLog
from vmigrate.migration.forecast import STALL_AFTER, ConvergenceForecast
from vmigrate.qmp.client import QMPClient, QMPClientError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("migrate", help="migrate a running VM (vmigrate or QEMU) with a live view")
    p.add_argument("--qmp", required=True, help="source QMP socket: PATH, unix:PATH or tcp:HOST:PORT")
    p.add_argument("uri", help="migration URI, e.g. tcp:127.0.0.1:4444")
    p.add_argument("--dest-qmp", help="destination QMP socket; starts its incoming side with URI")
    p.add_argument("--cap", action="append", default=[], metavar="NAME[=on|off]", help="capability for both sides")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="parameter for both sides")
    p.add_argument("--json", action="store_true",
                   help="print the JSON records (docs/client-json.md) instead of the live view")
    p.add_argument("--json-log", metavar="FILE", help="also write the JSON records to FILE (for vmigrate plot)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="plot remaining bytes, throughput and dirty rate with passes, switchover and downtime")
    p.add_argument("--interval", type=float, default=0.2, help="sampling interval in seconds")
    p.add_argument("--timeout", type=float, default=600.0, help="give up (cancel) after this many seconds")
    p.add_argument("--postcopy", metavar="auto|after=SECONDS",
                   help="switch to postcopy when the forecast misses --max-precopy (auto) or at a fixed time; "
                        "sets postcopy-ram on both sides")
    p.add_argument("--max-precopy", type=float, metavar="SECONDS",
                   help="with --postcopy auto: the longest precopy, counted from the start")
    p.add_argument("--stall", type=float, default=STALL_AFTER, metavar="SECONDS",
                   help="cancel (or with --postcopy auto, switch) after this long without progress")
    p.set_defaults(func=run)


def parse_caps(items: list[str]) -> list[dict]:
    caps = []
    for item in items:
        name, sep, value = item.partition("=")
        if sep and value not in ("on", "off", "true", "false"):
            raise CLIError(f"capability value must be on or off: '{item}'")
        caps.append({"capability": name, "state": value in ("", "on", "true")})
    return caps


def parse_params(items: list[str]) -> dict:
    """NAME=VALUE with the value's JSON type taken from the schema."""
    from vmigrate.machine.memory import parse_size
    from vmigrate.qapi.schema import load

    types = {m.name: m.type for m in load().members("MigrateSetParameters")}
    params: dict = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise CLIError(f"unknown migration parameter '{name}'" if sep else f"parameter must be NAME=VALUE: '{item}'")
        kind = types[name]
        try:
            if kind == "bool":
                params[name] = value in ("on", "true", "yes", "1")
            elif kind in ("size",):
                params[name] = parse_size(value, "B")
            elif kind in ("int", "uint8", "uint32", "uint64", "int64"):
                params[name] = int(value)
            else:
                params[name] = value
        except ValueError:
            raise CLIError(f"invalid value '{value}' for parameter '{name}'") from None
    return params


#: Longest silence of the plain progress lines, in seconds.
PROGRESS_EVERY = 5.0


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def render(s: Sample, extra_lines: list[str] = ()):
    """A rich renderable of the current state."""
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    done = (s.total - s.remaining) if s.total else 0
    table.add_row("status", s.status)
    table.add_row("sent", f"{human_bytes(s.transferred)}   remaining {human_bytes(s.remaining)} of {human_bytes(s.total)}")
    table.add_row("throughput", f"{s.mbps:.0f} Mbit/s")
    table.add_row("pass", str(s.passes))
    table.add_row("dirty rate", f"{human_bytes(s.dirty_rate)}/s")
    table.add_row("expected downtime", "-" if s.expected_downtime is None else f"{s.expected_downtime} ms")
    table.add_row("throttle", f"{s.throttle} %")
    forecast = forecast_line(s, human_bytes)
    if forecast is not None:
        table.add_row("forecast", forecast)
    for line in extra_lines:
        table.add_row("", line)
    bar = ProgressBar(total=max(s.total, 1), completed=done if s.status != "completed" else max(s.total, 1))
    grid = Table.grid()
    grid.add_row(bar)
    grid.add_row(table)
    return Panel(grid, title=f"migration t={s.t:.1f}s")


def print_summary(summary: dict, console) -> None:
    from rich.table import Table

    table = Table(title="migration summary", show_header=False)
    for key, value in summary.items():
        if value is None:
            continue
        if key.endswith("-bytes"):
            value = f"{human_bytes(value)} ({value})"
        elif key == "mbps":
            value = f"{value:.1f}"
        table.add_row(key, str(value))
    console.print(table)


class JsonRecords:
    """Where the JSON records go: stdout for ``--json``, a file for ``--json-log``.

    Each record is flushed as one line, so a log can be followed while the
    migration runs and holds everything up to an interruption.
    """

    def __init__(self, stdout: bool = False, path: str | None = None) -> None:
        self.stdout = stdout
        self.streams: list[TextIO] = [sys.stdout] if stdout else []
        self.file: TextIO | None = None
        if path is not None:
            try:
                self.file = open(path, "w", encoding="utf-8")
            except OSError as err:
                raise CLIError(f"cannot write the JSON log: {err}") from None
            self.streams.append(self.file)

    def write(self, kind: str, body: dict) -> None:
        line = json.dumps({kind: body})
        for stream in self.streams:
            print(line, file=stream, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class ProgressLines:
    """Progress as plain lines where no live view can be drawn (a pipe, a log file, CI).

    A line whenever the status or the pass changes, and at least every
    :data:`PROGRESS_EVERY` seconds, so a migration that does not converge is
    visible as one, not as silence until the timeout.
    """

    def __init__(self, console) -> None:
        self.console = console
        self._last: tuple[str, int] | None = None
        self._last_t = 0.0

    def show(self, s: Sample) -> None:
        key = (s.status, s.passes)
        if key == self._last and s.t - self._last_t < PROGRESS_EVERY:
            return
        self._last, self._last_t = key, s.t
        forecast = forecast_line(s, human_bytes)
        self.console.print(f"t={s.t:.1f}s {s.status} pass {s.passes}: sent {human_bytes(s.transferred)}, "
                           f"remaining {human_bytes(s.remaining)} of {human_bytes(s.total)}, "
                           f"{s.mbps:.0f} Mbit/s, dirty {human_bytes(s.dirty_rate)}/s"
                           + ("" if forecast is None else f"; {forecast}"), highlight=False)


def follow(run: MigrationRun, interval: float, timeout: float, records: JsonRecords, console,
           extra: Callable[[], list[str]] = lambda: [], plan: PostcopyPlan | None = None) -> None:
    """Sample until the migration ends, each sample a record, with a live view unless they go to stdout.

    Each sample is steered (:class:`Steering`: postcopy per *plan*, stalls);
    its notes are lines of their own, or of the live view.  Ctrl-C cancels
    the migration.
    """
    def say(line: str) -> None:
        if not records.stdout and not console.is_terminal:
            console.print(line, highlight=False)

    steer = Steering(run, plan, records, say)

    def record(s: Sample) -> None:
        records.write("sample", s.__dict__)

    def show(s: Sample) -> None:
        record(s)
        live.update(render(s, extra() + steer.notes))

    try:
        if records.stdout:
            run.wait(timeout, interval, record, steer)
        elif not console.is_terminal:
            lines = ProgressLines(console)
            run.wait(timeout, interval, lambda s: (record(s), lines.show(s)), steer)
        else:
            from rich.live import Live

            with Live(render(Sample(0, "setup")), console=console, refresh_per_second=10) as live:
                run.wait(timeout, interval, show, steer)
    except KeyboardInterrupt:
        run.wait(0.0, 0.05)
        run.finish()
        raise
    run.finish()


def drive(run: MigrationRun, interval: float, timeout: float, records: JsonRecords, console,
          extra: Callable[[], list[str]] = lambda: [], plan: PostcopyPlan | None = None) -> RunLog:
    """Start a prepared migration and follow it to its end: the records, the summary, the log."""
    log = RunLog(run=run.describe(), samples=run.samples)
    records.write("run", log.run)
    run.start()
    follow(run, interval, timeout, records, console, extra, plan)
    run.settle_final()
    log.summary = run.summary()
    records.write("summary", log.summary)
    if not records.stdout:
        print_summary(log.summary, console)
    return log


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    caps = parse_caps(args.cap)
    params = parse_params(args.param)
    plan = None
    if args.postcopy is not None:
        try:
            plan = PostcopyPlan.parse(args.postcopy, args.max_precopy)
        except ValueError as err:
            raise CLIError(str(err)) from None
        caps = [c for c in caps if c["capability"] != "postcopy-ram"] + [{"capability": "postcopy-ram",
                                                                          "state": True}]
    elif args.max_precopy is not None:
        raise CLIError("--max-precopy needs --postcopy auto")
    if args.plot:
        require_matplotlib()
    try:
        src = QMPClient(args.qmp)
        dst = QMPClient(args.dest_qmp) if args.dest_qmp else None
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot connect to QMP: {err}") from None
    mig = MigrationRun(src, args.uri, dst, forecaster=ConvergenceForecast(args.stall))
    records = JsonRecords(args.json, args.json_log)
    try:
        mig.prepare(caps, params)
        log = drive(mig, args.interval, args.timeout, records, Console(), plan=plan)
    except QMPClientError as err:
        raise CLIError(err.desc) from None
    except TimeoutError as err:
        raise CLIError(str(err)) from None
    except KeyboardInterrupt:
        return 2
    finally:
        records.close()
    if args.plot:
        plot_runs([log], [Path(args.plot).stem], args.plot)
    summary = log.summary
    status = summary["status"]
    if status == "completed" and summary["destination-status"] in (None, "completed"):
        return 0
    if status == "failed" or summary["destination-status"] == "failed":
        print(f"vmigrate migrate: migration failed: {summary.get('error-desc') or 'see the VM logs'}", file=sys.stderr)
        return 1
    return 2
