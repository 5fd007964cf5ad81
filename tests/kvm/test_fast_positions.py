"""Fast recordings debugged with instruction positions (issue 12).

A fast recording's log is keyed by exit numbers and landmarks; a stepping
replay of it (``rrstub.engines.faststep.FastStepEngine``, used by trace,
serve, the timeline and replay's --until/--from/--vassert/--go-live)
counts instructions, the unit exact recordings use.  These tests hold that
to what a position means:

* the stepping replay is the recording: the trace lists each instruction
  once up to the end, replay --until stops where asked, in the state the
  trace describes, with the recorded serial output;
* a position is one machine state, however the timeline got there;
* a recorded marker, reached by instruction counting, is the state the
  recording stores for it;
* ranges of a trace are the same lines as the whole trace.

Every number comes from the recording made here (its trace, its markers),
never from how fast this host runs the guest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Optional
from unittest import mock

import pytest

from conftest import marker_every, rrstub, symbol
from rrstub import session
from rrstub.engines import FastStepEngine, regs_tuple
from rrstub.markers import decode_marker
from rrstub.recording import Recording
from rrstub.replay.timeline import CHECKPOINT_EVERY, Timeline
from vmm import snapshot
from vmm.kvm import REG_NAMES

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(300)]

MEM = "4M"
# Small workloads: a stepping replay runs some tens of thousands of instructions a
# second here, and tracing is slower still.
WORK = {
    "race": ("--cmdline", "increments=300"),    # 3 workers preempted by the PIT: ~40k instructions
    "ticks": ("--cmdline", "work=4000"),        # timer interrupts during pure computation
}
MARKERS = 4     # about this many markers per recording


@dataclasses.dataclass
class Fast:
    """A fast recording made by the test, and its whole trace (made on first use)."""
    name: str
    elf: Path
    path: Path
    serial: bytes           # what the guest printed while recording
    status: int
    folder: Path
    _lines: Optional[list] = None
    trace_stderr: bytes = b""

    @property
    def lines(self) -> list[dict]:
        """`rrstub trace REC --format jsonl`, parsed."""
        if self._lines is None:
            out = self.folder / "all.jsonl"
            r = rrstub("trace", str(self.path), "--format", "jsonl", "-o", str(out), timeout=240)
            assert r.returncode == 0, r.stderr
            self.trace_stderr = r.stderr
            self._lines = [json.loads(line) for line in out.read_text().splitlines()]
        return self._lines

    def markers(self) -> list:
        with Recording.open(self.path) as rec:
            return [decode_marker(rec.payload(m)) for m in rec.markers]


@pytest.fixture(scope="module")
def fast(kernels, tmp_path_factory):
    """fast(name): a fast recording of race or ticks with about MARKERS markers, made once."""
    made: dict[str, Fast] = {}

    def get(name: str) -> Fast:
        if name not in made:
            folder = tmp_path_factory.mktemp(f"fast-{name}")
            elf = kernels / f"{name}.elf"
            args = ("--mode", "fast", "--mem", MEM, *WORK[name], "--timeout", "60")
            path = folder / f"{name}.rrr"
            r = rrstub("record", str(elf), "-o", str(path), *args, "-q",
                       "--marker-every", marker_every(MARKERS, elf, *args), timeout=120)
            assert r.returncode in ((0, 1) if name == "race" else (0,)), r.stderr
            made[name] = Fast(name, elf, path, r.stdout, r.returncode, folder)
            # Live runs vary in length, but not by a factor of MARKERS.
            assert len(made[name].markers()) >= 2, "no m1: the recording is far shorter than measured"
        return made[name]

    return get


# ---------------------------------------------------------------------------
# The state where a stepping replay stopped, seen from inside the process


@dataclasses.dataclass
class Stopped:
    icount: int
    exits: int
    regs: tuple[int, ...]
    sregs: object
    memory: bytes


class _Probe(FastStepEngine):
    """The stepping engine, noting the machine each time a run returns."""
    stops: list[Stopped] = []

    def run(self):
        outcome = super().run()
        m = self.machine
        _Probe.stops.append(Stopped(self.ctl.icount, self.exits, regs_tuple(m.vcpu.get_regs()),
                                    m.vcpu.get_sregs(), bytes(m.mem.view)))
        return outcome


def replay_probed(path: Path, until) -> tuple[session.ReplayResult, bytes, Stopped]:
    """session.replay(until=...) of a fast recording (so stepping); the state it stopped in."""
    _Probe.stops = []
    out = io.BytesIO()
    with mock.patch.object(session, "FastStepEngine", _Probe):
        result = session.replay(str(path), until=until, serial_out=out)
    assert isinstance(result.engine, _Probe) and _Probe.stops
    return result, out.getvalue(), _Probe.stops[-1]


def stopped_at(stderr: bytes) -> int:
    m = re.search(rb"stopped at instruction (\d+) \(--until\)", stderr)
    assert m, stderr
    return int(m[1])


def rebuilt_registers(initial, lines: list[dict], n: int) -> dict[str, int]:
    """The general registers before instruction ``n``: ``initial`` (m0's) with every change the
    trace lists for instructions 0..n-1, and the address line ``n`` is at."""
    regs = {name: getattr(initial, name) for name in REG_NAMES}
    for x in lines[:n]:
        for name, value in x["changed"].items():
            if name in regs:
                regs[name] = int(value, 16)
    regs["rip"] = int(lines[n]["rip"], 16)
    return regs


def not_an_interrupt(lines: list[dict], n: int) -> int:
    """``n``, or the first position after it whose line is an instruction, not a delivery."""
    while "interrupt" in lines[n]:
        n += 1
    return n


# ---------------------------------------------------------------------------
# 1. The stepping replay matches the recording


@pytest.mark.parametrize("name", ["race", "ticks"])
def test_the_stepping_replay_is_the_recording(fast, name):
    rec = fast(name)
    lines = rec.lines
    count = len(lines)
    assert count > 1000
    # Exactly the instructions up to the end: 0..last, each once, each with its code.
    assert [x["pos"] for x in lines] == list(range(count))
    last = lines[-1]["pos"]
    assert last + 1 == count
    assert f"traced {count} instructions [0, {count}) in ".encode() in rec.trace_stderr, rec.trace_stderr
    assert b"the recording ends there (exit)" in rec.trace_stderr
    assert all(x["bytes"] and x["asm"] for x in lines if "interrupt" not in x)
    assert not [x for x in lines if "then" in x]      # every delivery and iretq is a position of its own
    assert sum("interrupt" in x for x in lines) >= 5  # the PIT ticked, at logged points only
    with Recording.open(rec.path) as r:
        logged_end = r.summary["end_position"]
    # The whole replay, stepping: it ends where the trace ends, with the recorded end and output.
    r = rrstub("replay", str(rec.path), "--from", "m0", timeout=240)
    assert r.returncode == rec.status, r.stderr
    assert f"replayed exit (status {rec.status}) at instruction {count}, ".encode() in r.stderr, r.stderr
    assert b"matched the recording" in r.stderr
    assert r.stdout == rec.serial
    # --until the last position: all of the serial output, stopped there.
    r = rrstub("replay", str(rec.path), "--until", str(last), timeout=240)
    assert r.returncode == 0, r.stderr
    assert stopped_at(r.stderr) == last
    assert r.stdout == rec.serial
    # --until the middle: there, in the state the trace describes.
    middle = not_an_interrupt(lines, count // 2)
    r = rrstub("replay", str(rec.path), "--until", str(middle), timeout=240)
    assert r.returncode == 0, r.stderr
    assert stopped_at(r.stderr) == middle
    assert rec.serial.startswith(r.stdout)
    result, out, stop = replay_probed(rec.path, middle)
    assert (result.outcome.reason, result.outcome.position, stop.icount) == ("until", middle, middle)
    assert out == r.stdout
    assert 0 < stop.exits < logged_end
    m0 = rec.markers()[0].vcpu.regs
    assert dict(zip(REG_NAMES, stop.regs)) == rebuilt_registers(m0, lines, middle)
    # And at the last position, the trace's changes add up to the replay's registers there too.
    _, _, stop = replay_probed(rec.path, last)
    assert stop.icount == last
    assert dict(zip(REG_NAMES, stop.regs)) == rebuilt_registers(m0, lines, last)


# ---------------------------------------------------------------------------
# 2. One position, one state, whatever the path


def _pages(t: Timeline, addresses: list[int]) -> dict[int, bytes]:
    return {a: t.read_memory(a, snapshot.PAGE_SIZE) for a in addresses}


def _state(t: Timeline, addresses: list[int]) -> tuple:
    regs = t.registers()
    rsp_page = regs["rsp"] & ~(snapshot.PAGE_SIZE - 1)
    return (t.position, regs, _pages(t, addresses + [rsp_page]),
            hashlib.sha256(t.machine.mem.view).hexdigest())


def test_a_position_is_the_same_state_by_every_path(fast):
    rec = fast("race")
    end = len(rec.lines)
    page = ~(snapshot.PAGE_SIZE - 1)
    counter, _ = symbol("counter", rec.elf)
    stacks, size = symbol("stacks", rec.elf)
    threads, _ = symbol("threads", rec.elf)
    addresses = sorted({counter & page, threads & page, stacks & page, (stacks + size - 1) & page})
    targets = [not_an_interrupt(rec.lines, p) for p in (end // 5, end // 2 + 7, end * 4 // 5)]
    with Timeline(str(rec.path)) as t:
        assert t.mode == "fast"
        for p in targets:
            first = (t.goto(p).position, _state(t, addresses))      # forward from where it was
            assert first[0] == p
            t.goto(min(p + 3 * CHECKPOINT_EVERY + 123, end - 1))     # past it
            t.goto(p)                                                # and back: from a checkpoint
            assert _state(t, addresses) == first[1], f"instruction {p} by going past it and back"
            t.goto(p + 1)
            stop = t.reverse_step()
            assert (stop.kind, stop.position) == ("step", p)
            assert _state(t, addresses) == first[1], f"instruction {p} by a reverse step"
    with Timeline(str(rec.path)) as fresh:        # from the start, straight there
        for p in reversed(targets):
            fresh.goto(p)
            again = _state(fresh, addresses)
            with Timeline(str(rec.path)) as once:
                once.goto(p)
                assert _state(once, addresses) == again, f"instruction {p} from the start"


# ---------------------------------------------------------------------------
# 3. A recorded marker reached by counting instructions


def test_until_a_marker_stops_in_the_state_it_stores(fast):
    rec = fast("race")
    markers = rec.markers()
    m1 = markers[1]
    r = rrstub("replay", str(rec.path), "--until", "m1", timeout=120)
    assert r.returncode == 0, r.stderr
    at = stopped_at(r.stderr)
    assert rec.serial.startswith(r.stdout)
    with Recording.open(rec.path) as opened:
        target = session.resolve_position(opened, "m1")
        ram = bytearray(opened.config["mem_size"])
    for m in markers[:2]:
        snapshot.apply_pages(ram, m.pages)
    result, out, stop = replay_probed(rec.path, target)
    assert (result.outcome.reason, result.outcome.position, stop.icount) == ("until", at, at)
    assert out == r.stdout
    assert stop.exits == m1.position              # the exit number the recording stores for it
    assert stop.regs == regs_tuple(m1.vcpu.regs)
    mine, stored = dataclasses.asdict(stop.sregs), dataclasses.asdict(m1.vcpu.sregs)
    assert {k: v for k, v in mine.items() if k != "interrupt_bitmap"} == \
        {k: v for k, v in stored.items() if k != "interrupt_bitmap"}
    assert stop.memory == bytes(ram)
    # The trace agrees on where that is: the marker's rip is the instruction at that position.
    assert int(rec.lines[at]["rip"], 16) == m1.vcpu.regs.rip
    assert rebuilt_registers(markers[0].vcpu.regs, rec.lines, at) == dict(zip(REG_NAMES, stop.regs))


# ---------------------------------------------------------------------------
# 4. A range of a trace is its part of the whole trace


def _trace(path: Path, *args: str) -> list[dict]:
    r = rrstub("trace", str(path), *args, "--format", "jsonl", timeout=240)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


@pytest.mark.parametrize("name", ["race", "ticks"])
def test_a_range_is_its_part_of_the_whole_trace(fast, name):
    rec = fast(name)
    lines = rec.lines
    end = len(lines)
    interrupt = next(x["pos"] for x in lines if "interrupt" in x and x["pos"] > end // 2)
    start, stop = interrupt - 40, interrupt + 60
    assert _trace(rec.path, "--from", str(start), "--to", str(stop)) == lines[start:stop]
    assert _trace(rec.path, "--to", "25") == lines[:25]
    assert _trace(rec.path, "--from", str(end - 30)) == lines[end - 30:]
    part = _trace(rec.path, "--from", "m1", "--to", str(end - 1))
    m1 = part[0]["pos"]
    assert 0 < m1 and part == lines[m1:end - 1]
