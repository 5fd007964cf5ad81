"""`rrstub trace` on real recordings: every instruction once, as replay single-steps it.

Mostly exact recordings; a fast one is traced too (``FastStepEngine`` replays
its log instruction by instruction, so its positions are instruction counts).
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, marker_every, rrstub, symbol
from rrstub.replay.timeline import Timeline
from rrstub.trace import InstructionTrace
from vmm.kvm import REG_NAMES

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(60)]

INCREMENTS = 1000
WORKERS = 3      # race.c


@pytest.fixture(scope="module")
def race(kernels, tmp_path_factory):
    """race, exact, about ten markers; its whole trace as parsed JSON lines."""
    d = tmp_path_factory.mktemp("trace")
    path = d / "race.rrr"
    args = ("--mode", "exact", "--mem", "4M", "--cmdline", f"increments={INCREMENTS}", "--timeout", "60")
    r = rrstub("record", str(kernels / "race.elf"), "-o", str(path), *args,
               "--marker-every", marker_every(10, kernels / "race.elf", *args))
    assert r.returncode == 1, r.stderr
    info = json.loads(rrstub("info", str(path), "--json").stdout)
    r = rrstub("trace", str(path), "--format", "jsonl", "-o", str(d / "all.jsonl"))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (d / "all.jsonl").read_text().splitlines()]
    return path, info, lines


FAST_INCREMENTS = 200
FAST = ("--mode", "fast", "--mem", "4M", "--cmdline", f"increments={FAST_INCREMENTS}", "--timeout", "60")


@pytest.fixture(scope="module")
def fast_recording(kernels, tmp_path_factory):
    """race, fast, a few markers: (path, serial output)."""
    path = tmp_path_factory.mktemp("trace-fast") / "race.rrr"
    r = rrstub("record", str(kernels / "race.elf"), "-o", str(path), *FAST,
               "--marker-every", marker_every(4, kernels / "race.elf", *FAST))
    assert r.returncode == 1, r.stderr
    assert len(json.loads(rrstub("info", str(path), "--json").stdout)["markers"]) >= 2, "no m1"
    return path, r.stdout


def machine_state(t: Timeline) -> dict:
    """The registers a trace reports, read from the vCPU under the names the trace uses."""
    vcpu = t.machine.vcpu
    regs, s = vcpu.get_regs(), vcpu.get_sregs()
    state = {n: getattr(regs, n) for n in REG_NAMES}
    state.update({n: getattr(s, n).selector for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")})
    state.update(fs_base=s.fs.base, gs_base=s.gs.base, cr0=s.cr0, cr2=s.cr2, cr3=s.cr3, cr4=s.cr4,
                 cr8=s.cr8, efer=s.efer, gdt_base=s.gdt_base, idt_base=s.idt_base,
                 k_gs_base=t.registers()["k_gs_base"])
    return state


def executed(lines) -> list[tuple[int, str, str]]:
    """(rip, bytes, asm) of every instruction that ran, the extra ones of a step included."""
    out = []
    for x in lines:
        if "interrupt" not in x:
            out.append((int(x["rip"], 16), x["bytes"], x["asm"]))
        if "then" in x:
            t = x["then"]
            out.append((int(t["rip"], 16), t["bytes"], t["asm"]))
    return out


def test_the_whole_recording_is_one_line_per_position(race, kernels):
    _, info, lines = race
    end = info["end"]["position"]
    assert [x["pos"] for x in lines] == list(range(end))
    interrupts = [x for x in lines if "interrupt" in x]
    assert len(interrupts) > 20                           # the PIT ticked through the run
    assert all(x["interrupt"] == 32 and x["bytes"] == "" and x["asm"] == "<interrupt vector 32>"
               for x in interrupts)
    assert all(x["bytes"] and x["asm"] for x in lines if "interrupt" not in x)
    # Every instruction is its own position: no step runs a second one, not
    # even an interrupt delivery (the handler's first instruction is the next
    # line) or an iretq (the instruction it returns to is the next line).
    assert not [x for x in lines if "then" in x]
    entry = int(interrupts[0]["rip"], 16)
    handler = {lines[x["pos"] + 1]["rip"] for x in interrupts}
    assert len(handler) == 1 and int(handler.pop(), 16) != entry
    irets = [x for x in lines if x["asm"] == "iretq"]
    assert len(irets) > 20
    stub, size = symbol("trap_common", kernels / "race.elf")
    for x in irets:     # back in the interrupted code (or taking the next interrupt there)
        assert not stub <= int(lines[x["pos"] + 1]["rip"], 16) < stub + size


def counter_accesses(lines, elf) -> tuple[int, int]:
    """(loads, stores) of race's `counter` by increment() in a trace."""
    counter, _ = symbol("counter", elf)
    start, size = symbol("increment", elf)
    stores = loads = 0
    for rip, code, asm in executed(lines):
        m = re.search(r"\[rip ([+-]) (0x[0-9a-f]+)\]", asm)
        if not start <= rip < start + size or m is None:
            continue
        target = rip + len(code) // 2 + int(m[2], 16) * (1 if m[1] == "+" else -1)
        if target != counter:
            continue
        if asm.startswith("mov dword ptr [rip"):
            stores += 1
        elif asm.startswith("mov e"):
            loads += 1
    return loads, stores


def test_every_increment_loads_and_stores_counter_once(race, kernels):
    _, _, lines = race
    assert counter_accesses(lines, kernels / "race.elf") == (WORKERS * INCREMENTS, WORKERS * INCREMENTS)


def test_steps_match_the_timeline_and_changes_rebuild_each_state(race):
    path, _, lines = race
    first = next(x["pos"] for x in lines if "interrupt" in x and x["pos"] > 5000)
    iret = next(x["pos"] for x in lines[first:] if x["asm"] == "iretq")
    start, stop = first - 100, iret + 50
    assert stop - start < 1000
    with Timeline(str(path)) as t:
        t.goto(start)
        state = machine_state(t)
        for x in lines[start:stop]:
            assert x["pos"] == t.position
            assert int(x["rip"], 16) == state["rip"]
            t.step()
            after = machine_state(t)
            rebuilt = dict(state, **{n: int(v, 16) for n, v in x["changed"].items()}, rip=after["rip"])
            assert rebuilt == after, f"instruction {x['pos']}: {x}"
            state = after


def test_a_range_is_the_same_lines_as_the_whole_trace_and_text_agrees(race):
    path, _, lines = race
    first = next(x["pos"] for x in lines if "interrupt" in x and x["pos"] > 20000)
    start, stop = first - 40, first + 60
    r = rrstub("trace", str(path), "--from", str(start), "--to", str(stop), "--format", "jsonl")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in r.stdout.splitlines()] == lines[start:stop]
    r = rrstub("trace", str(path), "--from", str(start), "--to", str(stop))
    text = r.stdout.decode().splitlines()
    assert len(text) == stop - start
    for line, x in zip(text, lines[start:stop]):
        fields = line.split()
        assert int(fields[0]) == x["pos"] and int(fields[1], 16) == int(x["rip"], 16)
        assert x["asm"] in line
        assert all(f"{n}={v}" in line for n, v in x["changed"].items())
        assert ("<interrupt vector" in line) == ("interrupt" in x)


def test_from_a_marker(race):
    path, info, lines = race
    m2 = info["markers"][2]["position"]
    r = rrstub("trace", str(path), "--from", "m2", "--to", str(m2 + 30), "--format", "jsonl")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in r.stdout.splitlines()] == lines[m2:m2 + 30]
    # Markers are taken at timer points: the trace starts with the interrupt injected there.
    assert lines[m2]["interrupt"] == 32


def test_a_range_that_starts_with_an_interrupt(race):
    path, info, lines = race
    markers = {m["position"] for m in info["markers"]}
    p = next(x["pos"] for x in lines if "interrupt" in x and x["pos"] not in markers and x["pos"] > 1000)
    r = rrstub("trace", str(path), "--from", str(p), "--to", str(p + 3), "--format", "jsonl")
    assert [json.loads(line) for line in r.stdout.splitlines()] == lines[p:p + 3]


def test_a_cropped_recording_traces_as_its_part_of_the_original(race, tmp_path):
    path, info, lines = race
    m2, m3 = (info["markers"][i]["position"] for i in (2, 3))
    part = tmp_path / "part.rrr"
    r = rrstub("crop", str(path), "--from", "m2", "--to", "m3", "-o", str(part), "--no-verify", "-q")
    assert r.returncode == 0, r.stderr
    r = rrstub("trace", str(part), "--format", "jsonl")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in r.stdout.splitlines()] == lines[m2:m3]
    r = rrstub("trace", str(part), "--to", str(m2 - 1))
    assert r.returncode == 2 and f"the recording has instructions {m2}..{m3}" in r.stderr.decode()


def test_tracing_leaves_the_replay_as_it_would_be(race):
    path, _, lines = race
    with Timeline(str(path)) as traced, Timeline(str(path)) as plain:
        seen = []
        InstructionTrace(traced).run(3000, 9000, seen.append)
        assert [x.pos for x in seen] == list(range(3000, 9000))
        plain.goto(9000)
        assert traced.position == 9000
        assert traced.registers() == plain.registers()
        assert bytes(traced.machine.mem.view) == bytes(plain.machine.mem.view)


@pytest.mark.parametrize("args, message", [
    (("--from", "500", "--to", "400"), "--from 500 (instruction 500) is after --to 400"),
    (("--to", "99999999"), "--to 99999999: the recording has instructions 0.."),
    (("--from", "99999999"), "--from 99999999: the recording has instructions 0.."),
    (("--from", "m99"), "--from m99: the recording has markers m0..m"),
    (("--to", "ten"), "--to 'ten': give a position"),
    (("--from", "-5"), "--from -5: the recording has instructions 0.."),
])
def test_bad_positions_are_refused(race, args, message):
    path, _, _ = race
    r = rrstub("trace", str(path), *args)
    assert r.returncode == 2
    assert r.stdout == b""
    err = r.stderr.decode()
    assert err.startswith("rrstub: ") and message in err and err.count("\n") == 1, err


def test_a_fast_recording_is_traced_by_instruction(fast_recording, kernels):
    """Every instruction of the fast recording once, numbered from 0 to its end in instructions,
    which a stepping replay (--from m0) reports as where the guest exited."""
    path, _ = fast_recording
    r = rrstub("trace", str(path), "--format", "jsonl")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    end = len(lines)
    assert [x["pos"] for x in lines] == list(range(end))
    assert (f"traced {end} instructions [0, {end}) in ".encode() in r.stderr
            and b"the recording ends there (exit)" in r.stderr), r.stderr
    assert all(x["bytes"] and x["asm"] for x in lines if "interrupt" not in x)
    interrupts = [x for x in lines if "interrupt" in x]
    assert len(interrupts) >= 5 and all(x["interrupt"] == 32 for x in interrupts)   # the PIT preempted
    assert not [x for x in lines if "then" in x]
    # The guest's work, instruction by instruction: each increment loads and stores once.
    total = WORKERS * FAST_INCREMENTS
    assert counter_accesses(lines, kernels / "race.elf") == (total, total)
    r = rrstub("replay", str(path), "--from", "m0")
    assert r.returncode == 1, r.stderr
    assert f"replayed exit (status 1) at instruction {end}, ".encode() in r.stderr, r.stderr
    assert b"matched the recording" in r.stderr


def test_a_fast_recording_from_a_marker(fast_recording):
    """--from m1: where `replay --until m1` stops, the rest of the whole trace."""
    path, _ = fast_recording
    r = rrstub("replay", str(path), "--until", "m1")
    assert r.returncode == 0, r.stderr
    m1 = int(re.search(rb"stopped at instruction (\d+) \(--until\)", r.stderr)[1])
    r = rrstub("trace", str(path), "--format", "jsonl")
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert 0 < m1 < len(lines)
    r = rrstub("trace", str(path), "--from", "m1", "--format", "jsonl")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in r.stdout.splitlines()] == lines[m1:]
    r = rrstub("trace", str(path), "--from", "m1", "--to", str(m1 + 20), "--format", "jsonl")
    assert [json.loads(line) for line in r.stdout.splitlines()] == lines[m1:m1 + 20]


def test_a_reader_that_goes_away_ends_it_quietly(race):
    path, _, _ = race
    p = subprocess.Popen([sys.executable, "-m", "rrstub", "trace", str(path)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().split()[0] == b"0"
    p.stdout.close()
    assert p.wait(timeout=30) == 0
    assert p.stderr.read() == b""


def test_ctrl_c_keeps_what_was_traced(race, tmp_path):
    path, _, lines = race
    out = tmp_path / "part.txt"
    p = subprocess.Popen([sys.executable, "-m", "rrstub", "trace", str(path), "-o", str(out), "--format",
                          "jsonl"], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while (not out.exists() or out.stat().st_size == 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=30) == 130
    assert b"interrupted" in p.stderr.read()
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert 0 < len(written) < len(lines)
    assert written == lines[:len(written)]
