"""``vmigrate migrate``: drive the migration of any QMP-speaking VM, with a live view.

Works against vmigrate VMs and real QEMU alike: it only uses QMP commands
both have.  Samples of ``query-migrate`` are kept for ``--json`` and
``--plot``; the exit status says how the migration ended (0 completed,
1 failed, 2 cancelled or interrupted).
"""

from __future__ import annotations

import argparse
import json
import sys

from vmigrate.cli.main import CLIError
from vmigrate.harness.migrate import MigrationRun, Sample
from vmigrate.qmp.client import QMPClient, QMPClientError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("migrate", help="migrate a running VM (vmigrate or QEMU) with a live view")
    p.add_argument("--qmp", required=True, help="source QMP socket: PATH, unix:PATH or tcp:HOST:PORT")
    p.add_argument("uri", help="migration URI, e.g. tcp:127.0.0.1:4444")
    p.add_argument("--dest-qmp", help="destination QMP socket; starts its incoming side with URI")
    p.add_argument("--cap", action="append", default=[], metavar="NAME[=on|off]", help="capability for both sides")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="parameter for both sides")
    p.add_argument("--json", action="store_true", help="print samples and the summary as JSON lines")
    p.add_argument("--plot", metavar="FILE.png", help="plot remaining bytes, throughput and dirty rate")
    p.add_argument("--interval", type=float, default=0.2, help="sampling interval in seconds")
    p.add_argument("--timeout", type=float, default=600.0, help="give up (cancel) after this many seconds")
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


def follow(run: MigrationRun, interval: float, timeout: float, as_json: bool, extra=lambda: []) -> None:
    """Sample until the migration ends, showing a live view (or JSON lines); Ctrl-C cancels it."""
    from rich.console import Console
    from rich.live import Live

    try:
        if as_json:
            run.wait(timeout, interval, lambda s: print(json.dumps({"sample": s.__dict__}), flush=True))
        else:
            with Live(render(Sample(0, "setup")), console=Console(), refresh_per_second=10) as live:
                run.wait(timeout, interval, lambda s: live.update(render(s, extra())))
    except KeyboardInterrupt:
        run.wait(0.0, 0.05)
        run.finish()
        raise
    run.finish()


def plot(samples: list[Sample], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    axes[0].plot(t, [s.remaining / (1 << 20) for s in samples])
    axes[0].set_ylabel("remaining (MiB)")
    axes[1].plot(t, [s.mbps for s in samples])
    axes[1].set_ylabel("throughput (Mbit/s)")
    axes[2].plot(t, [s.dirty_rate / (1 << 20) for s in samples])
    axes[2].set_ylabel("dirty rate (MiB/s)")
    axes[2].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    caps = parse_caps(args.cap)
    params = parse_params(args.param)
    try:
        src = QMPClient(args.qmp)
        dst = QMPClient(args.dest_qmp) if args.dest_qmp else None
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot connect to QMP: {err}") from None
    mig = MigrationRun(src, args.uri, dst)
    try:
        mig.prepare(caps, params)
        mig.start()
        follow(mig, args.interval, args.timeout, args.json)
    except QMPClientError as err:
        raise CLIError(err.desc) from None
    except TimeoutError as err:
        raise CLIError(str(err)) from None
    except KeyboardInterrupt:
        return 2
    summary = mig.summary()
    if args.json:
        print(json.dumps({"summary": summary}), flush=True)
    else:
        from rich.console import Console

        print_summary(summary, Console())
    if args.plot:
        plot(mig.samples, args.plot)
    status = summary["status"]
    if status == "completed" and summary["destination-status"] in (None, "completed"):
        return 0
    if status == "failed" or summary["destination-status"] == "failed":
        print(f"vmigrate migrate: migration failed: {summary.get('error-desc') or 'see the VM logs'}", file=sys.stderr)
        return 1
    return 2
