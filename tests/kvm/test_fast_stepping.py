"""Fast recordings replayed instruction by instruction, and the landmarks their recorder moves.

``FastStepEngine`` replays a fast log while stepping every instruction;
these tests hold it to the recording on a file that once diverged, and
check that a landmark the recorder moved out of a tight loop
(``FastEngine._relocate``) is found by both replays.
"""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from conftest import recording_info, rrstub
from rrstub import session

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(300)]

DATA = Path(__file__).resolve().parent.parent / "data"


def stepping_replay(path) -> session.ReplayResult:
    """The whole recording, instruction by instruction (``--from 0`` makes replay step)."""
    return session.replay(str(path), start=0, serial_out=io.BytesIO())


def test_an_interrupt_injected_before_a_hlt_is_taken_before_it():
    # race-fast-hlt-landmark.rrr (fast, race.elf) has a landmark right before a worker's idle
    # hlt, where the recorder injected the timer interrupt: KVM delivered it before the hlt.
    # A stepping replay that emulated the hlt first waited for a wake-up the log does not have.
    path = DATA / "race-fast-hlt-landmark.rrr"
    result = stepping_replay(path)
    assert (result.outcome.reason, result.outcome.status) == ("exit", 1)
    assert result.verified_end and result.engine.log_pos == recording_info(path)["end"]["position"]


def test_landmarks_moved_out_of_loops_are_found_by_both_replays(kernels, tmp_path):
    path = tmp_path / "race.rrr"
    r = rrstub("record", str(kernels / "race.elf"), "-o", str(path), "--mode", "fast", "--mem", "4M",
               timeout=120)
    assert r.returncode == 1, r.stderr
    end = recording_info(path)["end"]
    # race spends most of its time in increment()'s spin loop: most kicks land there.
    assert end["relocated_landmarks"] > end["landmarks"] // 4, end
    free = session.replay(str(path), serial_out=io.BytesIO())
    assert free.verified_end and free.outcome.position == end["position"]
    stepped = stepping_replay(path)
    assert stepped.verified_end and stepped.engine.log_pos == end["position"]
    assert stepped.serial_sha256 == free.serial_sha256
    assert stepped.engine.landmarks == free.engine.landmarks == end["landmarks"]


def test_a_position_past_a_fast_recordings_end_is_refused_once_the_end_is_known(kernels, tmp_path):
    # Exact recordings refuse it up front; a fast one's end in instructions is found by replaying.
    path = tmp_path / "hello.rrr"
    r = rrstub("record", str(kernels / "hello.elf"), "-o", str(path), "--mode", "fast", timeout=60)
    assert r.returncode == 0, r.stderr
    lines = rrstub("trace", str(path), "-q").stdout.splitlines()
    end = len(lines)
    r = rrstub("replay", str(path), "--until", str(end + 1000))
    assert r.returncode == 2
    assert f"--until {end + 1000}: the recording ends at instruction {end} (exit), before reaching".encode() \
        in r.stderr, r.stderr
    r = rrstub("trace", str(path), "--to", str(end + 1000))
    assert r.returncode == 2 and len(r.stdout.splitlines()) == end
    assert f"the recording ends at instruction {end}, before reaching {end + 1000}".encode() in r.stderr
    r = rrstub("replay", str(path), "--until", str(end))
    assert r.returncode == 0 and f"stopped at instruction {end} (--until)".encode() in r.stderr, r.stderr
