#!/usr/bin/env bash
# Set up a checkout for development, tests and the demo; safe to run again and again.
#
#   bash scripts/bootstrap.sh            # .venv with the package (editable) and its dev extra
#   bash scripts/bootstrap.sh --servers  # ... and redis-server + rabbitmq-server (Debian, as root)
#
# The test suite starts its own servers on free loopback ports (tests/servers.py); the Debian
# packages only provide the binaries, so any system service they start is stopped again.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
WANT_SERVERS=0

for arg in "$@"; do
    case "$arg" in
        --servers) WANT_SERVERS=1 ;;
        -h | --help) sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bootstrap: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

say() { echo "bootstrap: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# Run a command with its output in a log; on failure show the tail of that log and stop.
quietly() {
    local what="$1"; shift
    local log
    log="$(mktemp -t bootstrap.XXXXXX.log)"
    if ! "$@" >"$log" 2>&1 </dev/null; then
        say "ERROR: $what failed: $*"
        tail -n 40 "$log" | sed 's/^/    /' >&2
        say "full log: $log"
        exit 1
    fi
    rm -f "$log"
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@" || die "needs root for: $* (run as root, or install the packages yourself)"
    else
        die "needs root for: $* (run as root, or install the packages yourself)"
    fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install these yourself: $*"
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        quietly "apt-get update" as_root apt-get update -qq
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    quietly "apt-get install $*" as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq -o Dpkg::Options::=--force-confdef "$@"
}

# Keep package installs from starting system services (the standard policy-rc.d switch);
# removed again on exit. Left alone if the machine already has a policy.
POLICY=/usr/sbin/policy-rc.d
OUR_POLICY=0
block_service_starts() {
    if [ "$(id -u)" -eq 0 ] && [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY" && chmod 755 "$POLICY" && OUR_POLICY=1
    fi
}
unblock_service_starts() {
    if [ "$OUR_POLICY" -eq 1 ]; then rm -f "$POLICY"; fi
}
trap unblock_service_starts EXIT

# Stop what a package may have started anyway; harmless when nothing runs.
stop_system_services() {
    [ "$(id -u)" -eq 0 ] || return 0
    if command -v service >/dev/null 2>&1; then
        service redis-server stop >/dev/null 2>&1 || true
        service rabbitmq-server stop >/dev/null 2>&1 || true
    fi
    # rabbitmq's init script leaves epmd on the default port; -kill only stops an idle one.
    if command -v epmd >/dev/null 2>&1; then epmd -kill >/dev/null 2>&1 || true; fi
}

have_rabbitmq() {
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || command -v rabbitmq-server >/dev/null 2>&1
}

install_servers() {
    local missing=()
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    have_rabbitmq || missing+=(rabbitmq-server)
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    block_service_starts
    apt_install "${missing[@]}"
    unblock_service_starts
    stop_system_services
    command -v redis-server >/dev/null 2>&1 || die "redis-server still missing after install"
    have_rabbitmq || die "rabbitmq-server still missing after install"
}

check_python() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=/path/to/python3.10+)"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$("$PYTHON" -V 2>&1) is too old: serve_queue needs Python 3.10 or newer"
}

make_venv() {
    [ -x "$VENV/bin/python" ] && return 0
    say "creating $VENV"
    if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        # Debian's python3 keeps venv/ensurepip in a separate package.
        local minor
        minor="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
        apt_install "python${minor}-venv"
        quietly "python -m venv" "$PYTHON" -m venv "$VENV"
    fi
}

# pip runs only when pyproject.toml, the constraints or the interpreter changed since the last
# good install. The constraints pin known-good versions so the resolver does not backtrack.
install_package() {
    local stamp="$VENV/.bootstrap-stamp" want constraints="$ROOT/scripts/constraints.txt"
    want="$(cat "$ROOT/pyproject.toml" "$constraints" "$VENV/pyvenv.cfg" | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && "$VENV/bin/python" -c 'import serve_queue' >/dev/null 2>&1; then
        return 0
    fi
    say "installing serve_queue (editable) with its dev extra into .venv (takes a few minutes)"
    quietly "pip install -e .[dev]" "$VENV/bin/python" -m pip install -q \
        --disable-pip-version-check -c "$constraints" -e "$ROOT[dev]"
    echo "$want" >"$stamp"
}

cd "$ROOT"
if [ "$WANT_SERVERS" -eq 1 ]; then
    install_servers
fi
check_python
make_venv
install_package
say "ready ($("$VENV/bin/python" -V 2>&1) in .venv)"
