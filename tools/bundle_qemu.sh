#!/bin/sh
# Pack what `vmigrate bench scaling` needs on a machine with no network and no QEMU:
# this host's qemu-system-x86_64 (7.2), the shared libraries ldd lists minus the libc family
# (the target's own glibc, which is newer, loads them), the TCG accelerator module QEMU
# loads at run time, a wrapper that points QEMU at them, and the zstandard wheel for the
# target's Python.  benchmarks/scaling_device.sh unpacks and uses it (benchmarks/README.md).
#
#   tools/bundle_qemu.sh [DIR]     # default device-bundle/ (git-ignored), DIR/qemu.tar.xz and DIR/wheels/
#
# PYVER (default 3.12, the device's Python) picks the wheel; the device has numpy, rich and
# matplotlib already.
set -eu
DIR=${1:-device-bundle}
PYVER=${PYVER:-3.12}
QEMU_BIN=$(command -v qemu-system-x86_64)
MODULE_DIR=${QEMU_MODULE_DIR:-/usr/lib/x86_64-linux-gnu/qemu}

"$QEMU_BIN" --version | grep -q "version 7\.2\." || { echo "$QEMU_BIN is not QEMU 7.2" >&2; exit 1; }
rm -rf "$DIR/stage" "$DIR/wheels"
mkdir -p "$DIR/stage/qemu/bin" "$DIR/stage/qemu/lib" "$DIR/stage/qemu/modules" "$DIR/wheels"
cp "$QEMU_BIN" "$DIR/stage/qemu/bin/qemu-system-x86_64.real"
cp "$MODULE_DIR/accel-tcg-x86_64.so" "$DIR/stage/qemu/modules/"
# The libc family stays behind: mixing this host's libc with the target's loader breaks both.
ldd "$QEMU_BIN" "$MODULE_DIR/accel-tcg-x86_64.so" | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u \
    | grep -Ev '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*)\.so' \
    | while read -r lib; do cp -L "$lib" "$DIR/stage/qemu/lib/"; done
cat > "$DIR/stage/qemu/bin/qemu-system-x86_64" <<'EOF'
#!/bin/sh
# QEMU 7.2 from the bundle: its own libraries and modules, then the system's libc.
here=$(dirname "$(readlink -f "$0")")
export LD_LIBRARY_PATH="$here/../lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export QEMU_MODULE_DIR="$here/../modules"
exec "$here/qemu-system-x86_64.real" "$@"
EOF
chmod +x "$DIR/stage/qemu/bin/qemu-system-x86_64"
tar -C "$DIR/stage" -cJf "$DIR/qemu.tar.xz" qemu
rm -rf "$DIR/stage"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR/wheels" "zstandard>=0.21"
du -sh "$DIR/qemu.tar.xz" "$DIR/wheels"/*
