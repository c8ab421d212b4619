#!/usr/bin/env bash
# The main job on a fresh machine: install vmigrate, then migrate a running
# guest live between two VM processes with a progress view and a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e . 2>&1 | grep -v "Running pip as the 'root' user" || true
exec python3 -m vmigrate demo "$@"
