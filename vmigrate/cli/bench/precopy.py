"""``vmigrate bench precopy``: idle guest, unlimited bandwidth, vmigrate vs QEMU vs the Python ceiling."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from vmigrate.cli.bench.ceiling import loopback_ceiling
from vmigrate.cli.bench.images import RamImage, check_space, fill_ram_image
from vmigrate.cli.bench.profile import print_profile, profile_threads, summarize_profile
from vmigrate.cli.bench.report import describe, fmt, median_of, mib, ratio, report_failures, write_outputs
from vmigrate.cli.bench.runner import IMPLS, UNLIMITED_BANDWIDTH, RunSpec, migrate_once, warm_up
from vmigrate.cli.main import CLIError
from vmigrate.cli.migrate import human_bytes


def run_precopy(args, size: int, impls: list[str], params: dict, out: Path, logdir: Path, console) -> int:
    if args.repeat < 1:
        raise CLIError("--repeat must be at least 1")
    check_space(Path(args.shm_dir), 2 * size, f"a {human_bytes(size)} benchmark (source + destination RAM)")
    records: list[dict] = []
    profile: dict = {}
    workdir = Path(tempfile.mkdtemp(prefix="vmigrate-bench-", dir=args.shm_dir))
    try:
        console.print(f"filling {human_bytes(size)} of guest RAM ({args.zero_fraction:.0%} zero pages) "
                      f"in {workdir} ...")
        image = fill_ram_image(workdir / "src.ram", size, args.zero_fraction, args.seed)
        first = RunSpec(impls[0], "precopy", size, params=params, timeout=args.timeout, accel=args.accel)
        warm_up(first, image.path, workdir, logdir, console)
        for rep in range(args.repeat):
            # Alternate the order: what is left of the host's state favours neither.
            for impl in impls if rep % 2 == 0 else impls[::-1]:
                spec = RunSpec(impl, "precopy", size, params=params, timeout=args.timeout, accel=args.accel)
                rec = migrate_once(spec, image.path, workdir, logdir) | {"rep": rep}
                records.append(rec)
                console.print(f"  run {rep + 1}/{args.repeat} {impl}: {describe(rec)}")
            ceiling = loopback_ceiling(image.wire_bytes, timeout=args.timeout) | {"rep": rep}
            records.append(ceiling)
            console.print(f"  run {rep + 1}/{args.repeat} Python loopback ceiling: {ceiling['wall_s']:.3f} s "
                          f"for {human_bytes(ceiling['bytes'])}")
        if args.profile:
            profile = run_profile(image, size, params, args.timeout, workdir, logdir, out, console)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize_precopy(records, size) | ({"profile": profile} if profile else {})
    config = {"size": size, "zero_fraction": args.zero_fraction, "repeat": args.repeat, "impls": impls,
              "params": {"max-bandwidth": UNLIMITED_BANDWIDTH} | params, "seed": args.seed,
              "zero_pages": image.zero_pages, "shm_dir": args.shm_dir}
    write_outputs(out, "precopy", config, records, summary)
    plot_precopy(records, summary, size, out / "precopy.png")
    print_precopy(summary, size, console)
    console.print(f"written: {out / 'precopy.json'}, {out / 'precopy.csv'}, {out / 'precopy.png'}")
    return report_failures(records)


def run_profile(image: RamImage, size: int, params: dict, timeout: float, workdir: Path, logdir: Path,
                out: Path, console) -> dict:
    """One extra vmigrate run under py-spy; the hot spots of the migration threads."""
    prof_dir = out / "profile"
    prof_dir.mkdir(exist_ok=True)
    console.print("  profiling one more vmigrate run with py-spy (not timed) ...")
    rec = migrate_once(RunSpec("vmigrate", "precopy", size, params=params, timeout=timeout),
                       image.path, workdir, logdir, profile_dir=prof_dir)
    result: dict = {"status": rec["status"], "total_time_ms": rec.get("total_time_ms")}
    for role in ("src", "dst"):
        path = prof_dir / f"{role}.txt"
        if not path.exists() or not path.stat().st_size:
            result[role] = "py-spy wrote nothing (ptrace not permitted?)"
            continue
        result[role] = [summarize_profile(path, label) for label in profile_threads(path)]
    (prof_dir / "summary.json").write_text(json.dumps(result, indent=1))
    print_profile(result, console)
    return result


def summarize_precopy(records: list[dict], size: int) -> dict:
    """Medians over good runs per implementation, peaks over all runs, and the vmigrate/QEMU ratios."""
    out: dict = {}
    for impl in (*IMPLS, "ceiling"):
        runs = [r for r in records if r["impl"] == impl]
        if not runs:
            continue
        good = [r for r in runs if r["status"] == "completed" and r.get("verified") is not False]
        entry = {"runs": len(runs), "good": len(good),
                 "verified": all(r.get("verified") for r in runs) if impl != "ceiling" else None,
                 "wall_s": median_of(good, "wall_s")}
        if impl != "ceiling":
            for key in ("total_time_ms", "setup_time_ms", "downtime_ms", "transferred_bytes", "guest_mib_s"):
                entry[key] = median_of(good, key)
            for role in ("src", "dst"):
                for part in ("rss", "anon", "file", "shmem"):
                    key = f"{role}_peak_{part}"
                    entry[key] = max((r.get(key) or 0 for r in runs), default=0)
                entry[f"{role}_peak_rss_vs_guest"] = round(entry[f"{role}_peak_rss"] / size, 4)
        else:
            entry["mib_s"] = median_of(good, "mib_s")
            entry["bytes"] = runs[0]["bytes"]
        out[impl] = entry
    v, q, c = out.get("vmigrate", {}), out.get("qemu", {}), out.get("ceiling", {})
    out["ratios"] = {
        "total_time_vmigrate_over_qemu": ratio(v.get("total_time_ms"), q.get("total_time_ms")),
        "wall_vmigrate_over_qemu": ratio(v.get("wall_s"), q.get("wall_s")),
        "wall_vmigrate_over_ceiling": ratio(v.get("wall_s"), c.get("wall_s")),
        "src_peak_rss_vmigrate_over_qemu": ratio(v.get("src_peak_rss"), q.get("src_peak_rss")),
        "dst_peak_rss_vmigrate_over_qemu": ratio(v.get("dst_peak_rss"), q.get("dst_peak_rss")),
    }
    return out


def print_precopy(summary: dict, size: int, console) -> None:
    from rich.table import Table

    t = Table(title=f"precopy, {human_bytes(size)} guest RAM, tcp loopback, unlimited bandwidth")
    for col in ("", "runs ok", "RAM equal", "total-time ms", "wall s", "setup ms", "downtime ms",
                "guest MiB/s", "wire MiB"):
        t.add_column(col, justify="right" if col else "left")
    names = {"vmigrate": "vmigrate", "qemu": "QEMU 7.2", "ceiling": "ceiling (Python loopback)"}
    for impl, label in names.items():
        e = summary.get(impl)
        if e is None:
            continue
        if impl == "ceiling":
            t.add_row(label, f"{e['good']}/{e['runs']}", "", "", fmt(e["wall_s"], digits=3), "", "",
                      fmt(e["mib_s"]), mib(e["bytes"]))
            continue
        equal = {True: "[green]yes[/]", False: "[red]NO[/]"}.get(e["verified"], "-")
        t.add_row(label, f"{e['good']}/{e['runs']}", equal, fmt(e["total_time_ms"]), fmt(e["wall_s"], digits=3),
                  fmt(e["setup_time_ms"]), fmt(e["downtime_ms"]), fmt(e["guest_mib_s"]), mib(e["transferred_bytes"]))
    r = summary["ratios"]
    t.add_row("[bold]vmigrate / QEMU[/]", "", "", fmt(r["total_time_vmigrate_over_qemu"], digits=3),
              fmt(r["wall_vmigrate_over_qemu"], digits=3), "", "", "", "")
    t.add_row("[bold]vmigrate / ceiling[/]", "", "", "", fmt(r["wall_vmigrate_over_ceiling"], digits=3),
              "", "", "", "")
    console.print(t)
    m = Table(title="peak memory of each process (MiB; guest RAM is the shared file, counted as shmem)")
    for col in ("process", "peak RSS (VmHWM)", "% of guest RAM", "anon", "file", "shmem"):
        m.add_column(col, justify="right" if col != "process" else "left")
    for impl in IMPLS:
        e = summary.get(impl)
        if e is None:
            continue
        for role, label in (("src", "source"), ("dst", "destination")):
            m.add_row(f"{impl} {label}", mib(e[f"{role}_peak_rss"]), fmt(100 * e[f"{role}_peak_rss_vs_guest"], "%", 1),
                      mib(e[f"{role}_peak_anon"]), mib(e[f"{role}_peak_file"]), mib(e[f"{role}_peak_shmem"]))
    console.print(m)


def plot_precopy(records: list[dict], summary: dict, size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m, ax_p) = plt.subplots(1, 3, figsize=(16, 5))
    labels, walls, totals = [], [], []
    for impl in (*IMPLS, "ceiling"):
        e = summary.get(impl)
        if e is None:
            continue
        labels.append(impl)
        walls.append(e.get("wall_s") or 0)
        totals.append((e.get("total_time_ms") or 0) / 1000)
    x = np.arange(len(labels))
    ax_t.bar(x - 0.2, totals, 0.4, label="query-migrate total-time")
    ax_t.bar(x + 0.2, walls, 0.4, label="wall (migrate → destination completed)")
    ax_t.set_xticks(x, labels)
    ax_t.set_ylabel("seconds")
    ax_t.set_title(f"time to migrate {human_bytes(size)}")
    ax_t.legend(fontsize=8)
    names, parts = [], {k: [] for k in ("anon", "file", "shmem")}
    for impl in IMPLS:
        e = summary.get(impl)
        if e is None:
            continue
        for role in ("src", "dst"):
            names.append(f"{impl}\n{role}")
            for k in parts:
                parts[k].append(e[f"{role}_peak_{k}"] / (1 << 20))
    bottom = np.zeros(len(names))
    for k, values in parts.items():
        ax_m.bar(names, values, bottom=bottom, label=f"peak {k}")
        bottom += np.array(values)
    ax_m.axhline(size / (1 << 20), color="k", ls="--", lw=1, label="guest RAM")
    ax_m.axhline(size * 1.05 / (1 << 20), color="r", ls=":", lw=1, label="guest RAM + 5 %")
    ax_m.set_ylabel("MiB")
    ax_m.set_title("peak RSS components (sampled)")
    ax_m.legend(fontsize=8)
    for impl in IMPLS:
        run_ = next((r for r in records if r["impl"] == impl and r.get("samples")), None)
        if run_ is not None:
            ax_p.plot([s["t"] for s in run_["samples"]], [s["transferred"] / (1 << 20) for s in run_["samples"]],
                      marker=".", label=impl)
    ax_p.set_xlabel("seconds since migrate")
    ax_p.set_ylabel("transferred (MiB)")
    ax_p.set_title("progress (first run)")
    ax_p.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
