#!/usr/bin/env bash
# `make demo`: the race kernel loses a different number of updates on every
# live run; recording one run captures its outcome, and every replay of the
# recording reproduces it exactly, with no timing of its own.
set -u
cd "$(dirname "$0")/.."
RRSTUB=.venv/bin/rrstub
REC=${TMPDIR:-/tmp}/rrstub-demo-race.rrr

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

# race exits 1 when updates were lost (the expected outcome); anything else
# (crash 70, hang 71, timeout 124, no KVM 3, divergence 66) fails the demo.
check() {
    if [ "$1" -ne 0 ] && [ "$1" -ne 1 ]; then
        echo "demo: $2 failed with status $1" >&2
        exit 1
    fi
}

step rrstub run examples/build/hello.elf
$RRSTUB run examples/build/hello.elf || exit 1

for i in 1 2; do
    step rrstub run examples/build/race.elf "   # live run $i"
    $RRSTUB run examples/build/race.elf --timeout 120
    check $? "live race run"
done

step rrstub record examples/build/race.elf -o "$REC"
$RRSTUB record examples/build/race.elf -o "$REC" --timeout 120
check $? "recording race"

for i in 1 2; do
    step rrstub replay "$REC" "   # replay $i"
    $RRSTUB replay "$REC"
    check $? "replaying race"
done

step rrstub info "$REC"
$RRSTUB info "$REC" || exit 1
printf '\nTwo live runs lost different numbers of updates; the recorded run replays\n'
printf 'with exactly its own count, every time, checked against the recording.\n'
