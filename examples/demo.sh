#!/usr/bin/env bash
# `make demo`: the race kernel loses a different number of updates on every
# live run; recording one run captures its outcome, and every replay of the
# recording reproduces it exactly, with no timing of its own.  Then gdb
# debugs that same recording (the default mode: fast where stepping is slow,
# replayed instruction by instruction for the debugger) backwards, from the
# final count to the store that lost updates.
set -u
cd "$(dirname "$0")/.."
RRSTUB=.venv/bin/rrstub
REC=${TMPDIR:-/tmp}/rrstub-demo-race.rrr
SERVE_LOG=${TMPDIR:-/tmp}/rrstub-demo-serve.log

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

# --force: the demo's own recordings from an earlier run are replaced (never any other file).
step rrstub record examples/build/race.elf -o "$REC" --force
$RRSTUB record examples/build/race.elf -o "$REC" --force --timeout 120
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

if ! command -v gdb >/dev/null; then
    printf '\ngdb is not installed: skipping the reverse-debugging part of the demo.\n'
    exit 0
fi
step rrstub serve "$REC" --port 0 --clients 1 "  # and gdb, with examples/gdb/find-lost-update.gdb"
$RRSTUB serve "$REC" --port 0 --clients 1 --serial-out /dev/null 2>"$SERVE_LOG" &
SERVER=$!
PORT=
for _ in $(seq 600); do     # up to a minute: a busy host starts Python slowly
    PORT=$(sed -n 's/.*waiting for gdb on [^ ]*:\([0-9]*\) .*/\1/p' "$SERVE_LOG")
    [ -n "$PORT" ] && break
    kill -0 $SERVER 2>/dev/null || break
    sleep 0.1
done
if [ -z "$PORT" ]; then
    cat "$SERVE_LOG" >&2
    kill $SERVER 2>/dev/null
    echo "demo: rrstub serve did not start" >&2
    exit 1
fi
timeout 300 gdb -batch -nx examples/build/race.elf -ex "target remote 127.0.0.1:$PORT" \
    -x examples/gdb/find-lost-update.gdb
STATUS=$?
wait $SERVER
[ $STATUS -eq 0 ] || { echo "demo: the gdb session failed with status $STATUS" >&2; exit 1; }
# gdb goes on after a stop it did not expect: the server's log says whether
# replay reached the recorded end and followed the recording all the way.
if ! grep -q "end of the recording at" "$SERVE_LOG" || grep -q "no longer follows the recording" "$SERVE_LOG"; then
    cat "$SERVE_LOG" >&2
    echo "demo: replay for gdb did not follow $REC to its end (please report it with that file)" >&2
    exit 1
fi
printf '\ngdb ran the recording above to its end, then backwards, write by write, to the\n'
printf 'store that overwrote other threads'"'"' updates: the bug, found after the fact.\n'
