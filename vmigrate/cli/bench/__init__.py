"""``vmigrate bench``: vmigrate and QEMU 7.2 migrating the same memory, side by side.

Both implementations get byte-identical guest RAM (a file on ``/dev/shm``),
the same QMP commands through :class:`~vmigrate.harness.migrate.MigrationRun`,
tcp loopback and a bandwidth limit that never binds, so the only variable
is the implementation.  Every run ends with a hash of the destination's RAM
against the source's: a fast but wrong migration is reported as wrong, not
as fast.  The host is shared and small, so what these numbers support is
*ratios* measured in the same invocation, not absolute speeds.

``precopy`` is the headline comparison (plus the ceiling: how fast two
Python processes can move the same bytes over loopback at all);
``matrix`` runs the scenario × implementation × dirty-rate grid of QEMU's
guestperf, recording scenarios vmigrate does not implement and dirty rates
QEMU cannot produce (``-M none`` has no vCPU) as rows of their own.

The package splits by concern: :mod:`.images` (guest RAM files),
:mod:`.runner` (one migration, measured), :mod:`.memwatch` (peak RSS),
:mod:`.ceiling`, :mod:`.profile` (py-spy), :mod:`.report` (files and
verdict), and one module per kind, :mod:`.precopy`, :mod:`.matrix` and
:mod:`.scaling` (throughput against multifd channels and compress threads).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from vmigrate.cli.bench.matrix import SCENARIOS, run_matrix
from vmigrate.cli.bench.precopy import run_precopy
from vmigrate.cli.bench.runner import IMPLS
from vmigrate.cli.bench.scaling import run_scaling
from vmigrate.cli.main import CLIError
from vmigrate.cli.migrate import parse_params
from vmigrate.harness.launcher import QEMU
from vmigrate.machine.memory import parse_size


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark vmigrate against QEMU 7.2 (precopy, scenario matrix, multifd scaling)")
    kinds = p.add_subparsers(dest="bench_kind", required=True, metavar="KIND")

    def common(q: argparse.ArgumentParser, size: str, out: str) -> None:
        q.add_argument("--size", default=size, help=f"guest RAM, a multiple of 1 MiB (default {size}); "
                       "scaling takes several, comma-separated")
        q.add_argument("--zero-fraction", type=float, default=0.0,
                       help="share of zero pages in guest RAM, the rest random (default 0)")
        q.add_argument("--impl", default=",".join(IMPLS), help="implementations to run (default vmigrate,qemu)")
        q.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="extra migration parameter for both implementations")
        q.add_argument("--out", default=out, help=f"directory for JSON, CSV, plot and logs (default {out})")
        q.add_argument("--shm-dir", default="/dev/shm", help="where RAM files live (default /dev/shm)")
        q.add_argument("--timeout", type=float, default=300.0, help="cancel a migration after this many seconds")
        q.add_argument("--seed", type=int, default=1, help="seed of the guest RAM contents")
        q.add_argument("--accel", choices=("soft", "kvm"), default="soft",
                       help="vmigrate's vCPU backend (default soft: the -M none machine QEMU runs here)")

    pre = kinds.add_parser("precopy", help="idle guest, unlimited bandwidth: vmigrate vs QEMU vs Python ceiling")
    common(pre, "4G", "bench-results/precopy")
    pre.add_argument("--repeat", type=int, default=1, help="runs per implementation (medians are reported)")
    pre.add_argument("--profile", action="store_true",
                     help="after the timed runs, one more vmigrate run sampled with py-spy (not timed)")
    mat = kinds.add_parser("matrix", help="scenario x implementation x guest dirty rate, like QEMU's guestperf")
    common(mat, "1G", "bench-results/matrix")
    mat.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"subset of {','.join(SCENARIOS)}")
    mat.add_argument("--dirty-rates", default="0,64,256", help="guest dirty rates in MiB/s (default 0,64,256)")
    mat.add_argument("--wss", default="256M", help="working set the dirtying guest cycles through (default 256M)")
    sca = kinds.add_parser("scaling", help="throughput vs multifd channels and compress threads, next to QEMU 7.2")
    common(sca, "1G", "bench-results/scaling")
    sca.add_argument("--channels", default="1,2,4,8,16", help="multifd channel counts (default 1,2,4,8,16)")
    sca.add_argument("--compression", default="none,zlib,zstd",
                     help="multifd compressions (default none,zlib,zstd; empty for none of them)")
    sca.add_argument("--compress-threads", default="8,16",
                     help="compress-threads counts of the legacy compress capability (default 8,16; empty: skip)")
    sca.add_argument("--repeat", type=int, default=1, help="runs per cell and implementation (medians are reported)")
    p.set_defaults(func=run)


def parse_common(args: argparse.Namespace) -> tuple[list[int], list[str], dict]:
    try:
        sizes = [parse_size(s) for s in args.size.split(",") if s.strip()]
    except ValueError as err:
        raise CLIError(str(err)) from None
    if not sizes or any(size <= 0 or size % (1 << 20) for size in sizes):
        raise CLIError(f"--size must be a positive multiple of 1 MiB, not {args.size}")
    if len(sizes) > 1 and args.bench_kind != "scaling":
        raise CLIError(f"bench {args.bench_kind} takes one --size")
    if not 0.0 <= args.zero_fraction <= 1.0:
        raise CLIError("--zero-fraction must be between 0 and 1")
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    unknown = set(impls) - set(IMPLS)
    if unknown or not impls:
        raise CLIError(f"--impl takes a subset of {','.join(IMPLS)}, not '{args.impl}'")
    if "qemu" in impls and shutil.which(QEMU) is None:
        raise CLIError(f"{QEMU} is not installed (or use --impl vmigrate)")
    if not Path(args.shm_dir).is_dir():
        raise CLIError(f"--shm-dir {args.shm_dir} is not a directory")
    return sizes, impls, parse_params(args.param)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    sizes, impls, params = parse_common(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logdir = out / "logs"
    logdir.mkdir(exist_ok=True)
    if args.bench_kind == "scaling":
        return run_scaling(args, sizes, impls, params, out, logdir, console)
    if args.bench_kind == "precopy":
        return run_precopy(args, sizes[0], impls, params, out, logdir, console)
    return run_matrix(args, sizes[0], impls, params, out, logdir, console)
