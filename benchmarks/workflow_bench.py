"""Workflow figures: `rrstub trace` speed, and what markers cost while recording.

Records examples/build/race.elf in exact mode (--increments sets the length;
the default gives about 220k instructions) and measures, side by side in
this one run, each figure the median of --rounds repetitions:

  * trace speed, instructions per second, over the same 200k-instruction
    range in text and in jsonl (written to /dev/null, through the code
    `rrstub trace` runs: rrstub.trace.InstructionTrace and its LineWriter),
    next to plain replay of that range (the timeline replaying forward, what
    `rrstub serve` does on continue) and to a bare C loop of single steps;
  * marker cost while recording: the same exact race run recorded with
    --no-markers and with a marker every --marker-every seconds of guest
    time; markers taken, recording host time per extra marker (the host
    time difference, the --no-markers run scaled to the same instruction
    count, divided by the extra markers), stored bytes per incremental
    marker (`rrstub info --json`, markers[].stored_bytes), and the time of
    one capture (MarkerKeeper.capture) and of compressing and writing it,
    measured directly.

It prints figures and asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from record_bench import Runner, step_floor_us
from rrstub.hostfacts import host_facts
from rrstub.info import describe
from rrstub.markers import MarkerKeeper
from rrstub.recording import RecordingWriter
from rrstub.replay.timeline import Timeline
from rrstub.trace import InstructionTrace, LineWriter, format_json, format_text

TRACE_RANGE = 200_000
TRACE_FROM = 10_000
TRACE_TARGET = 20_000            # instructions/s


@contextmanager
def marker_clock(samples: list):
    """Appends (full, capture seconds, compress + write seconds) for each marker taken inside the block.

    (record_bench.marker_clock does the same for positional calls only.)
    """
    capture, add_marker = MarkerKeeper.capture, RecordingWriter.add_marker
    pending: list = []

    def timed_capture(keeper, *args, **kw):
        began = time.perf_counter()
        result = capture(keeper, *args, **kw)
        pending.append((kw.get("full", args[2] if len(args) > 2 else False), time.perf_counter() - began))
        return result

    def timed_add_marker(writer, *args, **kw):
        began = time.perf_counter()
        result = add_marker(writer, *args, **kw)
        if pending:
            full, capture_seconds = pending.pop()
            samples.append((full, capture_seconds, time.perf_counter() - began))
        return result

    MarkerKeeper.capture, RecordingWriter.add_marker = timed_capture, timed_add_marker
    try:
        yield
    finally:
        MarkerKeeper.capture, RecordingWriter.add_marker = capture, add_marker


def trace_rate(path: str, start: int, stop: int, fmt) -> float:
    with Timeline(path) as t, open(os.devnull, "w") as out:
        t.goto(start)
        writer = LineWriter(out, fmt)
        began = time.perf_counter()
        InstructionTrace(t).run(start, stop, writer)
        writer.flush()
        took = time.perf_counter() - began
    assert writer.count == stop - start, (writer.count, start, stop)
    return (stop - start) / took


def replay_rate(path: str, start: int, stop: int) -> float:
    with Timeline(path) as t:
        t.goto(start)
        began = time.perf_counter()
        out = t._run(stop, breaks=False, watches=False)
        took = time.perf_counter() - began
    assert out.reason == "until" and out.position == stop, out
    return (stop - start) / took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="repetitions of each timing; the median is printed")
    ap.add_argument("--increments", type=int, default=2000, help="race's increments per worker (run length)")
    ap.add_argument("--marker-every", type=float, default=0.001, metavar="SECONDS",
                    help="guest seconds between markers in the many-markers recording (default 0.001)")
    args = ap.parse_args()

    facts = host_facts()
    if not facts.singlestep_cpl0:
        print("workflow benchmark skipped: this host's KVM cannot single-step guest CPL0 (no exact mode)")
        return 0
    med = statistics.median
    cmdline = f"increments={args.increments}"
    with tempfile.TemporaryDirectory(prefix="rrstub-bench-") as tmp:
        runner = Runner(facts, Path(tmp))
        _, rec = runner.record("race", "exact", cmdline, name="trace")
        end = rec.outcome.position
        start = max(0, min(TRACE_FROM, end - TRACE_RANGE))
        stop = min(end, start + TRACE_RANGE)
        rates = [(trace_rate(rec.path, start, stop, format_text), trace_rate(rec.path, start, stop, format_json),
                  replay_rate(rec.path, start, stop)) for _ in range(args.rounds)]   # interleaved: same load
        text, jsonl, replay = (med(r[i] for r in rates) for i in range(3))
        floor_us = step_floor_us()

        plain, many, samples = [], [], []
        for k in range(args.rounds):
            _, r = runner.record("race", "exact", cmdline, name=f"plain{k}", marker_every_ns=0)
            plain.append((r.host_seconds, r.outcome.position, r.markers))
            with marker_clock(samples):
                _, r = runner.record("race", "exact", cmdline, name=f"many{k}",
                                     marker_every_ns=int(args.marker_every * 1e9))
            stored = [m["stored_bytes"] for m in describe(r.path)["markers"][1:]]
            many.append((r.host_seconds, r.outcome.position, r.markers, stored))

    print(f"rrstub workflow benchmark (medians of {args.rounds} rounds; race.elf {cmdline}, exact, "
          f"{end} instructions)")
    print()
    print(f"trace of instructions [{start}, {stop}) to /dev/null (target: >= {TRACE_TARGET / 1e3:.0f}k "
          "instructions/s)")
    for label, rate in (("trace, text", text), ("trace, jsonl", jsonl)):
        verdict = "meets" if rate >= TRACE_TARGET else "MISSES"
        print(f"  {label:<14} {rate / 1e3:6.1f}k instructions/s   {replay / rate:4.1f}x the replay's time   "
              f"{verdict} target")
    print(f"  {'plain replay':<14} {replay / 1e3:6.1f}k instructions/s   (the timeline replaying the same range)")
    print(f"  {'single steps':<14} {1e3 / floor_us:6.1f}k instructions/s   (a bare C loop of single-step "
          f"KVM_RUNs, {floor_us:.2f} us each: the ceiling)")
    print()
    extra = [m[2] - p[2] for p, m in zip(plain, many)]
    # The two runs are live runs of a racy guest: scale the --no-markers time to the same length.
    per_marker = [(m[0] - p[0] * m[1] / p[1]) / x for p, m, x in zip(plain, many, extra) if x > 0]
    stored = [b for m in many for b in m[3]]
    incremental = [s for s in samples if not s[0]]
    print(f"markers while recording exact (no markers vs one every {args.marker_every:g} guest s)")
    print(f"  --no-markers        {med(p[0] for p in plain):6.2f} s host, {med(p[2] for p in plain):.0f} "
          f"marker (the initial one)")
    print(f"  --marker-every {args.marker_every:<5g}{med(m[0] for m in many):6.2f} s host, "
          f"{med(m[2] for m in many):.0f} markers")
    if per_marker:
        print(f"  host time per extra marker   {med(per_marker) * 1e3:7.2f} ms   (recording time difference / "
              "extra markers)")
    if stored:
        print(f"  stored bytes per marker      {statistics.mean(stored):7.0f} B    (mean of {len(stored)} "
              f"incremental markers; median {med(stored):.0f} B)")
    if incremental:
        print(f"  one capture, measured        {med(s[1] for s in incremental) * 1e3:7.2f} ms capture + "
              f"{med(s[2] for s in incremental) * 1e3:.2f} ms compress/write   (median of {len(incremental)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
