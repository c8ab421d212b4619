#!/usr/bin/env bash
# The main job on a fresh machine: install vmigrate into the project's virtual environment
# (.venv/, see venv.sh), then migrate a running guest live between two VM processes with a
# progress view and a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
venv_install .
exec "$VENV/bin/python" -m vmigrate demo "$@"
