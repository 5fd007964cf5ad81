"""Record/replay figures, measured side by side in one run (`make bench`, after vmm_bench.py).

Prints, for examples/build/race.elf and ticks.elf, each figure the median of
--rounds repetitions, all in this process through the same calls the CLI
makes (vmm.machine.Machine.run for `rrstub run`, rrstub.session.record and
replay for `rrstub record` and `replay`), timed from the call to its return:

  * live time against record time in fast and in exact mode (record/live),
    exact on a smaller workload (--cmdline increments=N / work=N) because it
    steps every instruction, and exact mode's instructions per host second;
  * replay time against record time, per mode;
  * the log of ticks per guest second, from what `rrstub info --json` shows
    (rrstub.info.describe): the event stream apart from the whole file, with
    the default markers and with --no-markers;
  * marker sizes (stored) and the time to take one: capturing the machine
    state, then compressing and writing the chunk, for the full initial
    marker and for the incremental ones of a recording with markers every
    0.1 s of guest time;

next to the targets.  It prints figures and asserts nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rrstub import session
from rrstub.hostfacts import HostFacts, host_facts
from rrstub.info import describe
from rrstub.markers import MarkerKeeper
from rrstub.recording import RecordingWriter
from vmm import boot
from vmm.machine import DEFAULT_MEM, Machine

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "examples" / "build"

# The exact-mode workloads, and the name of the boot argument each guest reads.
EXACT_WORK = {"race": ("increments", 2000), "ticks": ("work", 15000)}
LOG_TICKS_WORK = 250_000        # ticks' work for the log figures: ~2.5 s of guest time in fast mode
MARKER_EVERY_NS = 100_000_000   # the marker-timing recordings

FAST_OVERHEAD_TARGET = 0.10
EXACT_RATE_TARGET = 250_000
TICKS_LOG_TARGET = 1024         # bytes per guest second, without markers


class NullSink:
    def write(self, data):
        return len(data)

    def flush(self):
        pass


def takes_cmdline(kernel: str, name: str) -> bool:
    """Whether the built guest reads ``name=N`` from its command line (the key is a C string in it)."""
    return b"\0" + name.encode() + b"\0" in (KERNELS / f"{kernel}.elf").read_bytes()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


@dataclass
class Runner:
    """Live, record and replay one guest as the CLI would on this host."""
    facts: HostFacts
    work_dir: Path

    def live(self, kernel: str, cmdline: str = "") -> float:
        image = boot.load_kernel_file(KERNELS / f"{kernel}.elf")

        def run():
            with Machine(image, DEFAULT_MEM, cmdline, serial_out=NullSink()) as m:
                return m.run(timeout=600)
        return timed(run)[0]

    def record(self, kernel: str, mode: str, cmdline: str = "", name: str = "bench",
               marker_every_ns: int = session.DEFAULT_MARKER_EVERY_NS) -> tuple[float, session.RecordResult]:
        path = self.work_dir / f"{name}.rrr"
        return timed(lambda: session.record(
            str(KERNELS / f"{kernel}.elf"), str(path), mode, mem_size=DEFAULT_MEM, cmdline=cmdline,
            serial_out=NullSink(), timeout=600, marker_every_ns=marker_every_ns,
            nominal_ps=int(1e12 / self.facts.cpl0_instructions_per_s),
            cpl3_landmarks=self.facts.singlestep_cpl3))

    def replay(self, path: str) -> float:
        seconds, result = timed(lambda: session.replay(path, serial_out=NullSink()))
        assert result.verified_end, f"replay of {path} did not match its recording: {result.outcome}"
        return seconds


@dataclass
class ModeFigures:
    live: float
    record: float
    replay: float
    instructions_per_s: float     # exact only: end position / the recorder's host seconds


def measure_mode(runner: Runner, kernel: str, mode: str, cmdline: str, rounds: int) -> ModeFigures:
    live, rec, rep, rate = [], [], [], []
    for _ in range(rounds):
        live.append(runner.live(kernel, cmdline))
        seconds, result = runner.record(kernel, mode, cmdline)
        rec.append(seconds)
        rate.append(result.outcome.position / result.host_seconds)
        rep.append(runner.replay(result.path))
    med = statistics.median
    return ModeFigures(med(live), med(rec), med(rep), med(rate))


@dataclass
class LogFigures:
    guest_s: float
    markers: int
    events_stored: int
    file_bytes: int


def measure_log(runner: Runner, mode: str, cmdline: str, markers: bool) -> LogFigures:
    _, result = runner.record("ticks", mode, cmdline, name=f"log-{mode}-{markers}",
                              marker_every_ns=session.DEFAULT_MARKER_EVERY_NS if markers else 0)
    info = describe(result.path)
    return LogFigures(info["end"]["guest_s"], len(info["markers"]), info["sizes"]["events"]["stored"],
                      info["file_bytes"])


@contextmanager
def marker_clock(samples: list):
    """Appends (full, capture seconds, write seconds) for each marker taken inside the block."""
    capture, add_marker = MarkerKeeper.capture, RecordingWriter.add_marker
    pending: list = []

    def timed_capture(keeper, position, engine, full, **kw):
        seconds, result = timed(lambda: capture(keeper, position, engine, full, **kw))
        pending.append((full, seconds))
        return result

    def timed_add_marker(writer, meta, blob):
        seconds, result = timed(lambda: add_marker(writer, meta, blob))
        full, capture_seconds = pending.pop()
        samples.append((full, capture_seconds, seconds))
        return result

    MarkerKeeper.capture, RecordingWriter.add_marker = timed_capture, timed_add_marker
    try:
        yield
    finally:
        MarkerKeeper.capture, RecordingWriter.add_marker = capture, add_marker


@dataclass
class MarkerFigures:
    full_bytes: int
    incremental_bytes: float
    incremental_pages: float
    full_ms: tuple[float, float]          # (capture, compress + write)
    incremental_ms: tuple[float, float]
    incremental_count: int


def measure_markers(runner: Runner, mode: str, cmdline: str) -> MarkerFigures:
    samples: list = []
    with marker_clock(samples):
        _, result = runner.record("ticks", mode, cmdline, name=f"markers-{mode}",
                                  marker_every_ns=MARKER_EVERY_NS)
    markers = describe(result.path)["markers"]
    med = statistics.median
    inc = [s for s in samples if not s[0]]
    full = [s for s in samples if s[0]]
    return MarkerFigures(
        full_bytes=markers[0]["stored_bytes"],
        incremental_bytes=med([m["stored_bytes"] for m in markers[1:]]) if markers[1:] else 0,
        incremental_pages=med([m["pages"] for m in markers[1:]]) if markers[1:] else 0,
        full_ms=(full[0][1] * 1e3, full[0][2] * 1e3),
        incremental_ms=((med(s[1] for s in inc) * 1e3, med(s[2] for s in inc) * 1e3) if inc else (0, 0)),
        incremental_count=len(inc))


def step_floor_us(steps: int = 100_000) -> float:
    """Microseconds per instruction of n single-step KVM_RUNs in C with nothing else done."""
    from vmm.kvm import Kvm
    from vmm.probe import DEC_ECX, OUT_DONE, ProbeVm, jnz_back, mov_ecx
    from vmm._native import lib
    with Kvm() as kvm, ProbeVm(kvm, mov_ecx(steps * 2) + DEC_ECX + jnz_back(4) + OUT_DONE) as p:
        p.vcpu.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP)
        start = time.perf_counter()
        p.vcpu.run_n(steps)
        return (time.perf_counter() - start) / steps * 1e6


def ratio_line(label: str, live: float, record: float, replay: float) -> str:
    return (f"  {label:<22} live {live:6.2f} s   record {record:6.2f} s ({record / live:5.2f}x live)   "
            f"replay {replay:6.2f} s ({replay / record:5.2f}x record)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="repetitions of each timing; the median is printed")
    args = ap.parse_args()

    facts = host_facts()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="rrstub-bench-") as tmp:
        runner = Runner(facts, Path(tmp))
        fast = {k: measure_mode(runner, k, "fast", "", args.rounds) for k in ("race", "ticks")}
        exact: dict[str, tuple[str, ModeFigures]] = {}
        if not facts.singlestep_cpl0:
            notes.append("exact mode skipped: this host's KVM cannot single-step guest CPL0")
        else:
            for kernel, (key, n) in EXACT_WORK.items():
                if not takes_cmdline(kernel, key):
                    notes.append(f"exact {kernel} skipped: {kernel}.elf does not read {key}=N from its "
                                 "command line (rebuild examples), and its full run is too long to step")
                    continue
                cmdline = f"{key}={n}"
                exact[kernel] = (cmdline, measure_mode(runner, kernel, "exact", cmdline, args.rounds))

        log_cmdline = f"work={LOG_TICKS_WORK}" if takes_cmdline("ticks", "work") else ""
        logs = {("fast", m): measure_log(runner, "fast", log_cmdline, m) for m in (True, False)}
        marker_figures = {"fast": measure_markers(runner, "fast", log_cmdline)}
        if "ticks" in exact:
            exact_cmdline = exact["ticks"][0]
            # The full ticks run (about 0.5 guest s): chunk framing, paid per host second, would
            # dominate a shorter one.
            logs.update({("exact", m): measure_log(runner, "exact", "", m) for m in (True, False)})
            marker_figures["exact"] = measure_markers(runner, "exact", exact_cmdline)

    print(f"rrstub record/replay benchmark (medians of {args.rounds} rounds; host: "
          f"{facts.cpl0_instructions_per_s / 1e6:.2f} M CPL0 instructions/s live, "
          f"{facts.singlestep_us:.1f} us per single-step)")
    print()
    print(f"fast mode, full workloads (target: record <= {1 + FAST_OVERHEAD_TARGET:.2f}x live)")
    for kernel, f in fast.items():
        verdict = "meets" if f.record <= f.live * (1 + FAST_OVERHEAD_TARGET) else "MISSES"
        print(ratio_line(kernel, f.live, f.record, f.replay) + f"   {verdict} target")
    print()
    print(f"exact mode, smaller workloads (target: >= {EXACT_RATE_TARGET / 1e3:.0f}k instructions/s recording)")
    floor_us = step_floor_us()
    print(f"  ceiling here: a bare C loop of single-step KVM_RUNs costs {floor_us:.2f} us per instruction "
          f"= {1e6 / floor_us / 1e3:.0f}k instructions/s")
    for kernel, (cmdline, f) in exact.items():
        verdict = "meets" if f.instructions_per_s >= EXACT_RATE_TARGET else "MISSES"
        print(ratio_line(f"{kernel} {cmdline}", f.live, f.record, f.replay))
        print(f"  {'':<22} {f.instructions_per_s / 1e3:6.0f}k instructions/s recording   {verdict} target")
    print()
    print(f"log of ticks, stored bytes per guest second (target: --no-markers event stream <= "
          f"{TICKS_LOG_TARGET} B/s)")
    for (mode, with_markers), g in logs.items():
        cmdline = log_cmdline if mode == "fast" else "(default)"
        label = f"{mode}, {'default markers' if with_markers else '--no-markers'}"
        events_rate = g.events_stored / g.guest_s
        verdict = "" if with_markers else ("   meets target" if events_rate <= TICKS_LOG_TARGET
                                           else "   MISSES target")
        print(f"  {label:<26} {cmdline:<12} {g.guest_s:5.2f} guest s, markers {g.markers}: event stream "
              f"{events_rate:7.0f} B/s, whole file {g.file_bytes / g.guest_s:7.0f} B/s{verdict}")
        if with_markers and g.markers == 1:
            notes.append(f"the {mode} ticks run lasts {g.guest_s:.2f} guest s, less than the default "
                         "marker interval (1 s): its two log rows differ by noise only")
    print("  (whole file = kernel, markers, events, index: the one-off parts weigh more in short runs)")
    print()
    print(f"markers (ticks, one every {MARKER_EVERY_NS / 1e9:g} guest s; time = capture + compress/write)")
    for mode, m in marker_figures.items():
        print(f"  {mode:<6} full        {m.full_bytes:8d} bytes stored   "
              f"{m.full_ms[0]:6.2f} + {m.full_ms[1]:6.2f} ms")
        if m.incremental_count:
            print(f"  {mode:<6} incremental {m.incremental_bytes:8.0f} bytes stored   "
                  f"{m.incremental_ms[0]:6.2f} + {m.incremental_ms[1]:6.2f} ms   "
                  f"(median of {m.incremental_count}, {m.incremental_pages:.0f} dirty pages)")
        else:
            print(f"  {mode:<6} incremental  none taken: the run was shorter than one marker interval")
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
