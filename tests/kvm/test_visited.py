"""Visited summaries: skipping an interval whose summary shows no breakpoint gives the stops a replay gives.

The timeline keeps, per checkpoint, a hash set of the rips replay looked
at since the previous one (``rr_step``'s ``visited``); reverse continue
skips intervals without a breakpoint's bit and continue jumps over them.
Here the same questions are asked of two timelines on one recording, one
with the summaries and one that replays every interval, and every answer
must be the same, in both recording modes.
"""
from __future__ import annotations

import pytest

from conftest import rrstub, symbol
from rrstub.replay.timeline import Timeline

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(300)]

WORK = ("--mem", "4M", "--cmdline", "increments=600", "--timeout", "60")


@pytest.fixture(scope="module", params=["exact", "fast"])
def race(request, kernels, tmp_path_factory):
    path = tmp_path_factory.mktemp("visited") / f"race-{request.param}.rrr"
    r = rrstub("record", str(kernels / "race.elf"), "-o", str(path), "--mode", request.param, *WORK,
               timeout=120)
    assert r.returncode == 1, r.stderr      # race exits 1: it lost updates
    return path, kernels / "race.elf"


def stops(t: Timeline, moves: list[str]) -> list[tuple]:
    seen = []
    for move in moves:
        s = t.cont() if move == "c" else t.reverse_cont()
        seen.append((move, s.kind, s.position, s.address))
    return seen


def test_summaries_give_the_stops_of_a_full_replay(race):
    path, elf = race
    once = symbol("pit_start_periodic", elf)[0]      # called once, early
    often = symbol("increment", elf)[0]
    with Timeline(str(path)) as fast, Timeline(str(path)) as slow:
        slow.summaries = False
        for t in (fast, slow):
            t.cont()                                  # to the end: every interval gets its summary
        end = fast.position
        assert end == slow.position and fast.last == end
        for t in (fast, slow):
            t.add_breakpoint(once)
        moves = ["r", "c", "r", "r", "c"]
        seen = stops(fast, moves)
        assert seen == stops(slow, moves)
        hit = seen[0][2]
        assert seen[0][:2] == ("r", "break") and seen[1][1] == "end" and seen[3][1] == "begin", seen
        assert end - hit > 10 * 4096        # the skips spanned many intervals
        for t in (fast, slow):
            t.remove_breakpoint(once)
            t.add_breakpoint(often)
            t.goto(end // 2)
        moves = ["r", "r", "c", "c", "c", "r"]
        assert stops(fast, moves) == stops(slow, moves)


def test_a_watchpoint_is_never_skipped(race):
    # Summaries know rips, not writes: with a watchpoint every interval is replayed.
    path, elf = race
    counter = symbol("counter", elf)[0]
    once = symbol("pit_start_periodic", elf)[0]
    with Timeline(str(path)) as fast, Timeline(str(path)) as slow:
        slow.summaries = False
        for t in (fast, slow):
            t.cont()
            t.add_breakpoint(once)
            t.add_watch("write", counter, 4)
        moves = ["r", "r", "c"]
        seen = stops(fast, moves)
        assert seen == stops(slow, moves)
        assert seen[0][1] == "watch", seen
