"""What "every instruction its own stop" costs the exact engine, measured side by side in one run.

The exact engine splits the steps KVM would join (an interrupt delivery and
the handler's first instruction, an iretq and the instruction it returns
to, a faulting instruction and its handler's first instruction): it arms
execution breakpoints at each step's possible landings (native/rrnative.c).
Recordings made before that (config ``positions`` 1) replay with plain
single steps.  This script replays, in alternating rounds in this process:

  * tests/data/race-positions1.rrr: race, increments=150, plain single steps;
  * a fresh exact recording of the same kernel, command line, memory size and
    marker interval, split steps;

and prints each one's replay rate (instructions per host second, the median
of --rounds) and their ratio.  It prints figures and asserts nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rrstub import session
from rrstub.recording import Recording

ROOT = Path(__file__).resolve().parent.parent
OLD = ROOT / "tests" / "data" / "race-positions1.rrr"
KERNEL = ROOT / "examples" / "build" / "race.elf"


class NullSink:
    def write(self, data):
        return len(data)

    def flush(self):
        pass


def replay_rate(path: Path) -> float:
    start = time.perf_counter()
    result = session.replay(str(path), serial_out=NullSink())
    seconds = time.perf_counter() - start
    assert result.verified_end, f"replay of {path} did not match its recording: {result.outcome}"
    return result.outcome.position / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="replays of each recording; the median is printed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        new = Path(tmp) / "race.rrr"
        old = Recording.open(str(OLD))
        config = old.config   # the same machine: memory size and marker interval decide the fixed costs
        old.close()
        recorded = session.record(str(KERNEL), str(new), "exact", mem_size=config["mem_size"],
                                  cmdline=config["cmdline"], marker_every_ns=config["marker_every_ns"],
                                  serial_out=NullSink(), timeout=600)
        old_rates, new_rates = [], []
        for _ in range(args.rounds):
            old_rates.append(replay_rate(OLD))
            new_rates.append(replay_rate(new))
    med = statistics.median
    old_rate, new_rate = med(old_rates), med(new_rates)
    print(f"exact replay of race {config['cmdline']} (medians of {args.rounds} alternating rounds)")
    print(f"  plain single steps (positions 1)  {old_rate / 1e3:7.1f}k instructions/s")
    print(f"  split steps (positions 2)         {new_rate / 1e3:7.1f}k instructions/s   "
          f"{new_rate / old_rate:.2f}x the plain rate")
    print(f"  new recording: {recorded.outcome.position} instructions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
