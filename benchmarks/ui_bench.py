"""The page's latencies, measured by calling the API as the page does (issue 14).

Records examples/build/race.elf in exact mode (--increments, default 100000
per worker: about 10M instructions) unless --recording names one, starts
`rrstub ui REC --port 0` as a user does, and measures:

  1. preview while dragging: a pointer sweeping the timeline from 10% to 90%
     in --moves steps; each step asks `state?quick=1` for the position under
     the pointer, one request in flight (as the page: the next move is sent
     when the answer came).  Latency from sending to the parsed answer,
     median and p95, and how many answers were the exact position (the rest
     showed the nearest checkpoint's state, naming its position);
  2. the drop: `state` (no quick) at --drops positions spread over the
     recording: the time to the exact state (the refine);
  3. playback at realtime and at 10x: for --play seconds, as the page plays:
     each answer's guest time and the time elapsed give the next position to
     ask for; the figure is guest time advanced / host time (1.0 keeps pace);
  4. two drags at once (two tabs, threads): the p95 of each.

Figures 1, 2 and 4 are measured twice: right after opening (the server has
only just started reading the recording in the background), and once the
background read is done (a checkpoint every 4096 instructions everywhere).
Goal (issue 14): p95 of 1 <= 200 ms; 3 keeps pace at realtime.  It prints
figures and asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RACE = ROOT / "examples" / "build" / "race.elf"


class Ui:
    def __init__(self, path: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "rrstub", "ui", str(path), "--port", "0"], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        line = self.proc.stdout.readline().decode()
        m = re.search(r"at (http://\S+/)", line)
        if not m:
            sys.exit(f"rrstub ui did not start: {line!r}")
        self.url = m.group(1)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=600) as r:
            return json.loads(r.read())

    def timed(self, path: str) -> tuple[float, dict]:
        t0 = time.perf_counter()
        answer = self.get(path)
        return time.perf_counter() - t0, answer

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]


def drag(ui: Ui, first: int, last: int, moves: int, client: str, offset: float = 0.0) -> tuple[list[float], int]:
    times, exact = [], 0
    span = last - first
    for i in range(moves):
        frac = 0.1 + 0.8 * ((i / max(1, moves - 1) + offset) % 1.0)
        pos = first + int(span * frac)
        dt, s = ui.timed(f"/api/rec/r0/state?pos={pos}&quick=1&client={client}")
        times.append(dt)
        exact += s["exact"]
    return times, exact


def drops(ui: Ui, first: int, last: int, count: int) -> list[float]:
    out = []
    for i in range(count):
        pos = first + (last - first) * (2 * i + 1) // (2 * count) + 977 * i    # off the checkpoint grid
        dt, s = ui.timed(f"/api/rec/r0/state?pos={min(pos, last)}&client=drop")
        out.append(dt)
    return out


def play(ui: Ui, first: int, last: int, speed: float, seconds: float, rate: float) -> float:
    """Guest time advanced per host second x speed, playing as the page does from 20% in."""
    pos = first + (last - first) // 5
    s = ui.get(f"/api/rec/r0/state?pos={pos}&client=play")
    g0, t0 = s["guest_ns"], time.perf_counter()
    local = rate
    while time.perf_counter() - t0 < seconds and not s["at_end"]:
        want_ns = g0 + (time.perf_counter() - t0) * speed * 1e9
        step = max(1, int((want_ns - s["guest_ns"]) * local / 1e9)) if want_ns > s["guest_ns"] else 0
        if step == 0:
            time.sleep(0.01)
            continue
        nxt = ui.get(f"/api/rec/r0/state?pos={min(last, s['position'] + step)}&client=play")
        if nxt["guest_ns"] > s["guest_ns"]:
            local = 0.5 * local + 0.5 * (nxt["position"] - s["position"]) / ((nxt["guest_ns"] - s["guest_ns"]) / 1e9)
        s = nxt
    elapsed = time.perf_counter() - t0
    return (s["guest_ns"] - g0) / 1e9 / elapsed / speed


def measure(ui: Ui, info: dict, args, label: str) -> None:
    first, last = info["first"], info["last"]
    times, exact = drag(ui, first, last, args.moves, "drag")
    print(f"  {label}: drag preview (quick) median {statistics.median(times) * 1e3:.1f} ms, "
          f"p95 {p95(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms; {exact}/{len(times)} exact")
    d = drops(ui, first, last, args.drops)
    print(f"  {label}: drop (exact state) median {statistics.median(d) * 1e3:.1f} ms, p95 {p95(d) * 1e3:.1f} ms, "
          f"max {max(d) * 1e3:.1f} ms")
    results = {}

    def tab(name, offset):
        results[name] = drag(ui, first, last, args.moves // 2, name, offset)[0]
    threads = [threading.Thread(target=tab, args=(f"tab{i}", 0.37 * i)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    print(f"  {label}: two tabs dragging at once: p95 {p95(results['tab0']) * 1e3:.1f} ms and "
          f"{p95(results['tab1']) * 1e3:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recording", type=Path, help="an existing recording (default: record race, exact)")
    ap.add_argument("--increments", type=int, default=100000)
    ap.add_argument("--moves", type=int, default=120)
    ap.add_argument("--drops", type=int, default=10)
    ap.add_argument("--play", type=float, default=5.0, help="seconds of each playback")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.recording
        if path is None:
            path = Path(tmp) / "race.rrr"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "rrstub", "record", str(RACE), "-o", str(path), "--mode", "exact",
                            "--cmdline", f"increments={args.increments}", "-q"], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
            print(f"recorded race exact in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        ui = Ui(path)
        try:
            info = ui.get("/api/rec/r0")
            print(f"{path.name}: instructions {info['first']}..{info['last']}, {len(info['markers'])} markers; "
                  f"server up in {time.perf_counter() - t0:.2f} s")
            measure(ui, info, args, "just opened")
            t1 = time.perf_counter()
            while not ui.get("/api/rec/r0")["prefetch"]["done"]:
                time.sleep(1)
            read_s = time.perf_counter() - t0
            print(f"  background read of the whole recording done {read_s:.0f} s after start "
                  f"({(info['last'] - info['first']) / read_s / 1e3:.0f}k instructions/s, waited {time.perf_counter() - t1:.0f} s here)")
            measure(ui, info, args, "after the read")
            rate = info["instructions_per_guest_s"]
            for speed in (1.0, 10.0):
                pace = play(ui, info["first"], info["last"], speed, args.play, rate)
                print(f"  playback at {speed:g}x: x{pace:.2f} of the asked pace "
                      f"({info['instructions_per_guest_s'] / 1e6:.2f}M instructions per guest second)")
        finally:
            ui.close()


if __name__ == "__main__":
    main()
