#!/bin/sh
# The guestperf-style grid: every scenario x {vmigrate, QEMU 7.2} x guest dirty rate.
# SIZE defaults to 1G (needs ~3.1 GiB free on /dev/shm); pass more options after the script name.
set -eu
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
python=${PYTHON:-.venv/bin/python}
size=${SIZE:-1G}
"$python" -m vmigrate bench matrix --size "$size" --dirty-rates 0,64,256 --wss 256M --out "$out/matrix-$size" "$@"
