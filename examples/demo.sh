#!/usr/bin/env bash
# `make demo`: what the machine does, live. The race kernel's result differs
# from run to run: host timing decides where the timer interrupts land, and
# that is exactly the bug a recording must capture.
set -u
cd "$(dirname "$0")/.."
RRSTUB=.venv/bin/rrstub

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step rrstub run examples/build/hello.elf
$RRSTUB run examples/build/hello.elf || exit 1

for i in 1 2 3; do
    step rrstub run examples/build/race.elf "   # run $i"
    $RRSTUB run examples/build/race.elf --timeout 120
    status=$?
    # race exits 1 when updates were lost (the expected outcome); anything
    # else (crash 70, hang 71, timeout 124, no KVM 3) is a failure of the demo.
    if [ "$status" -ne 0 ] && [ "$status" -ne 1 ]; then
        echo "demo: race.elf failed with status $status" >&2
        exit 1
    fi
done
printf '\nThree live runs of the same kernel, different lost-update counts.\n'
printf 'Recording one run and replaying it exactly is the next layer of rrstub.\n'
