#!/bin/sh
# Where vmigrate's precopy time goes: one timed run per implementation, then one vmigrate run
# sampled with py-spy (.venv/bin/pip install py-spy). SIZE defaults to 1G; ZERO to 0 (random RAM).
set -eu
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
python=${PYTHON:-.venv/bin/python}
PATH=$(dirname "$python"):$PATH   # vmigrate bench looks for py-spy on PATH
size=${SIZE:-1G}
zero=${ZERO:-0}
"$python" -m vmigrate bench precopy --size "$size" --zero-fraction "$zero" --profile --out "$out/profile-$size-zero$zero" "$@"
