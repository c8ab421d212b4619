"""What the pairwise benchmark scripts in benchmarks/ share: their options and scratch space."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from vmigrate.cli.bench.images import check_space
from vmigrate.machine.memory import parse_size


def script_parser(doc: str, out: Path) -> argparse.ArgumentParser:
    """``--size --repeat --seed --timeout --shm-dir --out`` (results under *out* by default)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--shm-dir", default="/dev/shm")
    parser.add_argument("--out", type=Path, default=out)
    return parser


def prepare(args: argparse.Namespace, name: str) -> tuple[int, Path, Path]:
    """Logging on, room for a source and a destination RAM checked: (size, log dir, scratch dir)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    size = parse_size(args.size)
    check_space(Path(args.shm_dir), 2 * size, f"the {name} benchmark (source + destination RAM)")
    args.out.mkdir(parents=True, exist_ok=True)
    logdir = args.out / "logs"
    logdir.mkdir(exist_ok=True)
    return size, logdir, Path(tempfile.mkdtemp(prefix=f"vmigrate-bench-{name}-", dir=args.shm_dir))
