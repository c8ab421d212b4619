"""``vmigrate plot``: draw one migration, or compare two, from their JSON logs.

The logs are what ``vmigrate migrate --json`` prints or ``--json-log`` writes
(docs/client-json.md); ``vmigrate migrate --plot`` draws its own run the same
way.  Each run shows remaining bytes, throughput and dirty rate over time,
its pass boundaries (dotted), its switchover (dashed) and its downtime
(shaded, value in the label); the title says what migrated where, over which
URI, with which capabilities and parameters.  matplotlib is the optional
``plot`` extra, imported only here and only when a plot is drawn.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from vmigrate.cli.main import CLIError
from vmigrate.harness.runlog import RunLog, pass_starts, read_log, switchover

MIB = 1 << 20


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot one migration or compare two from vmigrate migrate's JSON logs")
    p.add_argument("logs", nargs="+", metavar="LOG.jsonl", help="one or two JSON logs (vmigrate migrate --json-log)")
    p.add_argument("--out", metavar="FILE.png", help="image to write (default: next to the first log)")
    p.set_defaults(func=run)


def require_matplotlib():
    """matplotlib.pyplot on the file-only Agg backend, or a CLIError saying how to install it."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise CLIError("plotting needs matplotlib: pip install 'vmigrate[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def param_text(name: str, value) -> str:
    """Bandwidths in MiB/s as ``--param`` accepts them (``64M``), other values as they are."""
    if "bandwidth" in name and isinstance(value, int) and value and value % MIB == 0:
        return f"{value // MIB}M"
    return str(value)


def describe(log: RunLog, label: str) -> str:
    """One title line: what migrated where, how, and how it ended."""
    run, summary = log.run, log.summary
    src = run.get("source-name") or run.get("source", "?")
    dst = run.get("destination-name") or run.get("destination") or "(destination not driven)"
    caps = [name for name, on in run.get("capabilities", {}).items() if on and name != "events"]
    params = [f"{name}={param_text(name, value)}" for name, value in run.get("parameters", {}).items()]
    outcome = f"{summary.get('status', 'no summary')}"
    if summary.get("total-time-ms") is not None:
        outcome += f" in {summary['total-time-ms']} ms, downtime {summary.get('downtime-ms')} ms"
    line = (f"{label}: {src} → {dst} over {run.get('uri', '?')}; "
            f"capabilities: {', '.join(caps) or 'none'}; parameters: {', '.join(params) or 'defaults'}; {outcome}")
    return textwrap.fill(line, 120, subsequent_indent="    ", break_on_hyphens=False)


def mark_passes(axes, log: RunLog, color: str) -> None:
    """A dotted line where a sample first sees a pass; several passes between two samples share one."""
    last = 0
    for t, number in pass_starts(log.samples):
        for ax in axes:
            ax.axvline(t, color=color, linestyle=":", linewidth=0.8, gid="pass")
        text = f"pass {number}" if number == last + 1 else f"passes {last + 1}–{number}"
        last = number
        axes[0].annotate(text, xy=(t, 0.98), xycoords=("data", "axes fraction"), rotation=90,
                         va="top", ha="right", fontsize=7, color=color, gid="pass-label")


def mark_switchover(axes, log: RunLog, color: str) -> None:
    stop = switchover(log)
    if stop is None:
        return
    downtime = log.summary.get("downtime-ms")
    for ax in axes:
        ax.axvline(stop, color=color, linestyle="--", linewidth=1.2, gid="switchover")
        if downtime:
            ax.axvspan(stop, stop + downtime / 1000, color=color, alpha=0.3, gid="downtime")
    text = "switchover" if downtime is None else f"switchover, downtime {downtime} ms"
    axes[1].annotate(text, xy=(stop, 0.95), xycoords=("data", "axes fraction"), rotation=90, va="top",
                     ha="right", fontsize=8, color=color, gid="switchover-label")


def plot_runs(logs: list[RunLog], labels: list[str], path: str | Path):
    """Draw *logs* into one figure, save it to *path* and return it (closed) for inspection."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    for i, (log, label) in enumerate(zip(logs, labels)):
        color = f"C{i}"
        # Before the first pass (status setup) QEMU reports no RAM counters: zeros there would
        # draw a ramp from nothing to the first real value.
        counted = [s for s in log.samples if s.status not in ("none", "setup")]
        t = [s.t for s in counted]
        axes[0].plot(t, [s.remaining / MIB for s in counted], color=color, label=label)
        axes[1].plot(t, [s.mbps for s in counted], color=color, label=label)
        axes[2].plot(t, [s.dirty_rate / MIB for s in counted], color=color, label=label)
        mark_passes(axes, log, color)
        mark_switchover(axes, log, color)
    for ax, ylabel in zip(axes, ("remaining (MiB)", "throughput (Mbit/s)", "dirty rate (MiB/s)")):
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[2].set_xlabel("time since migrate (s)")
    if len(logs) > 1:
        axes[2].legend(loc="upper right")
    fig.suptitle("\n".join(describe(log, label) for log, label in zip(logs, labels)), fontsize=9, x=0.01, ha="left")
    fig.text(0.01, 0.005, "dotted: a pass starts (dirty-sync-count changes); dashed: switchover "
             "(source stops the guest); shaded: downtime", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def labels_for(paths: list[Path]) -> list[str]:
    """The logs' file names without suffix, or A, B when those are the same."""
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [chr(ord("A") + i) for i in range(len(paths))]


def run(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.logs]
    if len(paths) > 2:
        raise CLIError("give one JSON log, or two to compare")
    try:
        logs = [read_log(p) for p in paths]
    except (OSError, ValueError) as err:
        raise CLIError(str(err)) from None
    out = Path(args.out) if args.out else paths[0].with_name("-vs-".join(p.stem for p in paths) + ".png")
    plot_runs(logs, labels_for(paths), out)
    print(f"wrote {out}")
    return 0
