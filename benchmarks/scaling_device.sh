#!/bin/sh
# `vmigrate bench scaling` on a many-core machine with no network and no QEMU installed, in about
# 8.5 minutes: QEMU 7.2 and the zstandard wheel come from tools/bundle_qemu.sh's bundle, carried
# with the working tree (benchmarks/README.md, docs/benchmarks.md "Multifd scaling").
#
# Stages, most important first, each bounded by what is left of BUDGET seconds:
#   main   SIZE (4G): multifd none and zstd at CHANNELS (1,2,4,8,16), vmigrate and QEMU
#   threads  main's cells for vmigrate alone with VMIGRATE_WORKERS=0: channel threads, where main
#          had channel workers (processes) from 2 channels on (vmigrate/migration/multifd_worker.py)
#   big    BIG (32G): multifd none at 8 channels, peak RSS of both against guest RAM + 5 %
#   zlib   ZSIZE (2G): multifd zlib at ZCHANNELS (2,4,8,16) and compress-threads 8,16 (their zlib
#          work in worker processes, vmigrate/migration/compress_worker.py)
# Each stage's scaling.json (and main's table and plot) lands in $OUT (default bench-results/device),
# with the whole console output in $OUT/console.log.  SIZE=256M BIG=512M ZSIZE=256M CHANNELS=1,2
# ZCHANNELS=2 THREADS=2 makes a quick rehearsal on a small host.
set -u
OUT=${OUT:-bench-results/device}
BUNDLE=${BUNDLE:-device-bundle}
BUDGET=${BUDGET:-500}
SIZE=${SIZE:-4G}
BIG=${BIG:-32G}
ZSIZE=${ZSIZE:-2G}
CHANNELS=${CHANNELS:-1,2,4,8,16}
ZCHANNELS=${ZCHANNELS:-2,4,8,16}
THREADS=${THREADS:-8,16}
start=$(date +%s)
mkdir -p "$OUT"
exec > "$OUT/console.log" 2>&1
export PYTHONUNBUFFERED=1

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -C "$tmp" -xJf "$BUNDLE/qemu.tar.xz" || exit 1
export PATH="$tmp/qemu/bin:$PATH"
if ! python3 -c "import zstandard" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$tmp/site" "$BUNDLE"/wheels/*.whl || exit 1
    export PYTHONPATH="$tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nproc; free -g; df -h /dev/shm; python3 --version
python3 - "$tmp" <<'EOF' || exit 1
import sys
from pathlib import Path
from vmigrate.harness.launcher import QEMU, VMProcess, qemu_argv
sock = Path(sys.argv[1]) / "check.qmp"
vm = VMProcess(qemu_argv(sock), sock, Path(sys.argv[1]) / "check.log", start_timeout=30.0)
print(QEMU, vm.qmp.execute("query-version"))
vm.close()
EOF

# Source and destination RAM of the big guest live in tmpfs: make room where /dev/shm is smaller
# (half of RAM by default, 64 MiB in some containers); else a tmpfs of our own, else /tmp.
need_kib=$(python3 -c "from vmigrate.machine.memory import parse_size; print(2 * parse_size('$BIG') // 1024 + (1 << 20))")
avail() { df -k --output=avail "$1" 2>/dev/null | tail -1; }
shm=/dev/shm
if [ "$(avail /dev/shm)" -lt "$need_kib" ]; then
    mount -o remount,size=$((need_kib + (4 << 20)))k /dev/shm 2>/dev/null
fi
if [ "$(avail /dev/shm)" -lt "$need_kib" ]; then
    mkdir -p /tmp/vmigrate-ram
    if mount -t tmpfs -o size=$((need_kib + (4 << 20)))k tmpfs /tmp/vmigrate-ram 2>/dev/null; then
        shm=/tmp/vmigrate-ram
    elif [ "$(avail /tmp)" -gt "$(avail /dev/shm)" ]; then
        shm=/tmp/vmigrate-ram
    fi
fi
df -h "$shm"

stage() {
    name=$1; shift
    left=$((BUDGET - ($(date +%s) - start)))
    if [ "$left" -lt 30 ]; then
        echo "== $name skipped: ${left}s of the budget left"
        return
    fi
    echo "== $name (${left}s left): $*"
    timeout "$left" python3 -m vmigrate bench scaling --shm-dir "$shm" --out "$tmp/$name" "$@"
    echo "== $name exit $?"
    cp "$tmp/$name/scaling.json" "$OUT/$name.json" 2>/dev/null
}

stage main --size "$SIZE" --channels "$CHANNELS" --compression none,zstd --compress-threads ""
cp "$tmp/main/scaling.md" "$OUT/main.md" 2>/dev/null
cp "$tmp/main/scaling.png" "$OUT/main.png" 2>/dev/null
export VMIGRATE_WORKERS=0
stage threads --impl vmigrate --size "$SIZE" --channels "$CHANNELS" --compression none,zstd --compress-threads ""
unset VMIGRATE_WORKERS
cp "$tmp/threads/scaling.md" "$OUT/threads.md" 2>/dev/null
stage big --size "$BIG" --channels 8 --compression none --compress-threads "" --timeout 200
stage zlib --size "$ZSIZE" --channels "$ZCHANNELS" --compression zlib --compress-threads "$THREADS"
echo "== done in $(($(date +%s) - start))s"
