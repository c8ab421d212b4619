#!/usr/bin/env bash
# Run the whole test suite on a fresh Debian 12 machine: installs QEMU 7.2 from
# Debian (the interop and conformance tests always run against it), gcc, and
# the Python packages, then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# gcc and binutils build the x86 guest programs of the KVM vCPUs.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1 || ! command -v gcc >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq qemu-system-x86 qemu-utils gcc binutils >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test,plot]' 2>&1 | grep -v "Running pip as the 'root' user" || true
exec python3 -m pytest -q -p no:cacheprovider "$@"
