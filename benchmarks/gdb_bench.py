"""Debugger figures: reverse-stepi latency, reverse-continue time, forward continue with breakpoints.

Records examples/build/race.elf in exact mode (--increments sets the length;
the default gives about 11M instructions), opens it as a replay timeline
(rrstub.replay.timeline, what `rrstub serve` serves) and measures, side by
side in this one run:

  * reverse-stepi latency, median and p95, when the nearest checkpoint
    before the target is 1, 512, 2048 and 4095 instructions back (the
    timeline keeps one every CHECKPOINT_EVERY instructions wherever replay
    has been), then for 200 consecutive reverse-stepi, and through the GDB
    server over TCP (`bs` packets, round trip);
  * reverse-continue across 1M and 10M instructions: from that far after
    the only hit of a breakpoint back to it;
  * forward continue speed over 1M instructions with 0, 1, 4 and 8
    breakpoints that are never hit (addresses of exception stubs).

Targets on this host (issue 4): reverse-stepi median <= 50 ms,
reverse-continue across 1M instructions <= 5 s.  It prints figures and
asserts nothing.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rrstub import session
from rrstub.gdbproto.server import serve
from rrstub.replay.timeline import CHECKPOINT_EVERY, Timeline

ROOT = Path(__file__).resolve().parent.parent
RACE = ROOT / "examples" / "build" / "race.elf"
REVERSE_STEP_TARGET_MS = 50
REVERSE_CONTINUE_1M_TARGET_S = 5


def symbols(elf: Path) -> dict[str, int]:
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    return {parts[2]: int(parts[0], 16) for parts in (line.split() for line in out.splitlines()) if len(parts) == 3}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1e3:6.1f} ms, p95 {pct(values, 0.95) * 1e3:6.1f} ms (n={len(values)})"


def reverse_step_by_distance(t: Timeline, base: int, samples: int) -> None:
    print(f"reverse-stepi latency by distance from the previous checkpoint (every {CHECKPOINT_EVERY}):")
    for distance in (1, 512, 2048, CHECKPOINT_EVERY - 1):
        lat = []
        for k in range(samples):
            target = base + k * 7 * CHECKPOINT_EVERY + distance
            t.goto(target + 1)
            started = time.perf_counter()
            t.reverse_step()
            lat.append(time.perf_counter() - started)
            assert t.position == target
        print(f"  {distance:5d} back: {ms(lat)}")


def reverse_step_run(t: Timeline, start: int, n: int) -> list[float]:
    t.goto(start)
    lat = []
    for _ in range(n):
        started = time.perf_counter()
        t.reverse_step()
        lat.append(time.perf_counter() - started)
    return lat


def reverse_step_over_tcp(t: Timeline, start: int, n: int) -> list[float]:
    t.goto(start)
    ports: list[int] = []
    ready = threading.Event()
    server = threading.Thread(target=serve, args=(t, "127.0.0.1", 0),
                              kwargs={"ready": lambda p: (ports.append(p), ready.set()), "clients": 1},
                              daemon=True)
    server.start()
    ready.wait(10)
    lat = []
    with socket.create_connection(("127.0.0.1", ports[0])) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as gdb does
        def ask(payload: bytes) -> None:
            s.sendall(b"$" + payload + b"#" + f"{sum(payload) & 0xFF:02x}".encode())
            buf = b""
            while b"#" not in buf or len(buf) < buf.index(b"#") + 3:
                buf += s.recv(4096)
                buf = buf.lstrip(b"+")
        ask(b"QStartNoAckMode")
        s.sendall(b"+")   # the last ack gdb sends
        for _ in range(n):
            started = time.perf_counter()
            ask(b"bs")
            lat.append(time.perf_counter() - started)
        s.sendall(b"$D#44")
    server.join(10)
    return lat


def reverse_continue(t: Timeline, hit: int, distance: int) -> None:
    if hit + distance > t.last:
        print(f"  across {distance / 1e6:g}M: the recording is too short ({t.last} instructions); "
              "raise --increments")
        return
    t.goto(hit + distance)
    started = time.perf_counter()
    stop = t.reverse_cont()
    took = time.perf_counter() - started
    ok = "" if (stop.kind, stop.position) == ("break", hit) else f" (UNEXPECTED stop {stop})"
    target = f"  (target <= {REVERSE_CONTINUE_1M_TARGET_S} s)" if distance == 1_000_000 else ""
    print(f"  across {distance / 1e6:g}M instructions: {took:6.2f} s = "
          f"{distance / took / 1e3:.0f}k instructions/s{target}{ok}")


def forward_with_breakpoints(t: Timeline, never: list[int], start: int, length: int) -> None:
    print(f"forward continue over {length / 1e6:g}M instructions with breakpoints that are never hit:")
    for count in (0, 1, 4, 8):
        t.goto(start)
        for a in never[:count]:
            t.add_breakpoint(a)
        started = time.perf_counter()
        out = t._run(start + length, breaks=True, watches=False)
        took = time.perf_counter() - started
        for a in never[:count]:
            t.remove_breakpoint(a)
        assert out.reason == "until", out
        print(f"  {count} breakpoints: {took:6.2f} s = {length / took / 1e3:.0f}k instructions/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--increments", type=int, default=100_000,
                    help="race's increments=N (default 100000: about 11M instructions, ~80 s to record)")
    ap.add_argument("--samples", type=int, default=15, help="reverse-stepi samples per distance")
    args = ap.parse_args()
    if not RACE.exists():
        sys.exit(f"{RACE} is missing: run `make kernels` first")
    sym = symbols(RACE)
    with tempfile.TemporaryDirectory() as tmp:
        rec = str(Path(tmp) / "race.rrr")
        print(f"recording race (exact, increments={args.increments})...", flush=True)
        started = time.perf_counter()
        r = session.record(str(RACE), rec, "exact", mem_size=64 << 20, cmdline=f"increments={args.increments}",
                           serial_out=open("/dev/null", "wb"))
        took = time.perf_counter() - started
        print(f"  {r.outcome.position} instructions in {took:.1f} s ({r.outcome.position / took / 1e3:.0f}k/s)")
        with Timeline(rec) as t:
            t.add_breakpoint(sym["pit_start_periodic"])
            stop = t.cont()
            t.remove_breakpoint(sym["pit_start_periodic"])
            hit = stop.position
            print(f"pit_start_periodic runs once, at instruction {hit}")

            forward_with_breakpoints(t, [sym[f"trap_stub_{n}"] for n in range(10, 18)], hit, 1_000_000)

            reverse_step_by_distance(t, (hit // CHECKPOINT_EVERY + 5) * CHECKPOINT_EVERY, args.samples)
            lat = reverse_step_run(t, hit + 300_000, 200)
            print(f"200 consecutive reverse-stepi: {ms(lat)}  (target median <= {REVERSE_STEP_TARGET_MS} ms)")
            lat = reverse_step_over_tcp(t, hit + 400_000, 50)
            print(f"reverse-stepi through the GDB server over TCP: {ms(lat)}")

            print("reverse-continue back to the only hit of a breakpoint:")
            t.add_breakpoint(sym["pit_start_periodic"])
            for distance in (1_000_000, 10_000_000):
                reverse_continue(t, hit, distance)
            print(f"checkpoints in memory: {len(t.checkpoints)}, page history {t.pages.stored_bytes >> 20} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
