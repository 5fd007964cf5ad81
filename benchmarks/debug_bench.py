"""Debugging fast recordings next to exact ones: the figures of issue 12, side by side in one run.

Records examples/build/race.elf and ticks.elf in fast mode (default
workloads) and race.elf in exact mode (--increments, default 11000 per
worker: about 1.2M instructions), all in this process through the calls
the CLI makes (rrstub.session.record and replay for `rrstub record` and
`replay`, rrstub.replay.timeline.Timeline for what `rrstub serve` serves),
and measures, each figure the median of --rounds repetitions:

  1. fast replay time / its recording time, race and ticks: the free-running
     session.replay against the recorder's own host time (both the
     ``host_seconds`` the calls report), a fresh recording each round;
  2. reverse-stepi latency, median and p95 of 50 consecutive reverse_step()
     per round (pooled over the rounds) from the middle of the recording
     (half its instruction count): the round's fast race recording, and the
     exact one for comparison.  A reverse step replays from the checkpoint
     before its target (one every CHECKPOINT_EVERY instructions), so these
     cost what the middle's distance from that checkpoint happens to be;
     the same again for 50 single reverse_step() from positions spread
     evenly over that distance (one every CHECKPOINT_EVERY + 83
     instructions from the middle on), the median over all distances;
  3. reverse-continue across 1M instructions: from 1M instructions after the
     only hit of a breakpoint on pit_start_periodic (kmain calls it once)
     back to that hit, in both modes (the fast race recording of the last
     round; it warns if the stop is not the hit), after replay has been
     there (as it has whenever gdb got there): with the timeline's visited
     summaries (the default: intervals whose summary lacks the breakpoint
     are skipped without replaying them), and without them
     (``Timeline.summaries = False``: every instruction replayed, what a
     watchpoint needs);
  4. `continue` from the start to the end of the fast race recording with
     no breakpoints (Timeline.cont() on a fresh Timeline, the open excluded)
     against the free-running replay of the same file (figure 1's);
  5. `rrstub serve REC --port 0` as a subprocess (.venv/bin/rrstub) until
     gdb (`gdb -q -batch -nx -ex 'target remote ...' -ex 'monitor when'`)
     printed the answer to `monitor when`, and until serve's "waiting for
     gdb" line alone, in both modes.

Goals on this host (issue 12): 1. <= 3x; 2. median <= 50 ms (fast); 3. <= 5 s,
both modes; 4. <= 1.5; 5. <= 2 s.  Each figure comes with what it is bounded
by, from costs measured in the same run: the per-instruction cost of a
stepping replay (instructions / seconds of the timeline replaying forward)
and of a bare C loop of single steps (measured once a round, the median
shown).  It prints figures and asserts nothing.
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from record_bench import KERNELS, NullSink, Runner, step_floor_us, takes_cmdline, timed
from rrstub import session
from rrstub.hostfacts import host_facts
from rrstub.replay.timeline import CHECKPOINT_EVERY, Timeline

ROOT = Path(__file__).resolve().parent.parent
RRSTUB = ROOT / ".venv" / "bin" / "rrstub"
ONCE = "pit_start_periodic"          # race's kmain calls it exactly once, early
REVERSE_STEPS = 50
SPREAD_STRIDE = CHECKPOINT_EVERY + 83   # distances from the checkpoint before: 83 apart, all of 0..4095
DISTANCE = 1_000_000
SERVE_TIMEOUT_S = 60

REPLAY_RATIO_GOAL = 3.0
REVERSE_STEP_GOAL_MS = 50
REVERSE_CONT_GOAL_S = 5
CONTINUE_RATIO_GOAL = 1.5
SERVE_GOAL_S = 2


def symbol(name: str, elf: Path) -> int:
    """The address of a symbol of the kernel (as tests/conftest.py's symbol())."""
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == name:
            return int(parts[0], 16)
    raise SystemExit(f"{name} is not a symbol of {elf}: rebuild examples")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def replay(path: str) -> session.ReplayResult:
    result = session.replay(path, serial_out=NullSink())
    assert result.verified_end, f"replay of {path} did not match its recording: {result.outcome}"
    return result


def reverse_steps(t: Timeline, start: int, n: int) -> tuple[list[float], int]:
    """Latencies of n consecutive reverse_step() from ``start``; how far ``start`` is past its checkpoint."""
    t.goto(start)
    distance = start - t.checkpoint_before(start).position
    lat = []
    for _ in range(n):
        seconds, stop = timed(t.reverse_step)
        assert stop.kind == "step", stop
        lat.append(seconds)
    assert t.position == start - n, (t.position, start, n)
    return lat, distance


def reverse_steps_spread(t: Timeline, start: int, n: int) -> tuple[list[float], list[int]]:
    """Latencies of one reverse_step() to each of n positions SPREAD_STRIDE apart from ``start`` on
    (fewer if the recording ends first), and each target's distance from the checkpoint before it."""
    lat, distances = [], []
    for k in range(n):
        target = start + k * SPREAD_STRIDE
        if target + 1 > t.last:
            break
        t.goto(target + 1)
        distances.append(target - t.checkpoint_before(target).position)
        seconds, stop = timed(t.reverse_step)
        assert (stop.kind, stop.position) == ("step", target), stop
        lat.append(seconds)
    return lat, distances


def find_hit(t: Timeline, address: int) -> int:
    """The position of the first hit of a breakpoint at ``address`` (which stays set)."""
    t.goto(t.first)
    t.add_breakpoint(address)
    stop = t.cont()
    if stop.kind != "break":
        raise SystemExit(f"{ONCE} is never reached in {t.rec.path}: {stop}")
    return stop.position


def reverse_continues(t: Timeline, hit: int, rounds: int, warnings: list[str], mode: str,
                      summaries: bool) -> list[float]:
    """Seconds of reverse_cont() from ``hit`` + DISTANCE back to the breakpoint's only hit.

    ``summaries``: whether the timeline may skip intervals by their visited
    summaries (an empty list when it cannot be switched off: it has none).
    """
    if not hasattr(t, "summaries"):
        if not summaries:
            return []
    else:
        t.summaries = summaries
    took = []
    for _ in range(rounds):
        t.goto(hit + DISTANCE)
        seconds, stop = timed(t.reverse_cont)
        took.append(seconds)
        if (stop.kind, stop.position) != ("break", hit):
            warnings.append(f"{mode}{'' if summaries else ' (no summaries)'}: reverse-continue from "
                            f"{hit + DISTANCE} stopped at {stop}, not at the hit at instruction {hit}")
    if hasattr(t, "summaries"):
        t.summaries = True
    return took


@dataclass
class ServeTimes:
    waiting: float      # launch -> "waiting for gdb on HOST:PORT" on stderr
    answered: float     # launch -> gdb printed the answer to `monitor when`


def serve_and_ask(path: str) -> ServeTimes:
    """`rrstub serve path --port 0` and one gdb that asks `monitor when`, timed from the launch."""
    started = time.perf_counter()
    serve = subprocess.Popen([str(RRSTUB), "serve", path, "--port", "0", "--clients", "1"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        port = None
        seen = []
        for line in serve.stderr:
            seen.append(line)
            m = re.search(r"waiting for gdb on \S+:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        waiting = time.perf_counter() - started
        if port is None:
            raise RuntimeError(f"rrstub serve {path} printed no 'waiting for gdb' line: {''.join(seen)}")
        gdb = subprocess.Popen(["gdb", "-q", "-batch", "-nx", "-ex", f"target remote 127.0.0.1:{port}",
                                "-ex", "monitor when"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
        answered = None
        out = []
        for line in gdb.stdout:
            out.append(line)
            if answered is None and line.startswith("instruction "):
                answered = time.perf_counter() - started
        gdb.wait(SERVE_TIMEOUT_S)
        if answered is None:
            raise RuntimeError(f"gdb printed no answer to `monitor when`: {''.join(out)}")
        serve.communicate(timeout=SERVE_TIMEOUT_S)    # --clients 1: it exits after gdb detached
        return ServeTimes(waiting, answered)
    finally:
        if serve.poll() is None:
            serve.terminate()
            serve.wait(10)


@dataclass
class ModeRun:
    """The figures of one mode, raw samples (medians taken when printed)."""
    step_lat: list[float] = field(default_factory=list)
    step_from: list[int] = field(default_factory=list)       # the middle's distance past its checkpoint
    spread_lat: list[float] = field(default_factory=list)
    spread_distances: list[int] = field(default_factory=list)
    reverse_cont: list[float] = field(default_factory=list)
    reverse_cont_replayed: list[float] = field(default_factory=list)    # summaries off
    serve: list[ServeTimes] = field(default_factory=list)
    step_us: float = 0.0        # a stepping replay forward (timeline), us per instruction
    instructions: int = 0
    hit: int = 0

    def sample_reverse_steps(self, t: Timeline) -> None:
        """Figure 2 once: reverse-stepi from the middle of t, in a row and spread."""
        lat, distance = reverse_steps(t, t.last // 2, REVERSE_STEPS)
        self.step_lat += lat
        self.step_from.append(distance)
        lat, distances = reverse_steps_spread(t, t.last // 2, REVERSE_STEPS)
        self.spread_lat += lat
        self.spread_distances += distances


def fmt(value: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    return {"x": f"{value:.2f}x", "ms": f"{value * 1e3:.1f} ms", "s": f"{value:.2f} s"}[unit]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="repetitions of each timing; the median is printed")
    ap.add_argument("--increments", type=int, default=11000,
                    help="the exact race recording's increments=N (default 11000: about 1.2M instructions)")
    args = ap.parse_args()
    med = statistics.median
    began = time.perf_counter()

    facts = host_facts()
    if not facts.singlestep_cpl0:
        print("debug benchmark skipped: this host's KVM cannot single-step guest CPL0 (no stepping replay)")
        return 0
    if not takes_cmdline("race", "increments"):
        sys.exit("race.elf does not read increments=N from its command line: rebuild examples")
    if shutil.which("gdb") is None:
        sys.exit("gdb is not installed: figure 5 needs it")
    once = symbol(ONCE, KERNELS / "race.elf")
    warnings: list[str] = []

    fast, exact = ModeRun(), ModeRun()
    ratio: dict[str, list[float]] = {"race": [], "ticks": []}
    hits: dict[str, list[tuple[int, int, float]]] = {"race": [], "ticks": []}   # landmarks, bp hits, excess s
    cont_s, free_s, open_s, cont_rate, floors = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="rrstub-bench-") as tmp:
        runner = Runner(facts, Path(tmp))
        fast_path = ""
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}: fast recordings, replays, continue, reverse-stepi...",
                  file=sys.stderr, flush=True)
            floors.append(step_floor_us())
            for kernel in ("race", "ticks"):
                _, rec = runner.record(kernel, "fast", name=f"{kernel}-fast-{i}")
                rep = replay(rec.path)
                ratio[kernel].append(rep.host_seconds / rec.host_seconds)
                hits[kernel].append((rep.engine.landmarks, rep.engine.breakpoint_hits[0],
                                     rep.host_seconds - rec.host_seconds))
                if kernel == "race":
                    fast_path, free = rec.path, rep.host_seconds
            # 4: continue to the end, fresh timeline, against the free replay of the same file
            opened, t = timed(lambda: Timeline(fast_path))
            with t:
                seconds, stop = timed(t.cont)
                assert stop.kind == "end" and t.last == t.position, (stop, t.last)
                open_s.append(opened)
                cont_s.append(seconds)
                free_s.append(free)
                cont_rate.append(seconds / t.last * 1e6)
                fast.instructions = t.last
                # 2: reverse-stepi from the middle (the continue left checkpoints on the way)
                fast.sample_reverse_steps(t)
        fast.step_us = med(cont_rate)
        floor_us = med(floors)

        # 3, fast: the last round's recording, in a timeline that has been to its end
        print("reverse-continue, fast...", file=sys.stderr, flush=True)
        with Timeline(fast_path) as t:
            t.cont()
            fast.hit = find_hit(t, once)
            if fast.hit + DISTANCE > t.last:
                warnings.append(f"fast: the race recording has {t.last} instructions, {ONCE} runs at "
                                f"{fast.hit}: no room for reverse-continue across {DISTANCE:,} (no figure)")
            else:
                fast.reverse_cont = reverse_continues(t, fast.hit, args.rounds, warnings, "fast", True)
                fast.reverse_cont_replayed = reverse_continues(t, fast.hit, args.rounds, warnings, "fast", False)

        # exact: one longer recording for 3, and for 2 as comparison
        print(f"exact recording (increments={args.increments}), reverse-continue, reverse-stepi...",
              file=sys.stderr, flush=True)
        exact_record_s, rec = runner.record("race", "exact", f"increments={args.increments}", name="race-exact")
        exact_path = rec.path
        with Timeline(exact_path) as t:
            exact.instructions = t.last
            exact.hit = find_hit(t, once)
            if exact.hit + DISTANCE > t.last:
                warnings.append(f"exact: the race recording has {t.last} instructions, {ONCE} runs at "
                                f"{exact.hit}: no room for reverse-continue across {DISTANCE:,}; raise "
                                "--increments (no figure)")
                forward, _ = timed(lambda: t.goto(t.last))
                exact.step_us = forward / (t.last - exact.hit) * 1e6
            else:
                forward, _ = timed(lambda: t.goto(exact.hit + DISTANCE))
                exact.step_us = forward / DISTANCE * 1e6
                exact.reverse_cont = reverse_continues(t, exact.hit, args.rounds, warnings, "exact", True)
                exact.reverse_cont_replayed = reverse_continues(t, exact.hit, args.rounds, warnings, "exact",
                                                                False)
            for _ in range(args.rounds):
                exact.sample_reverse_steps(t)

        # 5: serve until gdb's first answer, both modes, alternating
        print("rrstub serve + gdb...", file=sys.stderr, flush=True)
        for _ in range(args.rounds):
            exact.serve.append(serve_and_ask(exact_path))
            fast.serve.append(serve_and_ask(fast_path))
    took = time.perf_counter() - began

    # -- the table --------------------------------------------------------------------------
    def verdict(values: list[Optional[float]], goal: float) -> str:
        shown = [v for v in values if v is not None]
        if not shown:
            return ""
        return "meets" if all(v <= goal for v in shown) else "MISSES"

    rc = {m: (med(r.reverse_cont) if r.reverse_cont else None) for m, r in (("exact", exact), ("fast", fast))}
    rcr = {m: (med(r.reverse_cont_replayed) if r.reverse_cont_replayed else None)
           for m, r in (("exact", exact), ("fast", fast))}
    step_med = {m: med(r.step_lat) for m, r in (("exact", exact), ("fast", fast))}
    step_p95 = {m: pct(r.step_lat, 0.95) for m, r in (("exact", exact), ("fast", fast))}
    spread_med = {m: med(r.spread_lat) for m, r in (("exact", exact), ("fast", fast))}
    spread_p95 = {m: pct(r.spread_lat, 0.95) for m, r in (("exact", exact), ("fast", fast))}
    answered = {m: med(s.answered for s in r.serve) for m, r in (("exact", exact), ("fast", fast))}
    waiting = {m: med(s.waiting for s in r.serve) for m, r in (("exact", exact), ("fast", fast))}
    cont_ratio = med(c / f for c, f in zip(cont_s, free_s))
    rows = [
        ("1. replay / record, race", None, med(ratio["race"]), "x", f"<= {REPLAY_RATIO_GOAL:g}x",
         verdict([med(ratio["race"])], REPLAY_RATIO_GOAL)),
        ("1. replay / record, ticks", None, med(ratio["ticks"]), "x", f"<= {REPLAY_RATIO_GOAL:g}x",
         verdict([med(ratio["ticks"])], REPLAY_RATIO_GOAL)),
        ("2. reverse-stepi x50, median", step_med["exact"], step_med["fast"], "ms",
         f"<= {REVERSE_STEP_GOAL_MS} ms (fast)", verdict([step_med["fast"]], REVERSE_STEP_GOAL_MS / 1e3)),
        ("2. reverse-stepi x50, p95", step_p95["exact"], step_p95["fast"], "ms", "", ""),
        ("2. reverse-stepi spread, median", spread_med["exact"], spread_med["fast"], "ms",
         f"<= {REVERSE_STEP_GOAL_MS} ms (fast)", verdict([spread_med["fast"]], REVERSE_STEP_GOAL_MS / 1e3)),
        ("2. reverse-stepi spread, p95", spread_p95["exact"], spread_p95["fast"], "ms", "", ""),
        ("3. reverse-continue across 1M", rc["exact"], rc["fast"], "s", f"<= {REVERSE_CONT_GOAL_S} s, both",
         verdict([rc["exact"], rc["fast"]], REVERSE_CONT_GOAL_S)),
        ("3.   the same, summaries off", rcr["exact"], rcr["fast"], "s", f"<= {REVERSE_CONT_GOAL_S} s, both",
         verdict([rcr["exact"], rcr["fast"]], REVERSE_CONT_GOAL_S)),
        ("4. continue to end / replay", None, cont_ratio, "x", f"<= {CONTINUE_RATIO_GOAL:g}",
         verdict([cont_ratio], CONTINUE_RATIO_GOAL)),
        ("5. serve start -> gdb's answer", answered["exact"], answered["fast"], "s", f"<= {SERVE_GOAL_S} s",
         verdict([answered["exact"], answered["fast"]], SERVE_GOAL_S)),
        ("5. serve start -> waiting line", waiting["exact"], waiting["fast"], "s", "", ""),
    ]
    print(f"rrstub debugging benchmark (medians of {args.rounds} rounds; host: "
          f"{facts.cpl0_instructions_per_s / 1e6:.2f} M CPL0 instructions/s live, "
          f"{facts.singlestep_us:.1f} us per single-step (cached probe), bare C single-step loop "
          f"{floor_us:.2f} us, median of the rounds)")
    print(f"recordings: race fast (default workload) {fast.instructions:,} instructions; race exact "
          f"increments={args.increments} {exact.instructions:,} instructions, recorded in {exact_record_s:.1f} s; "
          f"{ONCE} runs once, at instruction {fast.hit} (fast) / {exact.hit} (exact)")
    print()
    print(f"  {'figure':<32} {'exact':>10} {'fast':>10}   {'goal':<20} ")
    for label, e, f, unit, goal, v in rows:
        print(f"  {label:<32} {fmt(e, unit):>10} {fmt(f, unit):>10}   {goal:<20} {v}")
    print()
    print("bounded by (costs measured in this run):")
    for kernel in ("race", "ticks"):
        landmarks, bp, excess = (med(x[j] for x in hits[kernel]) for j in range(3))
        per = f"{excess / bp * 1e6:.1f} us per hit" if bp else f"{excess / max(landmarks, 1) * 1e3:.2f} ms per landmark"
        print(f"  1. {kernel}: the free replay finds {landmarks:.0f} landmarks with a hardware breakpoint at "
              f"their rip: {bp:.0f} hits ({bp / max(landmarks, 1):.1f} per landmark); replay - record = "
              f"{excess:.2f} s, {per} if the hits are all of it (each: an exit, then a step-over; a single "
              f"step alone {floor_us:.2f} us)")
    for mode, r in (("exact", exact), ("fast", fast)):
        print(f"  2. {mode}: a reverse-stepi restores the checkpoint before (one every {CHECKPOINT_EVERY}) and "
              f"steps forward: at {r.step_us:.1f} us per instruction, {CHECKPOINT_EVERY // 2} steps (the mean) = "
              f"{CHECKPOINT_EVERY // 2 * r.step_us / 1e3:.1f} ms, {CHECKPOINT_EVERY - 1} (the most) = "
              f"{(CHECKPOINT_EVERY - 1) * r.step_us / 1e3:.1f} ms; x50: the middle was "
              f"{', '.join(str(d) for d in r.step_from)} instructions past its checkpoint (per round); "
              f"spread: median {med(r.spread_distances):.0f} (n={len(r.spread_lat)})")
    intervals = DISTANCE // CHECKPOINT_EVERY
    for mode, r in (("exact", exact), ("fast", fast)):
        print(f"  3. {mode}: with summaries, {intervals} intervals are checked, not replayed, and only the one "
              f"holding the hit is: <= {CHECKPOINT_EVERY} x {r.step_us:.1f} us = "
              f"{CHECKPOINT_EVERY * r.step_us / 1e3:.0f} ms, twice (scan, then seek to the hit); without, the "
              f"scan steps every instruction once: {DISTANCE:,} x {r.step_us:.1f} us = "
              f"{DISTANCE * r.step_us / 1e6:.2f} s (+ a restore per {CHECKPOINT_EVERY}); at the bare C "
              f"single-step cost {DISTANCE * floor_us / 1e6:.2f} s")
    print(f"  4. continue steps all {fast.instructions:,} instructions ({med(cont_s):.2f} s, "
          f"{fast.step_us:.1f} us each) where the free replay runs the guest ({med(free_s):.2f} s); even at "
          f"the bare C single-step cost ({floor_us:.2f} us) the steps alone take "
          f"{fast.instructions * floor_us / 1e6:.2f} s = {fast.instructions * floor_us / 1e6 / med(free_s):.2f}x "
          "the free replay")
    print(f"  5. the waiting line comes after the interpreter's start, imports and the Timeline open "
          f"(in this process: {med(open_s) * 1e3:.0f} ms, fast); gdb's own part (start, connect, fetch the "
          f"kernel, monitor when) is {answered['exact'] - waiting['exact']:.2f} s (exact), "
          f"{answered['fast'] - waiting['fast']:.2f} s (fast)")
    for w in warnings:
        print(f"warning: {w}")
    print(f"(measured in {took:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
