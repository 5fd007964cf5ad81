"""Record and replay of the example kernels, end to end: the record/replay issue's 'done when' list.

Replay checks every marker's digest itself (a mismatch is a Divergence);
these tests check the same states without trusting that digest.  The
engines are subclassed (``OBSERVING``) so that at each marker replay
verifies, and where the run ends, they note the position, the vCPU's
registers and a hash of all of guest RAM.  Replays of one recording must
agree on all of it, and each marker must match what the recording itself
stores: the registers in the marker blob, and the RAM that the blobs' page
sets add up to.

A replay "in a fresh process" runs this file as a script: the real CLI
(``rrstub.cli.main``) with the observing engines installed, writing what
they saw to a JSON file (``observed_cli``).

A fast recording is replayed freely by ``FastEngine``, its positions exit
numbers, except where positions matter (--until, --from, --vassert,
--go-live): there ``FastStepEngine`` replays the same log instruction by
instruction, and positions are instruction counts in both modes.  The
file does not hold a fast recording's markers and end in instructions, so
tests that need them learn them from a stepping replay to the end
(``instruction_positions``), which is itself checked against the recording.
Each observed place therefore has two coordinates: ``position`` in the
replay's unit, and ``logged`` in the log's (what the recording stores).

Exact-mode workloads are small (``increments=``, ``work=`` on the kernel
command line): that engine single-steps at about 130k instructions/s here.
Fast-mode race is small too: replay finds each landmark by hardware
breakpoint hits, which in race's tight loop makes a replay several times
slower than the recording.  Guest RAM is 4 MiB so hashing all of it at
every marker stays cheap.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Optional
from unittest import mock

import pytest

from conftest import ROOT, marker_every, rrstub
from elfgen import make_elf
from test_examples import RACE_LINE
from rrstub import cli, session
from rrstub.engines import ExactEngine, FastEngine, FastStepEngine, regs_tuple
from rrstub.markers import decode_marker
from rrstub.recording import Recording
from vmm import snapshot

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

MODES = ("fast", "exact")
MEM = "4M"
RACE_RUNS = 10
RACE_WORK = {"fast": ("--cmdline", "increments=3000"), "exact": ("--cmdline", "increments=1000")}
TICKS_WORK = {"fast": (), "exact": ("--cmdline", "work=15000")}
MARKERS = 6     # about this many markers per recording, whatever the host's speed
TICKS_LINE = re.compile(rb"^ticks: (\d+) work: (0x[0-9a-f]{8})\n\Z")
END = -1   # Seen.marker of the state where the run ended


@dataclasses.dataclass(frozen=True)
class Seen:
    """The machine at a marker (or, with marker END, where a replay stopped)."""
    marker: int
    position: int        # in the replay's unit: instructions, or exits for a free-running fast replay
    logged: int          # the same place in the log's unit (the recording's markers are stored in it)
    regs: tuple[int, ...]
    sregs: str           # JSON of the Sregs fields
    memory: str          # vmm.snapshot.memory_digest of all guest RAM, hex

    @classmethod
    def of(cls, marker: int, position: int, logged: int, regs, sregs, memory) -> "Seen":
        return cls(marker, position, logged, regs_tuple(regs),
                   json.dumps(dataclasses.asdict(sregs), sort_keys=True),
                   snapshot.memory_digest(memory).hex())


def _observing(base: type) -> type:
    class Observing(base):
        """Notes the machine at every verified marker and at the end of the run."""

        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.seen: list[Seen] = []
            OBSERVED.append(self)

        def _verify_marker(self, point) -> None:
            super()._verify_marker(point)
            self.seen.append(self._look(point.marker))

        def run(self):
            outcome = super().run()
            self.seen.append(self._look(END))
            return outcome

        def _look(self, marker: int) -> Seen:
            m = self.machine
            return Seen.of(marker, self.position, self.log_pos, m.vcpu.get_regs(), m.vcpu.get_sregs(), m.mem)

    Observing.__name__ = f"Observing{base.__name__}"
    return Observing


OBSERVING = {"fast": _observing(FastEngine), "exact": _observing(ExactEngine)}
OBSERVING_STEPS = _observing(FastStepEngine)    # what session replays a fast recording with, stepping
OBSERVED: list = []


@contextlib.contextmanager
def observing():
    """session's replays, free-running or stepping, by the observing engines."""
    with mock.patch.dict(session.ENGINES, OBSERVING), mock.patch.object(session, "FastStepEngine", OBSERVING_STEPS):
        yield


def observed_cli(argv: list[str]) -> int:
    """This file run as a script: ``REPORT rrstub-args...``; what the engines saw goes to REPORT."""
    report, *args = argv
    with observing():
        status = cli.main(args)
    Path(report).write_text(json.dumps([[dataclasses.astuple(s) for s in e.seen] for e in OBSERVED]))
    return status


def _load_seen(report: Path) -> list[Seen]:
    (seen,) = json.loads(report.read_text())
    return [Seen(marker, position, logged, tuple(regs), sregs, memory)
            for marker, position, logged, regs, sregs, memory in seen]


# ---------------------------------------------------------------------------
# Recording and replaying


def record(kernel: Path, rec: Path, mode: str, *args: str) -> subprocess.CompletedProcess:
    return rrstub("record", str(kernel), "-o", str(rec), "--mode", mode, "--mem", MEM, "-q", *args)


def with_markers(kernel: Path, mode: str, work: tuple) -> tuple:
    """``work`` plus a --marker-every that gives about MARKERS markers on this host."""
    return (*work, "--marker-every", marker_every(MARKERS, kernel, "--mode", mode, "--mem", MEM, *work))


def record_piped(kernel: Path, rec: Path, mode: str, pieces: Iterable[tuple[bytes, float]],
                 *args: str, timeout: float = 30) -> tuple[int, bytes, bytes]:
    """Record with serial input written to a pipe from a thread: (data, then sleep seconds) pieces."""
    proc = subprocess.Popen([sys.executable, "-m", "rrstub", "record", str(kernel), "-o", str(rec),
                             "--mode", mode, "--mem", MEM, "-q", "--serial-in", "-",
                             "--timeout", str(timeout), *args],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def feed():
        for data, delay in pieces:
            proc.stdin.write(data)
            proc.stdin.flush()
            time.sleep(delay)
        proc.stdin.close()

    feeder = threading.Thread(target=feed)
    feeder.start()
    stdout = proc.stdout.read()  # communicate() would close stdin under the feeder
    stderr = proc.stderr.read()
    proc.wait(timeout=timeout + 30)
    feeder.join()
    return proc.returncode, stdout, stderr


class FreshReplay:
    """``rrstub replay`` in a fresh process, observed; runs alongside whatever the test does next."""

    def __init__(self, rec: Path, report: Path, *args: str):
        self.report = report
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(report), "replay", str(rec), *args], cwd=ROOT,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])})

    def wait(self) -> tuple[int, bytes, bytes, list[Seen]]:
        stdout, stderr = self.proc.communicate(timeout=90)
        seen = _load_seen(self.report) if self.report.exists() else []
        return self.proc.returncode, stdout, stderr, seen


def replay_observed(rec: Path, **kw) -> tuple[session.ReplayResult, bytes, list[Seen]]:
    out = io.BytesIO()
    with observing():
        result = session.replay(str(rec), serial_out=out, **kw)
    return result, out.getvalue(), result.engine.seen


def recorded_markers(rec: Path) -> list[Seen]:
    """Every marker as the recording stores it; RAM is the sum of the page sets so far.

    Its position is the one stored (``logged``): an exit number in a fast recording.
    """
    with Recording.open(rec) as r:
        ram = bytearray(r.config["mem_size"])
        found = []
        for chunk in r.markers:
            state = decode_marker(r.payload(chunk))
            snapshot.apply_pages(ram, state.pages)
            found.append(Seen.of(state.index, state.position, state.position, state.vcpu.regs,
                                 state.vcpu.sregs, ram))
        return found


def check_markers(seen: list[Seen], rec: Path, until: Optional[int] = None,
                  at: Optional[dict[int, int]] = None) -> None:
    """A replay saw every marker after m0 (up to position ``until``) as recorded, then ended.

    ``at``: marker index -> position in the replay's unit, where that is not
    the recording's (a fast recording replayed instruction by instruction:
    ``instruction_positions``); without it, the stored positions.
    """
    recorded = recorded_markers(rec)
    where = at if at is not None else {m.marker: m.position for m in recorded}
    expected = [m for m in recorded[1:] if until is None or where[m.marker] <= until]
    markers, end = seen[:-1], seen[-1]
    assert end.marker == END
    assert [m.marker for m in markers] == [m.marker for m in expected]
    for got, want in zip(markers, expected):
        assert got.logged == want.logged, f"m{want.marker}: reached at another place in the log"
        assert got.position == where[want.marker], f"m{want.marker}"
        assert got.regs == want.regs, f"m{want.marker}: registers differ from the marker blob"
        assert got.sregs == want.sregs, f"m{want.marker}: system registers differ from the marker blob"
        assert got.memory == want.memory, f"m{want.marker}: RAM differs from the recorded pages"


def guest_seconds(rec: Path) -> float:
    with Recording.open(rec) as r:
        return r.summary["guest_ns"] / 1e9


def end_position(rec: Path) -> int:
    """Where the recording ends, in the unit it stores (exits for a fast recording)."""
    with Recording.open(rec) as r:
        return r.summary["end_position"]


def instruction_positions(rec: Path) -> tuple[int, dict[int, int]]:
    """(end, {marker index: position}) in instructions, the unit --until takes in both modes.

    An exact recording stores them.  A fast one stores exit numbers: they
    come from a replay of the whole recording instruction by instruction
    (``--from m0``), which must match the recording on the way (every
    marker's registers, system registers and RAM, and the end).
    """
    with Recording.open(rec) as r:
        mode, stored_end, serial = r.config["mode"], r.summary["end_position"], r.summary["serial_sha256"]
    if mode == "exact":
        return stored_end, {m.marker: m.position for m in recorded_markers(rec)}
    result, _, seen = replay_observed(rec, start=0)
    assert result.engine.unit == "instruction" and result.verified_end
    assert result.serial_sha256 == serial      # --from skips that check: nothing was muted from 0
    assert (seen[-1].marker, seen[-1].logged) == (END, stored_end)
    check_markers(seen, rec, at={s.marker: s.position for s in seen[:-1]})
    assert result.outcome.position == seen[-1].position > stored_end    # more instructions than exits
    return result.outcome.position, {0: 0, **{s.marker: s.position for s in seen[:-1]}}


# ---------------------------------------------------------------------------
# race: outcomes differ between recordings, never between replays


@pytest.fixture(scope="module")
def race_recordings(kernels, tmp_path_factory):
    """RACE_RUNS recordings of race per mode, made on first use: [(path, stdout, status)]."""
    made: dict[str, list[tuple[Path, bytes, int]]] = {}

    def get(mode: str) -> list[tuple[Path, bytes, int]]:
        if mode not in made:
            folder = tmp_path_factory.mktemp(f"race-{mode}")
            runs = []
            args = with_markers(kernels / "race.elf", mode, RACE_WORK[mode])
            for i in range(RACE_RUNS):
                rec = folder / f"race{i}.rrr"
                r = record(kernels / "race.elf", rec, mode, *args)
                assert r.returncode in (0, 1), r.stderr
                runs.append((rec, r.stdout, r.returncode))
            made[mode] = runs
        return made[mode]

    return get


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_race_recordings_show_different_outcomes(race_recordings, mode):
    counters, losses = [], []
    for rec, stdout, status in race_recordings(mode):
        m = RACE_LINE.match(stdout)
        assert m, stdout
        counter, expected, lost = map(int, m.groups())
        assert counter + lost == expected
        assert status == (1 if lost else 0)
        counters.append(counter)
        losses.append(lost)
    assert any(losses), f"none of {RACE_RUNS} {mode} recordings lost an update"
    assert len(set(counters)) >= 2, f"{RACE_RUNS} {mode} recordings all gave counter={counters[0]}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_race_replays_three_times_identically(race_recordings, mode, tmp_path):
    for i, (rec, stdout, status) in enumerate(race_recordings(mode)):
        fresh = FreshReplay(rec, tmp_path / f"seen{i}.json")
        replays = []
        for _ in range(2):
            result, out, seen = replay_observed(rec)
            assert (result.outcome.reason, result.outcome.status) == ("exit", status)
            assert result.verified_end
            assert out == stdout
            replays.append(seen)
        code, out, err, seen = fresh.wait()
        assert code == status, err
        assert b"matched the recording" in err
        assert out == stdout
        replays.append(seen)
        assert replays[0] == replays[1] == replays[2], f"recording {i}: replays saw different states"
        check_markers(replays[0], rec)
        assert len(replays[0]) >= 3, "the recording should have markers after m0"


# ---------------------------------------------------------------------------
# ticks and echo


@pytest.mark.parametrize("mode", MODES)
def test_ticks_records_and_replays_exactly(kernels, tmp_path, mode):
    rec = tmp_path / "ticks.rrr"
    r = record(kernels / "ticks.elf", rec, mode, *with_markers(kernels / "ticks.elf", mode, TICKS_WORK[mode]))
    assert r.returncode == 0, r.stderr
    recorded = TICKS_LINE.match(r.stdout)
    assert recorded, r.stdout
    assert int(recorded.group(1)) >= 20, "ticks should have seen many timer interrupts"
    result, out, seen = replay_observed(rec)
    assert (result.outcome.reason, result.outcome.status) == ("exit", 0)
    assert result.verified_end
    assert out == r.stdout
    assert TICKS_LINE.match(out).group(1) == recorded.group(1)
    check_markers(seen, rec)


def _echo_input(rng: random.Random) -> bytes:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-_/()"
    lines = []
    while sum(len(l) + 1 for l in lines) < 10 * 1024:
        lines.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200))))
    return ("\n".join(lines) + "\n").encode()


def _random_pieces(rng: random.Random, data: bytes) -> Iterable[tuple[bytes, float]]:
    """Random chunk sizes and random host delays: input arrives while the guest runs and while it halts."""
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 700)
        yield data[pos:pos + n], rng.choice([0, 0, 0.001, 0.02])
        pos += n


@pytest.mark.parametrize("mode", MODES)
def test_echo_replays_10kb_of_input_without_any_input(kernels, tmp_path, mode):
    rng = random.Random(3)
    text = _echo_input(rng)
    rec = tmp_path / "echo.rrr"
    status, recorded, err = record_piped(kernels / "echo.elf", rec, mode,
                                         _random_pieces(rng, text + b"quit\n"), "--marker-every", "0.05")
    assert status == 0, err
    assert recorded == text.upper() + b"bye\n"
    # The fresh replay's stdin is /dev/null: everything the guest read comes from the recording.
    code, out, err, seen = FreshReplay(rec, tmp_path / "seen.json").wait()
    assert code == 0, err
    assert b"matched the recording" in err
    assert out == recorded
    check_markers(seen, rec)


@pytest.mark.parametrize("mode", MODES)
def test_input_wakes_a_guest_halted_after_sti(kernels, tmp_path, mode):
    """echo waits with `sti; hlt; cli`: the interrupt must come after hlt, before the cli."""
    rec = tmp_path / "echo.rrr"
    status, recorded, err = record_piped(kernels / "echo.elf", rec, mode,
                                         [(b"", 0.5), (b"hello\n", 0.3), (b"quit\n", 0)], timeout=10)
    assert status == 0, err
    assert recorded == b"HELLO\nbye\n"


# ---------------------------------------------------------------------------
# --until and --speed


@pytest.mark.parametrize("mode", MODES)
def test_replay_until_a_position_stops_there(race_recordings, tmp_path, mode):
    """--until is an instruction count in both modes (a fast recording is then replayed stepping)."""
    rec, stdout, _ = race_recordings(mode)[0]
    end, at = instruction_positions(rec)
    stop = end * 2 // 3
    code, out, err, seen = FreshReplay(rec, tmp_path / "seen.json", "--until", str(stop)).wait()
    assert code == 0, err
    assert b"stopped at instruction %d (--until)" % stop in err, err
    assert stdout.startswith(out) and out != stdout     # race prints its line at the end
    assert seen[-1].position == stop
    assert seen[-1].logged < end_position(rec)
    check_markers(seen, rec, until=stop, at=at)
    assert any(s.marker != END for s in seen), "no marker before the stop: make the recording's markers denser"
    result, _, again = replay_observed(rec, until=stop)
    assert (result.outcome.reason, result.outcome.position) == ("until", stop)
    assert again == seen


@pytest.mark.parametrize("mode", MODES)
def test_replay_until_a_marker_stops_at_it(race_recordings, tmp_path, mode):
    rec, stdout, _ = race_recordings(mode)[0]
    _, at = instruction_positions(rec)
    m1 = recorded_markers(rec)[1]
    code, out, err, seen = FreshReplay(rec, tmp_path / "seen.json", "--until", "m1").wait()
    assert code == 0, err
    assert b"stopped at instruction %d (--until)" % at[1] in err, err
    assert stdout.startswith(out)
    check_markers(seen, rec, until=at[1], at=at)
    assert [s.marker for s in seen] == [1, END]
    end = seen[-1]
    # (Not the system registers: an interrupt the marker's point delivers can be pending there.)
    assert (end.position, end.logged, end.regs, end.memory) == (at[1], m1.logged, m1.regs, m1.memory)


@pytest.mark.parametrize("mode", MODES)
def test_replay_at_realtime_takes_the_recorded_guest_time(kernels, tmp_path, mode):
    # The guest idles a while waiting for input: replay at max speed skips that, realtime must not.
    # Markers every 10 ms: replay paces at points with and without a recorded clock value.
    rec = tmp_path / "echo.rrr"
    status, recorded, err = record_piped(kernels / "echo.elf", rec, mode,
                                         [(b"hello\n", 2.0), (b"quit\n", 0)], "--marker-every", "0.01",
                                         timeout=15)
    assert status == 0, err
    assert recorded == b"HELLO\nbye\n"
    guest = guest_seconds(rec)
    assert guest >= 0.5  # the recorder starts up (in under 1.5 s) while the first line waits in the pipe
    fastest, _, _ = replay_observed(rec)
    assert fastest.host_seconds < guest / 2
    started = time.monotonic()
    r = rrstub("replay", str(rec), "--speed", "realtime")
    took = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert r.stdout == recorded
    assert guest * 0.95 <= took <= guest + 10



@pytest.mark.parametrize("mode", MODES)
def test_paced_replay_takes_no_clock_value_the_recording_lacks(kernels, tmp_path, mode):
    """A marker often lands on the point after the one whose clock value made it due; that
    point has no clock value in the log, and pacing must not ask for one."""
    rec = tmp_path / "race.rrr"
    r = record(kernels / "race.elf", rec, mode, "--cmdline", "increments=300", "--marker-every", "0.001")
    assert r.returncode in (0, 1), r.stderr
    paced = rrstub("replay", str(rec), "--speed", "100")
    assert paced.returncode == r.returncode, paced.stderr
    assert paced.stdout == r.stdout


if __name__ == "__main__":
    sys.exit(observed_cli(sys.argv[1:]))


# -- runs the guest ends badly: the recording ends the same way, and replay reproduces it -----

TRIPLE_FAULT = b"\xe6\x80" + b"\x0f\x0b"   # out 0x80, al; ud2 with no IDT


@pytest.mark.parametrize("mode", MODES)
def test_a_guest_that_can_never_wake_replays_to_the_same_hang(kernels, tmp_path, mode):
    """echo gets two bytes, then end of input: it halts with nothing left to wake it (71)."""
    rec = tmp_path / "hung.rrr"
    r = rrstub("record", str(kernels / "echo.elf"), "-o", str(rec), "--mode", mode, "--mem", MEM,
               "--serial-in", "-", input=b"hi\n")
    assert r.returncode == 71, r.stderr
    assert b"no more serial input can arrive" in r.stderr
    p = rrstub("replay", str(rec))
    assert p.returncode == 71, p.stderr
    assert p.stdout == r.stdout == b"HI\n"
    assert b"no more serial input can arrive" in p.stderr
    assert b"replayed hung (status 71)" in p.stderr and b"matched the recording" in p.stderr


@pytest.mark.parametrize("mode", MODES)
def test_a_triple_fault_replays_to_the_same_crash(tmp_path, mode):
    kernel = tmp_path / "crash.elf"
    kernel.write_bytes(make_elf(TRIPLE_FAULT))
    rec = tmp_path / "crash.rrr"
    r = rrstub("record", str(kernel), "-o", str(rec), "--mode", mode, "--mem", MEM)
    assert r.returncode == 70, r.stderr
    p = rrstub("replay", str(rec))
    assert p.returncode == 70, p.stderr
    for text in (r.stderr, p.stderr):
        assert b"triple-faulted" in text and b"rip=0000000000100002" in text
    assert b"replayed crash (status 70)" in p.stderr and b"matched the recording" in p.stderr


# -- positions outside the recording, and what `record -o` may replace ----------------------------

def test_positions_outside_the_recording_are_refused_up_front(kernels, tmp_path):
    """--until, --from and --go-live take the range `info --json` reports, and nothing past it.

    That range is in instructions only for an exact recording; a fast one's
    `info` range is in exits, and positions are instructions (next test).
    """
    rec = tmp_path / "hello.rrr"
    assert rrstub("record", str(kernels / "hello.elf"), "-o", str(rec), "--mode", "exact", "-q").returncode == 0
    info = json.loads(rrstub("info", "--json", str(rec)).stdout)
    first, last = info["first_position"], info["last_position"]
    assert first == 0 < last
    for option in ("--until", "--from", "--go-live"):
        r = rrstub("replay", str(rec), option, str(last + 1))
        assert r.returncode == 2 and r.stdout == b"", r.stderr
        assert r.stderr == (f"rrstub: {option} {last + 1}: the recording has instructions {first}..{last}; "
                            f"it ends before reaching {last + 1}\n").encode()
    r = rrstub("replay", str(rec), "--until", str(last))
    assert r.returncode == 0, r.stderr
    assert f"rrstub: stopped at instruction {last} (--until)".encode() in r.stderr


def test_a_fast_recordings_end_in_instructions_is_found_by_replaying(kernels, tmp_path):
    """A fast recording stores its end as an exit number: --from and --go-live past its end in
    instructions replay there, then say where it ends; up to the end, they work."""
    rec = tmp_path / "hello.rrr"
    r = rrstub("record", str(kernels / "hello.elf"), "-o", str(rec), "--mode", "fast", "-q")
    assert r.returncode == 0, r.stderr
    recorded = r.stdout
    info = json.loads(rrstub("info", "--json", str(rec)).stdout)
    exits = info["last_position"]
    end, _ = instruction_positions(rec)
    assert end > exits
    r = rrstub("replay", str(rec), "--from", str(end + 1))
    assert r.returncode == 2 and r.stdout == b"", r.stderr
    assert r.stderr == f"rrstub: --from {end + 1}: the recording ends at instruction {end}\n".encode()
    r = rrstub("replay", str(rec), "--go-live", str(end + 1))
    assert r.returncode == 2, r.stderr
    assert (f"rrstub: --go-live {end + 1}: the replay ended (exit) at instruction {end}, before reaching "
            f"{end + 1}; {rec} ends at instruction {end}\n").encode() in r.stderr
    r = rrstub("replay", str(rec), "--until", str(end))
    assert r.returncode == 0 and r.stdout == recorded, r.stderr
    assert f"stopped at instruction {end} (--until)".encode() in r.stderr
    r = rrstub("replay", str(rec), "--from", str(end))
    assert r.returncode == 0 and r.stdout == b"", r.stderr
    assert f"replayed exit (status 0) at instruction {end}".encode() in r.stderr
    assert b"matched the recording" in r.stderr


def test_record_force_replaces_a_recording_and_nothing_else(kernels, tmp_path):
    rec = tmp_path / "hello.rrr"
    hello = ("record", str(kernels / "hello.elf"), "-o", str(rec), "--mode", "fast", "-q")
    assert rrstub(*hello).returncode == 0
    first = Recording.open(rec)
    first_id = first.config["id"]
    first.close()
    r = rrstub(*hello)
    assert r.returncode == 2 and b"is an existing recording: give --force" in r.stderr
    assert rrstub(*hello, "--force").returncode == 0
    with Recording.open(rec) as again:
        assert again.config["id"] != first_id and not again.recovered
