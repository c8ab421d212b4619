#!/bin/sh
# The headline comparison: 4 GiB of random RAM, then 4 GiB with 90 % zero pages,
# vmigrate -> vmigrate against QEMU 7.2 -> QEMU 7.2 (two runs each, in alternating order:
# see "Fresh host memory" in docs/benchmarks.md).
# Needs ~8.1 GiB free on /dev/shm and as much available RAM. Results go to benchmarks/results/.
set -eu
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
python=${PYTHON:-.venv/bin/python}
"$python" -m vmigrate bench precopy --size 4G --repeat 2 --out "$out/precopy-4g-random" "$@"
"$python" -m vmigrate bench precopy --size 4G --zero-fraction 0.9 --repeat 2 --out "$out/precopy-4g-zero90" "$@"
