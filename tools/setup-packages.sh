#!/bin/bash
# Debian packages the debugger tests and the web page need: gdb (the gdb tests drive the real one)
# and chromium (rrstub ui's tests drive it headless through Playwright, which uses this
# browser: nothing is downloaded by Playwright itself). Installs with apt-get when run as root;
# otherwise prints the command to run. The Linux guest's packages are examples/linux/setup.sh's.
set -euo pipefail
need=()
command -v gdb >/dev/null || need+=(gdb)
command -v chromium >/dev/null || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
. "$(dirname "$0")/apt-install.sh"
apt_install "the gdb and browser tests" "${need[@]}" || true
