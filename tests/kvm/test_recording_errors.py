"""Recordings that are damaged, cut short, foreign, newer, killed or rewritten, through the CLI.

Every case asserts the exit status `rrstub replay --help` documents and the
message's content: where (byte offset, position), what, and what to do;
never a traceback.  Recordings come from real guests (hello, race, ticks,
echo with small workloads), made once per module and copied before they are
damaged.

"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

import pytest

from conftest import ROOT, marker_every, rrstub
from rrstub.engines import place
from rrstub.engines.fast import HOST_READS
from rrstub import events as ev
from rrstub.recording import (HEADER_SIZE, TRAILER_SIZE, ChunkInfo, ChunkKind, Recording,
                              RecordingError, RecordingWriter)

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(60)]

EXIT_UNUSABLE = 2
EXIT_INCOMPLETE = 65
EXIT_DIVERGED = 66
DAMAGED_FIX = "re-copy it from the source; if the original is damaged as well, record again"
INCOMPLETE_NOTE = "the recording is incomplete (no index at its end; the recorder was probably killed)"
REPLAYED_PREFIX = "replayed the incomplete recording to its last complete chunk:"

# What each example prints: one line, at its very end; `#` stands for a number.
LINE_TEMPLATES = {
    "race": b"race: counter=# expected=# lost=#\n",
    "ticks": b"ticks: # work: #\n",
}

# name: (kernel, mode, extra `rrstub record` arguments)
RECORDINGS = {
    "hello-fast": ("hello", "fast", ()),
    "hello-exact": ("hello", "exact", ()),
    "race-fast": ("race", "fast", ("--cmdline", "increments=2000")),
    "ticks-fast": ("ticks", "fast", ("--cmdline", "work=20000")),
    "ticks-exact": ("ticks", "exact", ("--cmdline", "work=30000", "--marker-every", "0.05")),
    "ticks-markers": ("ticks", "fast", ("--cmdline", "work=40000", "--marker-every", "{markers}")),
    # No markers: a marker after the changed byte (the run can last past one
    # on a slow host) would catch the divergence before the guest echoes it.
    "echo-fast": ("echo", "fast", ("--serial-in", "{input}", "--no-markers")),
}
ECHO_INPUT = b"hello\nquit\n"
MARKERS = 5     # "{markers}": a --marker-every giving about this many on this host


def skip_if_no_exact(r: subprocess.CompletedProcess) -> None:
    if r.returncode == EXIT_UNUSABLE and b"needs single-stepping at guest CPL0" in r.stderr:
        pytest.skip("this host's KVM cannot single-step guest CPL0: no exact mode")


@dataclasses.dataclass
class Made:
    path: Path
    stdout: bytes      # the guest's serial output while recording


class Recordings:
    """The module's recordings, each made on first use."""

    def __init__(self, kernels: Path, root: Path):
        self.kernels = kernels
        self.root = root
        self.made: dict[str, Made] = {}
        self.serial_in = root / "echo.in"
        self.serial_in.write_bytes(ECHO_INPUT)

    def __getitem__(self, name: str) -> Made:
        if name not in self.made:
            kernel, mode, extra = RECORDINGS[name]
            out = self.root / f"{name}.rrr"
            work = [a for a in extra if a not in ("--marker-every", "{markers}")]
            markers = ("{markers}" in extra and
                       marker_every(MARKERS, self.kernels / f"{kernel}.elf", "--mode", mode, *work))
            r = rrstub("record", str(self.kernels / f"{kernel}.elf"), "-o", str(out), "--mode", mode,
                       *(a.format(input=self.serial_in, markers=markers) for a in extra))
            skip_if_no_exact(r)
            assert r.returncode in (0, 1) and b"rrstub: recorded exit (status" in r.stderr, r.stderr
            self.made[name] = Made(out, r.stdout)
        return self.made[name]

    def copy(self, name: str, dest: Path) -> Path:
        shutil.copyfile(self[name].path, dest)
        return dest


@pytest.fixture(scope="module")
def recordings(kernels, tmp_path_factory) -> Recordings:
    return Recordings(kernels, tmp_path_factory.mktemp("recordings"))


def chunks_of(path: Path) -> list[ChunkInfo]:
    with Recording.open(path) as rec:
        return rec.chunks


def assert_message(r: subprocess.CompletedProcess, status: int, *fragments: str) -> str:
    """The exit status, and one `rrstub:` message holding every fragment; returns stderr."""
    err = r.stderr.decode()
    assert r.returncode == status, err
    assert "Traceback" not in err, err
    assert err.startswith("rrstub: "), err
    for f in fragments:
        assert f in err, (f, err)
    return err


def assert_prefix_of_line(out: bytes, template: bytes) -> None:
    """``out`` could be the start of ``template`` with its numbers (decimal, or 0x hex) filled in."""
    def shape(b: bytes) -> bytes:
        return re.sub(rb"0x[0-9a-f]*|\d+", b"#", b)
    assert template.startswith(shape(out)), out


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def info_json(path: Path) -> dict:
    r = rrstub("info", "--json", str(path))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ---------------------------------------------------------------------------
# A flipped byte


# name: (chunk kind, byte offset of the flip inside the chunk, from its end if negative; the problem named)
WHERE_IN_CHUNKS = {
    "kernel-payload": (ChunkKind.KERNEL, -1, "chunk kind KERNEL, checksum mismatch"),
    "marker-payload": (ChunkKind.MARKER, -100, "chunk kind MARKER, checksum mismatch"),
    "marker-meta": (ChunkKind.MARKER, 30, "chunk kind MARKER, metadata checksum mismatch"),
    "events-payload": (ChunkKind.EVENTS, -1, "chunk kind EVENTS, checksum mismatch"),
    "events-header": (ChunkKind.EVENTS, 9, "chunk header, checksum mismatch"),
}


def damaged_copy(recordings: Recordings, tmp_path: Path, where: str) -> tuple[Path, ChunkInfo, str]:
    """A copy of hello's recording with one byte flipped: (path, the chunk holding it, problem)."""
    kind, inside, problem = WHERE_IN_CHUNKS[where]
    path = recordings.copy("hello-fast", tmp_path / "rec.rrr")
    chunk = next(c for c in chunks_of(path) if c.kind is kind)
    flip(path, chunk.offset + inside % chunk.stored_size)
    return path, chunk, problem


@pytest.mark.parametrize("where", list(WHERE_IN_CHUNKS))
def test_replay_names_the_damaged_chunk_by_offset(recordings, tmp_path, where):
    path, chunk, problem = damaged_copy(recordings, tmp_path, where)
    r = rrstub("replay", str(path))
    assert_message(r, EXIT_UNUSABLE, f"{path}: the file is damaged at byte offset {chunk.offset} ({problem})",
                   DAMAGED_FIX)


DAMAGE_OUTSIDE_CHUNKS = {
    "index-header": "chunk header, checksum mismatch",
    "index-payload": "chunk kind INDEX, checksum mismatch",
    "trailer-magic": "trailer, no RRSTUBIX trailer right after the index",
    "trailer-offset": "trailer, checksum mismatch",
    "trailer-crc": "trailer, checksum mismatch",
    "file-header-version": "file header, checksum mismatch",
}


@pytest.mark.parametrize("where", list(DAMAGE_OUTSIDE_CHUNKS))
def test_a_damaged_index_or_trailer_is_recovered_by_a_scan_and_a_damaged_header_is_refused(
        recordings, tmp_path, where):
    """The INDEX and trailer only repeat the chunk headers: losing them loses nothing."""
    made = recordings["hello-fast"]
    path = recordings.copy("hello-fast", tmp_path / "rec.rrr")
    size = path.stat().st_size
    last = chunks_of(path)[-1]
    index = last.offset + last.stored_size      # the INDEX chunk follows the last indexed chunk
    trailer = size - TRAILER_SIZE
    at, named = {"index-header": (index + 9, index), "index-payload": (trailer - 5, index),
                 "trailer-magic": (trailer + 2, trailer), "trailer-offset": (trailer + 8, trailer),
                 "trailer-crc": (size - 1, trailer), "file-header-version": (8, 0)}[where]
    flip(path, at)
    damage = f"damaged at byte offset {named} ({DAMAGE_OUTSIDE_CHUNKS[where]})"
    if where == "file-header-version":
        for command in ("info", "replay"):
            r = rrstub(command, str(path))
            assert_message(r, EXIT_UNUSABLE, damage, DAMAGED_FIX)
            assert r.stdout == b""
        return
    note = f"{path}: the index at the end of the file is {damage}; read the recording by scanning its chunks"
    info = info_json(path)
    assert info["recovery_note"].startswith(note) and "nothing recorded is missing" in info["recovery_note"]
    assert info["end"]["reason"] == "exit" and info["last_position"] == info_json(made.path)["last_position"]
    text = rrstub("info", str(path))
    assert text.returncode == 0 and f"RECOVERED: {note}".encode() in text.stdout
    r = rrstub("replay", str(path))
    assert_message(r, 0, note, "replayed exit (status 0)", "matched the recording")
    assert r.stdout == made.stdout


@pytest.mark.parametrize("where", list(WHERE_IN_CHUNKS))
def test_info_verify_finds_damage_inside_chunks(recordings, tmp_path, where):
    """`info` reads only the index; `info --verify` checks every chunk."""
    path, chunk, problem = damaged_copy(recordings, tmp_path, where)
    assert rrstub("info", str(path)).returncode == 0
    r = rrstub("info", "--verify", str(path))
    assert_message(r, EXIT_UNUSABLE, f"damaged at byte offset {chunk.offset} ({problem})")


@pytest.mark.parametrize("kind", ["CONFIG", "END", "later MARKER"])
def test_replay_finds_damage_in_chunks_it_does_not_use(recordings, tmp_path, kind):
    path = recordings.copy("ticks-markers", tmp_path / "rec.rrr")
    chunks = chunks_of(path)
    chunk = ([c for c in chunks if c.kind is ChunkKind.MARKER][-1] if kind == "later MARKER"
             else next(c for c in chunks if c.kind.name == kind))
    flip(path, chunk.offset + chunk.stored_size - 2)
    r = rrstub("replay", str(path))
    assert_message(r, EXIT_UNUSABLE, f"damaged at byte offset {chunk.offset} (")


# ---------------------------------------------------------------------------
# Cut short


def test_cuts_after_the_initial_marker_replay_to_the_last_complete_chunk(recordings, tmp_path):
    made = recordings["ticks-exact"]
    chunks = chunks_of(made.path)
    marker = chunks[2]
    events = [c for c in chunks if c.kind is ChunkKind.EVENTS]
    assert marker.kind is ChunkKind.MARKER and len(events) >= 3, chunks
    after_marker = marker.offset + marker.stored_size
    cuts = {   # where: (size of the cut file, the last complete chunk's last position)
        "right after the marker": (after_marker, marker.meta["position"]),
        "inside the first events chunk": (events[0].offset + 40, marker.meta["position"]),
        "after the second events chunk": (events[2].offset, events[1].meta["last"]),
        "inside the third events chunk": (events[2].offset + events[2].stored_size - 1,
                                          events[1].meta["last"]),
    }
    for where, (size, last) in cuts.items():
        path = tmp_path / "cut.rrr"
        shutil.copyfile(made.path, path)
        cut(path, size)
        info = info_json(path)
        assert not info["complete"] and info["end"] is None, where
        assert info["recovery_note"].startswith(INCOMPLETE_NOTE), where
        assert info["last_position"] == last, where
        text = rrstub("info", str(path))
        assert text.returncode == 0 and b"INCOMPLETE: " + INCOMPLETE_NOTE.encode() in text.stdout, where
        r = rrstub("replay", str(path))
        err = assert_message(r, EXIT_INCOMPLETE, INCOMPLETE_NOTE,
                             f"{REPLAYED_PREFIX} instruction {last}, ")
        if size > after_marker and size != events[2].offset:
            assert "bytes are an incomplete chunk and were ignored" in err, where
        assert made.stdout.startswith(r.stdout), (where, r.stdout)


@pytest.mark.parametrize("where", ["inside END", "inside INDEX", "inside the trailer"])
def test_a_cut_after_the_whole_log_still_replays_to_the_end(recordings, tmp_path, where):
    """The log (End event included) survived: replay reaches and verifies the guest's end."""
    made = recordings["hello-fast"]
    path = recordings.copy("hello-fast", tmp_path / "rec.rrr")
    end = chunks_of(path)[-1]
    size = path.stat().st_size
    cut(path, {"inside END": end.offset + end.stored_size - 3,
               "inside INDEX": end.offset + end.stored_size + 40,
               "inside the trailer": size - 1}[where])
    assert info_json(path)["complete"] is False
    r = rrstub("replay", str(path))
    assert_message(r, 0, INCOMPLETE_NOTE, "replayed exit (status 0)", "matched the recording")
    assert r.stdout == made.stdout


CUT_BEFORE_THE_MARKER = {
    "inside the file header": "truncated header: the file has 10 bytes and a recording starts with a "
                              "16-byte header",
    "inside CONFIG": "the machine configuration is missing (no CONFIG chunk at byte offset 16): "
                     "the recording cannot be replayed; record again",
    "before KERNEL": "the kernel image is missing (no KERNEL chunk at byte offset {kernel}): "
                     "the recording cannot be replayed; record again",
    "inside KERNEL": "the kernel image is missing (no KERNEL chunk at byte offset {kernel}): "
                     "the recording cannot be replayed; record again",
    "inside the initial MARKER": "the initial snapshot is missing (no MARKER chunk after the kernel; "
                                 "the chunks end at byte offset {marker})",
}


@pytest.mark.parametrize("where", list(CUT_BEFORE_THE_MARKER))
def test_a_cut_before_the_initial_marker_cannot_be_replayed(recordings, tmp_path, where):
    path = recordings.copy("hello-fast", tmp_path / "rec.rrr")
    config, kernel, marker = chunks_of(path)[:3]
    cut(path, {"inside the file header": 10, "inside CONFIG": config.offset + 30,
               "before KERNEL": kernel.offset, "inside KERNEL": kernel.offset + kernel.stored_size // 2,
               "inside the initial MARKER": marker.offset + 100}[where])
    for command in ("info", "replay"):
        r = rrstub(command, str(path))
        assert_message(r, EXIT_UNUSABLE, f"{path}: " + CUT_BEFORE_THE_MARKER[where].format(
            kernel=kernel.offset, marker=marker.offset))


# ---------------------------------------------------------------------------
# Newer, foreign, missing; the wrong kernel


def test_a_newer_format_version_asks_for_a_newer_rrstub(recordings, tmp_path):
    path = recordings.copy("hello-fast", tmp_path / "rec.rrr")
    data = path.read_bytes()
    head = data[:8] + struct.pack("<HH", 2, HEADER_SIZE)
    path.write_bytes(head + struct.pack("<I", zlib.crc32(head)) + data[HEADER_SIZE:])
    for command in ("info", "replay"):
        r = rrstub(command, str(path))
        assert_message(r, EXIT_UNUSABLE, f"{path}: recorded by a newer rrstub (format 2, this rrstub "
                                         "reads up to 1): upgrade rrstub")


def test_replay_with_the_wrong_kernel_names_both(recordings, kernels, tmp_path):
    path = recordings["race-fast"].path
    hello = kernels / "hello.elf"
    r = rrstub("replay", str(path), "--kernel", str(hello))
    assert_message(r, EXIT_UNUSABLE, f"{hello} is not the kernel this recording was made with: "
                                     "the recording holds race.elf (sha256 ",
                   "drop --kernel: the recording carries its own copy")
    assert r.stdout == b""
    missing = tmp_path / "nope.elf"
    r = rrstub("replay", str(path), "--kernel", str(missing))
    assert_message(r, EXIT_UNUSABLE, f"cannot read --kernel {missing}: No such file or directory")


NOT_RECORDINGS = {
    "an ELF kernel": "{path} is not an rrstub recording (it does not start with RRSTUBRC)",
    "an empty file": "{path}: truncated header: the file has 0 bytes",
    "a directory": "{path} is a directory, not a recording",
    "a missing path": "no such recording: {path}",
}


@pytest.mark.parametrize("what", list(NOT_RECORDINGS))
def test_not_a_recording(kernels, tmp_path, what):
    path = {"an ELF kernel": kernels / "hello.elf", "an empty file": tmp_path / "empty.rrr",
            "a directory": tmp_path, "a missing path": tmp_path / "missing.rrr"}[what]
    if what == "an empty file":
        path.write_bytes(b"")
    for command in ("info", "replay"):
        r = rrstub(command, str(path))
        assert_message(r, EXIT_UNUSABLE, NOT_RECORDINGS[what].format(path=path))
        assert r.stdout == b""


# ---------------------------------------------------------------------------
# A recorder killed with SIGKILL


def record_then_kill(kernels: Path, out: Path, kernel: str, mode: str, after: float, *extra: str) -> None:
    """Start `rrstub record`, and SIGKILL it ``after`` seconds after its initial marker is on disk."""
    proc = subprocess.Popen([sys.executable, "-m", "rrstub", "record", str(kernels / f"{kernel}.elf"),
                             "-o", str(out), "--mode", mode, *extra],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the recorder wrote no initial marker in 20 s"
            try:
                if chunks_of(out)[2:3]:
                    break
            except (RecordingError, IndexError):
                pass
            time.sleep(0.01)
        time.sleep(after)
        assert proc.poll() is None, "the guest finished before the kill; give it more work"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def assert_killed_recording_replays_its_prefix(path: Path, kernel: str, unit: str) -> dict:
    info = info_json(path)
    assert not info["complete"] and info["end"] is None
    assert info["recovery_note"].startswith(INCOMPLETE_NOTE)
    r = rrstub("replay", str(path))
    assert_message(r, EXIT_INCOMPLETE, INCOMPLETE_NOTE, f"{REPLAYED_PREFIX} {place(unit, info['last_position'])}, ")
    assert_prefix_of_line(r.stdout, LINE_TEMPLATES[kernel])
    return info


def test_sigkilled_fast_recorder_leaves_a_replayable_prefix(kernels, tmp_path):
    path = tmp_path / "ticks.rrr"
    record_then_kill(kernels, path, "ticks", "fast", 0.4, "--cmdline", "work=300000")
    assert_killed_recording_replays_its_prefix(path, "ticks", "exit")


def test_sigkilled_fast_recorder_kept_the_events_of_its_first_second(kernels, tmp_path):
    """Events reach the file within 2 s of host time (engines.FLUSH_INTERVAL_NS), also in fast mode.

    Without markers: a marker writes the events before it, which would hide a missing flush.
    """
    path = tmp_path / "ticks.rrr"
    record_then_kill(kernels, path, "ticks", "fast", 1.5, "--cmdline", "work=3000000", "--no-markers")
    info = info_json(path)
    assert not info["complete"] and info["end"] is None
    assert info["sizes"]["events"]["chunks"] >= 1 and info["last_position"] > 0, info["sizes"]
    assert info["events"].get("Point", 0) > 0, info["events"]


def test_sigkilled_exact_recorder_wrote_an_events_chunk_every_two_seconds(kernels, tmp_path):
    """The recorder writes buffered events at least every 2 s of host time (engines.FLUSH_INTERVAL_NS)."""
    path = tmp_path / "race.rrr"
    record_then_kill(kernels, path, "race", "exact", 5.0, "--cmdline", "increments=40000")
    info = assert_killed_recording_replays_its_prefix(path, "race", "instruction")
    assert info["sizes"]["events"]["chunks"] >= 2, info["sizes"]
    assert info["last_position"] > 0


# ---------------------------------------------------------------------------
# A well-formed log that is wrong: divergence


def rewrite(src: Path, dst: Path, edit: Callable[[list], list] = lambda es: es,
            summary: Callable[[dict], dict] = lambda s: s) -> None:
    """Copy a recording chunk by chunk, passing the decoded events of each chunk through ``edit``."""
    with Recording.open(src) as rec:
        w = RecordingWriter(dst, rec.config, rec.kernel_name, rec.kernel_bytes())
        with w:
            for c in rec.chunks[2:]:
                if c.kind is ChunkKind.MARKER:
                    w.add_marker(c.meta, rec.payload(c))
                elif c.kind is ChunkKind.EVENTS:
                    encoder = ev.EventEncoder()
                    for e in edit(list(ev.decode_events(rec.payload(c)))):
                        encoder.add(e)
                    _, count, payload = encoder.take()
                    w.add_events(c.meta["first"], c.meta["last"], count, payload)
            w.finish(summary(dict(rec.summary)))


class Nth:
    """An edit: replace the ``n``-th entry (from 1) that ``select`` accepts by ``change(entry)``."""

    def __init__(self, n: int, select: Callable, change: Callable):
        self.n, self.select, self.change = n, select, change
        self.seen = 0
        self.old: Optional[ev.Entry] = None
        self.previous_check: Optional[ev.Entry] = None

    def __call__(self, entries: list) -> list:
        out = []
        for e in entries:
            if self.select(e):
                self.seen += 1
                if self.seen == self.n:
                    self.old = e
                    e = self.change(e)
            if isinstance(e, ev.Check) and self.old is None:
                self.previous_check = e
            out.append(e)
        return out


def is_check(e) -> bool:
    return isinstance(e, ev.Check)


def is_end(e) -> bool:
    return isinstance(e, ev.End)


def has_time(e) -> bool:
    return isinstance(e, ev.Point) and e.time_ns is not None


def has_input(e) -> bool:
    return isinstance(e, ev.Point) and bool(e.input)


def diverged(r: subprocess.CompletedProcess, unit: str) -> tuple[int, str, int]:
    """(position, what differed, last matching position) from a divergence report."""
    err = assert_message(r, EXIT_DIVERGED, "rrstub: replay diverged from the recording at ")
    at = "exit #" if unit == "exit" else f"{unit} "
    m = re.search(rf"diverged from the recording at {at}(\d+): (.+?)\n(?:.*\n)*?"
                  rf"last position where replay matched the recording: {at}(\d+)\n", err)
    assert m, err
    return int(m[1]), m[2], int(m[3])


@pytest.mark.timeout(120)
def test_a_fast_replay_that_cannot_find_a_landmark_reports_within_seconds(kernels, tmp_path):
    """ticks tsc=1 mixes rdtsc (run by the host CPU at guest CPL0) into a loop that never exits:
    fast replay meets the landmark's rip again and again with other registers.  It must say so,
    name the registers and suggest exact mode, in bounded time (not search to the loop's end)."""
    rec = tmp_path / "tsc.rrr"
    r = rrstub("record", str(kernels / "ticks.elf"), "-o", str(rec), "--mode", "fast", "--no-markers",
               "--cmdline", "work=4000000000 tsc=1", "--timeout", "3", timeout=60)
    assert r.returncode == 124, r.stderr        # the loop outlasts the recording by far
    started = time.monotonic()
    r = rrstub("replay", str(rec), timeout=60)
    took = time.monotonic() - started
    position, what, last = diverged(r, "exit")
    assert what.startswith(f"replay did not find the landmark at exit #{position + 1} within "), what
    assert "never with the recorded registers" in what and "recorded 0x" in what, what
    assert "--mode exact" in what and "rdtsc" in what, what
    assert last <= position and took < 30


def test_the_tsc_mixing_guest_replays_in_exact_mode(kernels, tmp_path):
    rec = tmp_path / "tsc.rrr"
    r = rrstub("record", str(kernels / "ticks.elf"), "-o", str(rec), "--mode", "exact",
               "--cmdline", "work=3000 tsc=1", timeout=60)
    assert r.returncode == 0, r.stderr
    replayed = rrstub("replay", str(rec))
    assert replayed.returncode == 0 and b"matched the recording" in replayed.stderr, replayed.stderr
    assert replayed.stdout == r.stdout


@pytest.mark.parametrize("name, unit", [("hello-fast", "exit"), ("hello-exact", "instruction")])
def test_a_wrong_check_digest_is_reported_where_it_was_checked(recordings, tmp_path, name, unit):
    edit = Nth(1, is_check, lambda e: dataclasses.replace(e, digest=e.digest ^ 1))
    rewrite(recordings[name].path, tmp_path / "bad.rrr", edit)
    assert edit.old is not None, "the recording has no state check to damage"
    r = rrstub("replay", str(tmp_path / "bad.rrr"))
    position, what, last = diverged(r, unit)
    assert position == edit.old.pos
    assert what == ("the general registers differ from the recording (register digest mismatch); "
                    "registers now:")
    assert f"rip={edit.old.rip:#x}" in r.stderr.decode()
    assert last == (edit.previous_check.pos if edit.previous_check else 0)


def test_a_wrong_recorded_exit_status_is_a_divergence_at_the_end(recordings, tmp_path):
    edit = Nth(1, is_end, lambda e: dataclasses.replace(e, status=3))
    rewrite(recordings["hello-fast"].path, tmp_path / "bad.rrr", edit)
    r = rrstub("replay", str(tmp_path / "bad.rrr"))
    position, what, last = diverged(r, "exit")
    assert position == edit.old.pos
    assert what == (f"the run ended with exit (status 0) at exit #{position}; the recording ended with "
                    f"exit (status 3) at exit #{position}. {HOST_READS}")
    assert last == (edit.previous_check.pos if edit.previous_check else 0)


def test_a_wrong_serial_hash_is_a_divergence(recordings, tmp_path):
    made = recordings["hello-fast"]
    rewrite(made.path, tmp_path / "bad.rrr", summary=lambda s: {**s, "serial_sha256": "0" * 64})
    r = rrstub("replay", str(tmp_path / "bad.rrr"))
    position, what, _ = diverged(r, "exit")
    n = len(made.stdout)
    assert what == (f"the guest's serial output differs from the recording ({n} bytes replayed, {n} recorded). "
                    f"{HOST_READS}")
    assert r.stdout == made.stdout


def test_a_changed_input_byte_is_a_divergence(recordings, tmp_path):
    made = recordings["echo-fast"]
    assert made.stdout == ECHO_INPUT.upper().replace(b"QUIT\n", b"bye\n")
    edit = Nth(1, has_input, lambda e: dataclasses.replace(e, input=e.input.replace(b"h", b"j", 1)))
    rewrite(made.path, tmp_path / "bad.rrr", edit)
    r = rrstub("replay", str(tmp_path / "bad.rrr"))
    position, what, last = diverged(r, "exit")
    assert r.stdout.startswith(b"JELLO\n")
    assert "serial output differs" in what or "registers differ" in what, what
    assert edit.old.pos <= position and last < position


@pytest.mark.parametrize("name, unit, nth", [("ticks-exact", "instruction", 1), ("ticks-fast", "exit", 10)])
def test_a_changed_clock_value_is_a_divergence(recordings, tmp_path, name, unit, nth):
    """100 ms later than recorded, early in the run: the PIT skips the ticks in between
    (vmm/devices/pit.py), so the guest sees fewer interrupts and replay notices (at the
    latest at the end, where the tick count it prints and its end position differ)."""
    edit = Nth(nth, has_time, lambda e: dataclasses.replace(e, time_ns=e.time_ns + 100_000_000))
    rewrite(recordings[name].path, tmp_path / "bad.rrr", edit)
    assert edit.old is not None, "the recording has no clock value to damage"
    r = rrstub("replay", str(tmp_path / "bad.rrr"))
    position, what, last = diverged(r, unit)
    assert edit.old.pos <= position and last < position, r.stderr


# ---------------------------------------------------------------------------
# info --json and the help texts


def test_info_json_describes_the_recording(recordings):
    made = recordings["ticks-markers"]
    info = info_json(made.path)
    assert info["complete"] is True and info["recovery_note"] == ""
    assert info["mode"] == "fast" and info["unit"] == "exits"
    assert info["mode_reason"] == "asked for on the command line"
    assert info["kernel"]["name"] == "ticks.elf" and len(info["kernel"]["sha256"]) == 64
    assert info["machine"] == {"mem_bytes": 64 << 20, "cmdline": "work=40000"}
    host = info["recorded"]["host"]
    assert host["machine"] == "x86_64" and host["name"] and host["kernel"]
    end = info["end"]
    assert (end["reason"], end["status"]) == ("exit", 0)
    assert end["serial_bytes"] == len(made.stdout) and end["position"] == info["last_position"] > 0
    assert 0 < end["guest_s"] and 0 < end["host_s"]
    markers = info["markers"]
    assert len(markers) >= 3, markers
    assert [m["index"] for m in markers] == list(range(len(markers)))
    assert markers[0]["full"] and markers[0]["position"] == 0 and markers[0]["pages"] is None
    for a, b in zip(markers, markers[1:]):
        assert a["position"] < b["position"] <= end["position"] and a["guest_s"] < b["guest_s"]
        assert not b["full"] and b["pages"] >= 1 and b["stored_bytes"] > 0
    events = info["events"]
    assert events["End"] == 1 and events["Point"] >= events["Point.landmark"] > 0
    assert events["Point.marker"] == len(markers) - 1
    sizes = info["sizes"]
    assert set(sizes) == {"config", "kernel", "marker", "events", "end"}
    assert sizes["marker"]["chunks"] == len(markers)
    assert sizes["kernel"]["raw"] == (recordings.kernels / "ticks.elf").stat().st_size
    assert sizes["marker"]["stored"] == sum(m["stored_bytes"] for m in markers)
    assert info["raw_bytes"] == sum(s["raw"] for s in sizes.values())
    index_and_trailer = info["file_bytes"] - HEADER_SIZE - sum(s["stored"] for s in sizes.values())
    assert TRAILER_SIZE < index_and_trailer < 4096
    text = rrstub("info", str(made.path))
    assert text.returncode == 0
    for mk in markers[1:]:
        assert re.search(rf"m{mk['index']}\s+at exit #{mk['position']}\s".encode(), text.stdout), text.stdout


@pytest.mark.parametrize("command, fragments", [
    ("record", ["exact", "fast", "auto", "exit status", "124", "130", "--no-markers", "--marker-every"]),
    ("replay", ["exit status", "65", "66", "2 ", "damaged", "--until", "--speed", "--kernel"]),
    ("info", ["--json", "mode", "markers"]),
], ids=["record", "replay", "info"])
def test_help_explains_modes_and_exit_statuses(command, fragments):
    r = rrstub(command, "--help")
    assert r.returncode == 0 and r.stderr == b""
    for f in fragments:
        assert f.encode() in r.stdout, (command, f)


def test_info_help_documents_its_exit_status():
    r = rrstub("info", "--help")
    assert b"exit status" in r.stdout
