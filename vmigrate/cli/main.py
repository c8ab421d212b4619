"""The ``vmigrate`` command: one subcommand per module of this package."""

from __future__ import annotations

import argparse
import importlib
import sys

from vmigrate.trace import setup_logging

SUBCOMMANDS = ("run", "migrate", "plot", "analyze", "demo", "bench")


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit status 1, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmigrate", description="QEMU 7.2 live migration, re-implemented in Python")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"vmigrate.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"vmigrate.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Library warnings reach stderr in QEMU's shape for every subcommand; ``run`` refines it (-v, --trace).
    setup_logging()
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"vmigrate {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
