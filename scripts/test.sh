#!/usr/bin/env bash
# Run the whole test suite on a fresh Debian 12 machine: installs QEMU 7.2 from Debian (the
# interop and conformance tests always run against it), gcc, and the Python packages into the
# project's virtual environment (.venv/, see venv.sh), then runs pytest. Extra arguments go
# to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
# gcc and binutils build the x86 guest programs of the KVM vCPUs.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1 || ! command -v gcc >/dev/null 2>&1; then
    apt_install qemu-system-x86 qemu-utils gcc binutils
fi
venv_install '.[test,plot]'
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
