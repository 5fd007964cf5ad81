"""The index's figures (issue 15), measured side by side on one recording in one run.

Records examples/build/race.elf in exact mode (--increments, default 100000
per worker: about 11M instructions) unless --recording names one, then:

  1. plain replay: `rrstub replay REC`, instructions per second;
  2. `rrstub index REC --workers 1`: per-worker throughput (the recording's
     instructions over the sum of the segments' replay seconds, and over the
     whole command's wall time), against 1;
  3. `rrstub index REC --workers 2`: wall time against 2 (the speed-up),
     and the index's size per million instructions;
  4. `who-wrote counter`: the query alone in an open index (median and max
     of --queries), and the whole `rrstub query ... who-wrote counter`
     command (a new Python process: imports, DuckDB, the recording's digest).

Goals: 2 >= 0.5x 1; 2-worker speed-up >= 1.7x; 4 <= 100 ms.  Prints figures,
asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rrstub(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rrstub", *args], capture_output=True, text=True, cwd=ROOT)


def timed(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    start = time.monotonic()
    r = rrstub(*args)
    return time.monotonic() - start, r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recording", help="an exact recording of race.elf to measure (default: record one)")
    p.add_argument("--increments", type=int, default=100000)
    p.add_argument("--queries", type=int, default=50)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="index-bench-"))
    rec = Path(args.recording) if args.recording else tmp / "race.rrr"
    if not args.recording:
        print(f"recording race.elf, increments={args.increments}, exact ...", flush=True)
        r = rrstub("record", str(ROOT / "examples/build/race.elf"), "-o", str(rec), "--mode", "exact",
                   "--cmdline", f"increments={args.increments}", "-q")
        if not rec.exists():
            print(r.stderr)
            return 1
    info = json.loads(rrstub("info", str(rec), "--json").stdout)
    n = info["end"]["position"] - info["markers"][0]["position"]
    print(f"{rec}: {n:,} instructions, {len(info['markers'])} markers")

    seconds, r = timed("replay", str(rec))
    replay_rate = n / seconds
    print(f"1. rrstub replay: {seconds:.1f} s, {replay_rate:,.0f} instructions/s", flush=True)

    figures = {}
    for workers in (1, 2):
        out = tmp / f"w{workers}.index"
        seconds, r = timed("index", str(rec), "-o", str(out), "--workers", str(workers), "--json")
        if r.returncode != 0:
            print(r.stderr)
            return 1
        meta = json.loads(r.stdout)
        busy = sum(s["seconds"] for s in meta["segments"])
        figures[workers] = (seconds, meta, busy)
        print(f"   rrstub index --workers {workers}: {seconds:.1f} s wall, segments' replay {busy:.1f} s in all",
              flush=True)
    wall1, meta1, busy1 = figures[1]
    wall2, meta2, _ = figures[2]
    print(f"2. index throughput per worker: {n / busy1:,.0f} instructions/s replaying segments "
          f"({n / busy1 / replay_rate:.2f}x replay), {n / wall1:,.0f}/s for the whole command "
          f"({n / wall1 / replay_rate:.2f}x); goal >= 0.5x")
    print(f"3. 2 workers: {wall2:.1f} s against {wall1:.1f} s with 1: speed-up {wall1 / wall2:.2f}x "
          f"(goal >= 1.7x); the longest segment is "
          f"{max(s['end'] - s['start'] for s in meta2['segments']) / n:.0%} of the recording")
    print(f"   index size {meta2['bytes']:,} bytes: {meta2['bytes'] / (n / 1e6):,.0f} bytes per million "
          f"instructions; undecoded steps {meta2['undecoded']}, dropped {meta2['dropped']}")

    sys.path.insert(0, str(ROOT))
    from rrstub.index.query import Index
    with Index(str(rec), str(tmp / "w2.index")) as ix:
        address = ix.address("counter")
        times = []
        for _ in range(args.queries):
            start = time.perf_counter()
            w = ix.who_wrote(address, 1)
            times.append(time.perf_counter() - start)
        rows = ix.con.execute("SELECT count(*) FROM writes").fetchone()[0]
    print(f"4. who-wrote counter in an open index ({rows:,} writes): median "
          f"{1000 * statistics.median(times):.1f} ms, max {1000 * max(times):.1f} ms "
          f"over {args.queries} (goal <= 100 ms); answer: position {w.pos}, {w.where}")
    cli = []
    for _ in range(5):
        seconds, r = timed("query", str(rec), "--index", str(tmp / "w2.index"), "who-wrote", "counter")
        cli.append(seconds)
    print(f"   the whole `rrstub query who-wrote counter` command: median {1000 * statistics.median(cli):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
