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
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${need[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
else
    echo "setup: the gdb and browser tests need Debian packages; run as root:" >&2
    echo "    apt-get install --no-install-recommends ${need[*]}" >&2
    echo "setup: (those tests skip until then, and fail under CI=true)" >&2
fi
