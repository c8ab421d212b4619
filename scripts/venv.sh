# Sourced by demo.sh and test.sh (from the repository root): the project's virtual environment.
#
# Debian 12's python3 is externally managed (PEP 668: /usr/lib/python3.11/EXTERNALLY-MANAGED),
# so pip refuses to install system-wide; vmigrate goes into .venv/ instead. Debian splits
# `python3 -m venv` into the python3-venv package, which a stock install lacks: it is
# installed with apt-get when missing, like the QEMU packages the tests need.
# Quiet on success; on failure the failing tool's output is shown.

VENV=.venv

# Run "$@" with its output kept aside; show it and stop if it fails.
quietly() {
    local log status=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        cat "$log" >&2
        rm -f "$log"
        echo "${0##*/}: failed ($status): $*" >&2
        exit "$status"
    fi
    rm -f "$log"
}

# apt-get install the Debian packages "$@" (needs root, as in CI).
apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "${0##*/}: needs the Debian packages $*: run as root, or apt-get install them first" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    quietly apt-get update -qq
    quietly apt-get install -y -qq "$@"
}

# Create .venv/ unless it works already, then install the project into it in editable mode
# with the pip requirement "$1" (e.g. '.[test]'). Skipped when the same requirement was
# installed from the same pyproject.toml before: the code itself is linked, not copied.
venv_install() {
    local stamp="$VENV/.installed" want
    want="$1 $(cksum <pyproject.toml)"
    if ! "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then
        command -v python3 >/dev/null 2>&1 || apt_install python3
        # Debian's ensurepip ships in python3-venv; without it `venv` leaves a .venv without pip.
        python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_install python3-venv
        rm -rf "$VENV"
        quietly python3 -m venv "$VENV"
    fi
    grep -qxF "$want" "$stamp" 2>/dev/null && return 0
    quietly "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$1"
    echo "$want" >>"$stamp"
}
