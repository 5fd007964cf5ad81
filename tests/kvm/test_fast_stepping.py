"""Fast recordings replayed instruction by instruction, and the landmarks their recorder moves.

``FastStepEngine`` replays a fast log while stepping every instruction;
these tests hold it to a recording with landmarks at a hlt (where one once diverged), and
check that a landmark the recorder moved out of a tight loop
(``FastEngine._relocate``) is found by both replays.
"""
from __future__ import annotations

import io

import pytest

from elftools.elf.elffile import ELFFile

from conftest import recording_info, rrstub
from rrstub import edit, events as ev, session
from rrstub.engines import LogSource
from rrstub.recording import Recording
from vmm.kvm import REG_NAMES
from rrstub.replay.timeline import Timeline

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(300)]

HLT = 0xF4
# Not a multiple of race's 1 ms tick: a marker falling due on a tick was mostly taken at the
# exit after it (13 of 14 in one clean-clone run); between ticks, at the next kick.
MARKER_EVERY = "0.0037"


def stepping_replay(path) -> session.ReplayResult:
    """The whole recording, instruction by instruction (``--from 0`` makes replay step)."""
    return session.replay(str(path), start=0, serial_out=io.BytesIO())


def landmarks_at_hlt(path) -> int:
    """How many of a fast recording's landmarks are at a hlt instruction of its kernel."""
    rec = Recording.open(path)
    text = ELFFile(io.BytesIO(rec.kernel_bytes())).get_section_by_name(".text")
    code, base = text.data(), text["sh_addr"]
    source, found = LogSource(rec), 0
    while (e := source.pop() if source.peek() is not None else None) is not None:
        if isinstance(e, ev.Point) and e.landmark is not None:
            found += code[e.landmark[REG_NAMES.index("rip")] - base] == HLT
    return found


def test_an_interrupt_injected_before_a_hlt_is_taken_before_it(kernels, tmp_path):
    # ticks idle=N polls the PIT until a tick is near, then halts: a tick that kicks the recorder
    # out of the polling loop is moved to the loop's exit, the hlt, and injected there (KVM
    # delivers it before the hlt).  A stepping replay that emulated the hlt first waited for a
    # wake-up the log does not have.
    for attempt in range(3):
        path = tmp_path / f"idle{attempt}.rrr"
        r = rrstub("record", str(kernels / "ticks.elf"), "-o", str(path), "--mode", "fast",
                   "--cmdline", "work=1000 idle=200", timeout=120)
        assert r.returncode == 0, r.stderr
        if landmarks_at_hlt(path):
            break
    else:
        pytest.fail("3 fast recordings of ticks idle=200 had no landmark at its hlt")
    result = stepping_replay(path)
    assert (result.outcome.reason, result.outcome.status) == ("exit", 0)
    assert result.verified_end and result.engine.log_pos == recording_info(path)["end"]["position"]


def test_landmarks_moved_out_of_loops_are_found_by_both_replays(kernels, tmp_path):
    path = tmp_path / "race.rrr"
    r = rrstub("record", str(kernels / "race.elf"), "-o", str(path), "--mode", "fast", "--mem", "4M",
               "--cmdline", "increments=3000", timeout=120)
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


def test_a_replay_that_leaves_the_log_says_so(kernels, tmp_path):
    # ticks with tsc=1 mixes host TSC values into its state at CPL0: no replay of a fast
    # recording of it can follow, and stepping must report that, not run on in a made-up history.
    path = tmp_path / "tsc.rrr"
    r = rrstub("record", str(kernels / "ticks.elf"), "-o", str(path), "--mode", "fast",
               "--cmdline", "tsc=1 work=20000", timeout=120)
    assert r.returncode == 0, r.stderr
    for args in (("replay", str(path), "--until", "1000000000"), ("trace", str(path), "-q")):
        r = rrstub(*args, timeout=240)
        assert r.returncode == 66, (args, r.stderr)
        assert b"diverged" in r.stderr or b"no longer follows" in r.stderr, r.stderr


def test_a_crop_that_starts_at_a_landmark_replays_as_the_original(kernels, tmp_path):
    # A fast recording's marker taken at a landmark resumes after the landmark's point: its
    # interrupt is injected there, in the crop as in the original.
    # Whether a marker's point is a landmark (a kick) or an exit follows the host's timing:
    # choose from the recording a few of each kind, landmarks first (a busy host may give a
    # recording without one: record again, up to three times).
    for attempt in range(3):
        path = tmp_path / f"race{attempt}.rrr"
        r = rrstub("record", str(kernels / "race.elf"), "-o", str(path), "--mode", "fast", "--mem", "4M",
                   "--cmdline", "increments=3000", "--marker-every", MARKER_EVERY, timeout=120)
        assert r.returncode == 1, r.stderr
        markers = recording_info(path)["markers"]
        assert len(markers) >= 6, markers
        with Recording.open(str(path)) as rec:
            kinds = {k: edit.resume_of(rec, k) for k in range(1, len(markers) - 1)}
        at_landmark = [k for k, how in kinds.items() if how == "after_landmark"]
        at_exit = [k for k, how in kinds.items() if how == "after_point"]
        if at_landmark:
            break
    else:
        pytest.fail("3 recordings, and none had a marker taken at a landmark: nothing to test")
    chosen = at_landmark[:4] + at_exit[:2]
    with Timeline(str(path), serial_out=io.BytesIO()) as original:
        original.cont()                         # learns every marker's instruction
        for k in chosen:
            crop = tmp_path / f"crop{k}.rrr"
            r = rrstub("crop", str(path), "--from", f"m{k}", "--to", f"m{k + 1}", "-o", str(crop),
                       "--no-verify")
            assert r.returncode == 0, r.stderr
            with Timeline(str(crop), serial_out=io.BytesIO()) as cropped:
                assert cropped.rec.markers[0].meta.get("resume") == kinds[k], k
                original.goto(original.recorded_at[k])
                for i in range(40):
                    assert cropped.registers() == original.registers(), f"crop from m{k}, instruction {i}"
                    cropped.step()
                    original.step()


def test_a_marker_taken_in_a_halt_restores_into_the_halt(kernels, tmp_path):
    # echo idles in hlt waiting for input; markers asked for then (SIGUSR1) are taken at wake-ups
    # of the halted guest.  Restoring such a marker must go on with the wake-ups logged there.
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    path = tmp_path / "echo.rrr"
    proc = subprocess.Popen([sys.executable, "-m", "rrstub", "record", str(kernels / "echo.elf"), "-o", str(path),
                             "--mode", "fast", "-q", "--serial-in", "-", "--timeout", "30"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.5)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    proc.stdin.write(b"hello\n")
    proc.stdin.flush()
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    proc.stdin.write(b"quit\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out == b"HELLO\nbye\n", err
    assert len(recording_info(path)["markers"]) >= 3
    with Timeline(str(path), serial_out=io.BytesIO()) as straight, \
            Timeline(str(path), serial_out=io.BytesIO()) as restored:
        straight.summaries = restored.summaries = False
        end = restored.cont()                   # to the end: the markers become checkpoints
        assert end.kind == "end" and len(restored.recorded_at) >= 3
        for index, position in sorted(restored.recorded_at.items()):
            for t in (restored, straight):
                t.goto(position)
                t.step()
            assert restored.registers() == straight.registers(), f"m{index} at instruction {position}"
            again = restored.cont()
            assert (again.kind, again.position) == (end.kind, end.position), f"from m{index}"
