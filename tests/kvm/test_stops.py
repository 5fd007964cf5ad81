"""Every instruction is its own stop: interrupt deliveries, iretq, exceptions and syscall never hide one.

KVM's single step runs an interrupt's delivery together with the handler's
first instruction, an iretq together with the instruction it returns to,
and a faulting instruction together with its handler's first instruction;
the exact engine splits them (native/rrnative.c, landings).  These tests
count, on real recordings, how often breakpoints are hit against how
often the trace shows each instruction executed, forward and in reverse,
and check that a reverse watchpoint always stops at the storing
instruction.
"""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from conftest import ROOT, rrstub, symbol
from rrstub.replay.accesses import READ
from rrstub.replay.timeline import Timeline

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(240)]

WORKERS = 3                 # race.c
ROUNDS = 4                  # traps.elf rounds
HANDLERS = ("ud_entry", "gp_entry", "pf_entry", "syscall_entry")   # traps.c (int3/int n: soft=1 only)


def record_and_trace(kernel, folder, *args) -> tuple:
    """An exact recording of ``kernel`` and its whole trace as parsed JSON lines."""
    path = folder / "rec.rrr"
    r = rrstub("record", str(kernel), "-o", str(path), "--mode", "exact", "--mem", "4M", "--timeout", "60",
               *args, timeout=120)
    r = rrstub("trace", str(path), "--format", "jsonl", "-o", str(folder / "trace.jsonl"), timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (folder / "trace.jsonl").read_text().splitlines()]
    assert not [x for x in lines if "then" in x], "a step ran two instructions"
    return path, lines


@pytest.fixture(scope="module")
def race(kernels, tmp_path_factory):
    path, lines = record_and_trace(kernels / "race.elf", tmp_path_factory.mktemp("stops-race"),
                                   "--cmdline", "increments=600", "--marker-every", "0.01")
    return path, lines, kernels / "race.elf"


@pytest.fixture(scope="module")
def traps(kernels, tmp_path_factory):
    path, lines = record_and_trace(kernels / "traps.elf", tmp_path_factory.mktemp("stops-traps"),
                                   "--cmdline", f"rounds={ROUNDS}")
    return path, lines, kernels / "traps.elf"


def executions(lines) -> Counter:
    """How often each rip ran an instruction, as the trace shows it (a step's extra one included)."""
    ran = Counter(int(x["rip"], 16) for x in lines if "interrupt" not in x)
    ran.update(int(x["then"]["rip"], 16) for x in lines if "then" in x)
    return ran


def positions_using(lines, pattern: str, address: int) -> list[int]:
    """The positions of the instructions that match ``pattern``, whose group 1 is a rip-relative
    displacement, with that operand at ``address``."""
    found = []
    for x in lines:
        m = re.match(pattern, x["asm"])
        if m and int(x["rip"], 16) + len(x["bytes"]) // 2 + int(m[1], 16) == address:
            found.append(x["pos"])
    return found


def breakpoint_hits(path, addresses, reverse: bool = False) -> list[tuple[int, int]]:
    """(position, pc) of every breakpoint stop of a continue loop from the start to the end
    (``reverse``: of a reverse-continue loop from the end back to the start)."""
    hits = []
    with Timeline(str(path)) as t:
        if reverse:
            t.goto(t.last)
        for a in addresses:
            t.add_breakpoint(a)
        while (stop := t.reverse_cont() if reverse else t.cont()).kind == "break":
            hits.append((stop.position, stop.address))
    assert stop.kind == ("begin" if reverse else "end"), stop
    return hits


def test_exceptions_and_syscall_are_each_a_step_of_their_own(traps):
    path, lines, elf = traps
    runs = executions(lines)
    entries = {name: symbol(name, elf)[0] for name in HANDLERS}
    for name, entry in entries.items():
        assert runs[entry] == ROUNDS, f"{name}: its first instruction ran {runs[entry]} times in the trace"
    # The line before each handler entry is the instruction that raised it.
    before = {name: {lines[x["pos"] - 1]["asm"].split(" ")[0] for x in lines if int(x["rip"], 16) == entry}
              for name, entry in entries.items()}
    assert before == {"ud_entry": {"ud2"}, "gp_entry": {"mov"}, "pf_entry": {"mov"}, "syscall_entry": {"syscall"}}
    expected = sorted((x["pos"], int(x["rip"], 16)) for x in lines if int(x["rip"], 16) in entries.values())
    assert breakpoint_hits(path, entries.values()) == expected
    assert breakpoint_hits(path, entries.values(), reverse=True) == expected[::-1]


def test_thread_entry_breakpoint_is_hit_once_per_thread_both_ways(race):
    path, lines, elf = race
    worker = symbol("worker", elf)[0]
    expected = [(x["pos"], worker) for x in lines if int(x["rip"], 16) == worker]
    assert len(expected) == WORKERS
    # Each worker starts by an iretq (a context switch in the timer handler):
    # the iretq and worker's first instruction are two positions.
    assert all(lines[p - 1]["asm"] == "iretq" for p, _ in expected)
    assert breakpoint_hits(path, [worker]) == expected
    assert breakpoint_hits(path, [worker], reverse=True) == expected[::-1]


def test_breakpoints_on_every_instruction_of_increment_match_the_trace(race):
    path, lines, elf = race
    start, size = symbol("increment", elf)
    runs = executions(lines)
    inside = sorted(rip for rip in runs if start <= rip < start + size)
    # The point of the test: iretqs return into increment() (ticks preempt it).
    landed = {int(lines[x["pos"] + 1]["rip"], 16) for x in lines
              if x["asm"] == "iretq" and "interrupt" not in lines[x["pos"] + 1]}
    assert landed & set(inside), "no iretq returned into increment(): the test proves nothing"
    hits = Counter(pc for _, pc in breakpoint_hits(path, inside))
    assert hits == Counter({rip: runs[rip] for rip in inside})


def test_reverse_watchpoint_always_stops_at_the_store(race):
    path, lines, elf = race
    counter = symbol("counter", elf)[0]
    writes = positions_using(lines, r"mov dword ptr \[rip \+ (0x[0-9a-f]+)\], e", counter)
    assert len(writes) == WORKERS * 600                 # one store per increment
    stores = set(writes)
    after_iret = [p for p in writes if lines[p - 1]["asm"] == "iretq"]
    with Timeline(str(path)) as t:
        t.add_watch("write", counter, 4)
        # From just after each store that an iretq returned to (if the run
        # has any): the stop is a store (that one, unless it wrote the value
        # the counter already had), never the iretq or the timer handler.
        for p in after_iret:
            t.goto(p + 3)
            stop = t.reverse_cont()
            assert stop.kind == "watch" and stop.position in stores and stop.position <= p, (p, stop)
        # From the end, 40 writes back, each stop is a store, in order.
        t.goto(t.last)
        seen = []
        for _ in range(40):
            stop = t.reverse_cont()
            assert stop.kind == "watch" and stop.position in stores, (seen, stop)
            seen.append(stop.position)
        assert seen == sorted(seen, reverse=True) and len(set(seen)) == 40


def test_a_recording_made_before_the_split_replays_as_it_was_recorded(tmp_path):
    """tests/data/race-positions1.rrr: race (increments=150), recorded when deliveries shared a step."""
    old = ROOT / "tests" / "data" / "race-positions1.rrr"
    r = rrstub("replay", str(old))
    assert r.returncode == 1 and b"matched the recording" in r.stderr, r.stderr
    r = rrstub("trace", str(old), "--format", "jsonl", "-o", str(tmp_path / "t.jsonl"))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    irets = [x for x in lines if x["asm"] == "iretq"]
    assert irets and all("then" in x for x in irets)    # its positions: iretq and the next, together


def test_read_watchpoint_stops_after_each_load(race):
    path, lines, elf = race
    counter = symbol("counter", elf)[0]
    loads = positions_using(lines, r"mov e.., dword ptr \[rip \+ (0x[0-9a-f]+)\]$", counter)
    assert len(loads) >= WORKERS * 600
    stops = []
    with Timeline(str(path)) as t:
        t.add_watch("read", counter, 4)
        while (stop := t.cont()).kind == "watch":
            stops.append(stop.position - 1)     # reported after the reading instruction ran
    assert stops == loads


def test_a_delivery_is_never_blamed_for_the_interrupted_instructions_read(race, kernels, tmp_path):
    # Where the ticks land follows host timing: a recording in which none came before an
    # instruction that reads memory has nothing to test, so record longer ones (up to two).
    path, lines, _ = race
    tried = 0
    for attempt in range(3):
        if attempt:
            folder = tmp_path / f"again{attempt}"
            folder.mkdir()
            path, lines = record_and_trace(kernels / "race.elf", folder, "--cmdline", "increments=2000")
        with Timeline(str(path)) as t:
            for x in (x for x in lines if "interrupt" in x):
                t.goto(x["pos"])                  # the interrupt is about to be delivered
                reads = [(a, n) for a, n, how in t._decode_next() if how & READ]
                if not reads:
                    continue                      # the interrupted instruction reads no memory
                tried += 1
                t.add_watch("read", *reads[0])
                stop = t.cont()
                t.remove_watch("read", *reads[0])
                assert stop.kind == "watch" and "interrupt" not in lines[stop.position - 1], (x, stop)
                if tried == 5:
                    break
        if tried:
            break
    assert tried, "in 3 recordings no interrupt came before an instruction that reads memory"
