"""``vmigrate bench matrix``: scenario x implementation x guest dirty rate, like QEMU's guestperf."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from vmigrate.cli.bench.images import check_space, fill_ram_image
from vmigrate.cli.bench.report import describe, fmt, mib, ratio, report_failures, write_outputs
from vmigrate.cli.bench.runner import UNLIMITED_BANDWIDTH, RunSpec, migrate_once, warm_up
from vmigrate.cli.main import CLIError
from vmigrate.cli.migrate import human_bytes
from vmigrate.machine.memory import parse_size


#: capabilities and parameters of each guestperf-style scenario.
SCENARIOS: dict[str, tuple[tuple[str, ...], dict]] = {
    "precopy": ((), {}),
    "xbzrle": (("xbzrle",), {}),
    "compress": (("compress",), {}),
    "multifd-none": (("multifd",), {"multifd-compression": "none"}),
    "multifd-zlib": (("multifd",), {"multifd-compression": "zlib"}),
    "multifd-zstd": (("multifd",), {"multifd-compression": "zstd"}),
    "auto-converge": (("auto-converge",), {}),
}
NO_VCPU = "QEMU -M none has no vCPU, so nothing can dirty its RAM"


def run_matrix(args, size: int, impls: list[str], params: dict, out: Path, logdir: Path, console) -> int:
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or not scenarios:
        raise CLIError(f"unknown scenario '{','.join(unknown)}' (choose from {','.join(SCENARIOS)})")
    try:
        rates = [int(r) for r in args.dirty_rates.split(",") if r.strip()]
        wss = parse_size(args.wss)
    except ValueError:
        raise CLIError(f"invalid --dirty-rates '{args.dirty_rates}' or --wss '{args.wss}'") from None
    if not rates or min(rates) < 0:
        raise CLIError("--dirty-rates must be non-negative integers (MiB/s)")
    dirtying = "vmigrate" in impls and any(rates)
    check_space(Path(args.shm_dir), (3 if dirtying else 2) * size,
                f"a {human_bytes(size)} matrix (pristine, {'dirtied source, ' if dirtying else ''}destination RAM)")
    records: list[dict] = []
    workdir = Path(tempfile.mkdtemp(prefix="vmigrate-bench-", dir=args.shm_dir))
    try:
        console.print(f"filling {human_bytes(size)} of guest RAM ({args.zero_fraction:.0%} zero pages) ...")
        image = fill_ram_image(workdir / "pristine.ram", size, args.zero_fraction, args.seed)
        first = RunSpec(impls[0], "precopy", size, params=params, timeout=args.timeout, accel=args.accel)
        warm_up(first, image.path, workdir, logdir, console)
        for index, scenario in enumerate(scenarios):
            caps, scenario_params = SCENARIOS[scenario]
            for rate in rates:
                # Alternate which implementation meets the host's colder memory first (docs/benchmarks.md).
                for impl in impls if index % 2 == 0 else impls[::-1]:
                    spec = RunSpec(impl, scenario, size, caps, scenario_params | params, rate, wss, args.timeout,
                                   args.accel)
                    if impl == "qemu" and rate:
                        rec = spec.record(status="n/a", note=NO_VCPU)
                    else:
                        src_ram = image.path
                        if rate:
                            src_ram = workdir / "src.ram"
                            shutil.copyfile(image.path, src_ram)
                        rec = migrate_once(spec, src_ram, workdir, logdir)
                        if src_ram != image.path:
                            src_ram.unlink(missing_ok=True)
                    records.append(rec)
                    console.print(f"  {scenario:14} {impl:8} {rate:4} MiB/s: {describe(rec)}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    config = {"size": size, "zero_fraction": args.zero_fraction, "scenarios": scenarios, "impls": impls,
              "dirty_rates_mib_s": rates, "wss": wss, "params": {"max-bandwidth": UNLIMITED_BANDWIDTH} | params,
              "seed": args.seed, "qemu_dirty_rate_note": NO_VCPU}
    summary = summarize_matrix(records)
    write_outputs(out, "matrix", config, records, {"cells": summary})
    plot_matrix(records, out / "matrix.png")
    print_matrix(records, console)
    console.print(f"written: {out / 'matrix.json'}, {out / 'matrix.csv'}, {out / 'matrix.png'}")
    return report_failures(records)


def print_matrix(records: list[dict], console) -> None:
    from rich.table import Table

    t = Table(title="scenario matrix (times in ms)")
    for col in ("scenario", "dirty MiB/s", "impl", "status", "RAM equal", "total-time", "downtime", "wall s",
                "passes", "wire MiB", "note"):
        t.add_column(col, overflow="fold")
    for r in records:
        equal = {True: "[green]yes[/]", False: "[red]NO[/]"}.get(r.get("verified"), "-")
        t.add_row(r["scenario"], str(r["dirty_rate_mib_s"]), r["impl"], r["status"], equal,
                  fmt(r.get("total_time_ms")), fmt(r.get("downtime_ms")), fmt(r.get("wall_s"), digits=3),
                  fmt(r.get("passes")), mib(r.get("transferred_bytes")), (r.get("note") or "")[:60])
    console.print(t)


def summarize_matrix(records: list[dict]) -> list[dict]:
    """vmigrate/QEMU ratios per (scenario, dirty rate) where both completed."""
    rows = []
    for scenario in dict.fromkeys(r["scenario"] for r in records):
        for rate in dict.fromkeys(r["dirty_rate_mib_s"] for r in records if r["scenario"] == scenario):
            cell = {r["impl"]: r for r in records if r["scenario"] == scenario and r["dirty_rate_mib_s"] == rate}
            v, q = cell.get("vmigrate", {}), cell.get("qemu", {})
            rows.append({"scenario": scenario, "dirty_rate_mib_s": rate,
                         "vmigrate": v.get("status"), "qemu": q.get("status"),
                         "total_time_ratio": ratio(v.get("total_time_ms"), q.get("total_time_ms")),
                         "downtime_ratio": ratio(v.get("downtime_ms"), q.get("downtime_ms"))})
    return rows


def plot_matrix(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in records))
    impls = list(dict.fromkeys(r["impl"] for r in records))
    rates = list(dict.fromkeys(r["dirty_rate_mib_s"] for r in records))
    fig, axes = plt.subplots(2, len(scenarios), figsize=(2.8 * len(scenarios) + 1, 6.5), squeeze=False)
    width = 0.8 / max(1, len(impls))
    short = {"not implemented": "n/i", "n/a": "n/a"}
    for col, scenario in enumerate(scenarios):
        for row, (key, label) in enumerate((("total_time_ms", "total time (s)"), ("downtime_ms", "downtime (ms)"))):
            ax = axes[row][col]
            for i, impl in enumerate(impls):
                for j, rate in enumerate(rates):
                    r = next((r for r in records if (r["scenario"], r["impl"], r["dirty_rate_mib_s"])
                              == (scenario, impl, rate)), None)
                    if r is None:
                        continue
                    xpos = j + (i - (len(impls) - 1) / 2) * width
                    value = r.get(key)
                    if r["status"] == "completed" and value is not None:
                        value = value / 1000 if key == "total_time_ms" else value
                        ax.bar(xpos, value, width, color=f"C{i}", label=impl if j == 0 else None)
                    else:
                        ax.text(xpos, 0.02, short.get(r["status"], r["status"] or "?"), rotation=90, ha="center",
                                va="bottom", fontsize=8, color=f"C{i}", transform=ax.get_xaxis_transform())
            ax.set_xticks(range(len(rates)), [str(r) for r in rates])
            ax.set_xlim(-0.5, len(rates) - 0.5)
            ax.set_ylim(bottom=0)
            if row == 0:
                ax.set_title(scenario)
            else:
                ax.set_xlabel("guest dirty rate (MiB/s)")
            if col == 0:
                ax.set_ylabel(label)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.suptitle("n/i: not implemented by vmigrate yet; n/a: QEMU -M none cannot dirty RAM", fontsize=9)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="upper left", ncol=len(handles), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path)
    plt.close(fig)
