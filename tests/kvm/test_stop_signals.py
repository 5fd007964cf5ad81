"""Nothing recorded is lost when a recorder is stopped: SIGTERM, a full disk.

SIGTERM (what `timeout`, systemd and CI send) ends a recording the way
Ctrl-C does: the file is finished, a message says where, the exit status is
143.  A full disk stops it with status 74 and leaves an incomplete
recording that replays up to its last complete chunk.  Positions come from
the recordings the tests make (`rrstub info --json`), never from an assumed
host speed.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, rrstub
from rrstub.engines import place
from rrstub.recording import Recording, RecordingError

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

EXIT_INCOMPLETE = 65
EXIT_DISK_FULL = 74
EXIT_TERMINATED = 143
RACE_LINE = b"race: counter="


def info_json(path: Path) -> dict:
    r = rrstub("info", "--json", str(path))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def has_initial_marker(path: Path) -> bool:
    try:
        with Recording.open(path) as rec:
            return bool(rec.markers)
    except RecordingError:
        return False


def stop_after(args: list[str], out: Path, signum: int, after: float) -> tuple[int, str]:
    """Run `rrstub ARGS`; ``after`` s after ``out`` holds its initial marker, send ``signum``."""
    proc = subprocess.Popen([sys.executable, "-m", "rrstub", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not has_initial_marker(out):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no initial marker in 30 s"
            time.sleep(0.01)
        time.sleep(after)
        assert proc.poll() is None, "the guest finished before the signal; give it more work"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode()


def skip_if_no_exact(returncode: int, err: str) -> None:
    if returncode == 2 and "needs single-stepping at guest CPL0" in err:
        pytest.skip("this host's KVM cannot single-step guest CPL0: no exact mode")


def assert_finished_by_sigterm(path: Path, err: str, unit: str) -> dict:
    info = info_json(path)
    assert info["complete"], info["recovery_note"]
    end = info["end"]
    assert (end["reason"], end["status"]) == ("interrupted", EXIT_TERMINATED)
    assert end["position"] > 0 and info["sizes"]["events"]["chunks"] >= 1
    assert (f"rrstub: SIGTERM stopped the recording at {place(unit, end['position'])}: {path} is "
            "finished and replays up to there") in err, err
    assert "Traceback" not in err
    return info


def test_sigterm_finishes_a_fast_recording(kernels, tmp_path):
    path = tmp_path / "ticks.rrr"
    code, err = stop_after(["record", str(kernels / "ticks.elf"), "-o", str(path), "--mode", "fast",
                            "--cmdline", "work=3000000"], path, signal.SIGTERM, 0.5)
    assert code == EXIT_TERMINATED, err
    assert_finished_by_sigterm(path, err, "exit")


def test_sigterm_finishes_an_exact_recording_that_replays_and_a_branch(kernels, tmp_path):
    path = tmp_path / "race.rrr"
    code, err = stop_after(["record", str(kernels / "race.elf"), "-o", str(path), "--mode", "exact",
                            "--cmdline", "increments=100000"], path, signal.SIGTERM, 1.0)
    skip_if_no_exact(code, err)
    assert code == EXIT_TERMINATED, err
    end = assert_finished_by_sigterm(path, err, "instruction")["end"]
    r = rrstub("replay", str(path))
    assert r.returncode == EXIT_TERMINATED, r.stderr
    assert f"replayed interrupted (status 143) at instruction {end['position']},".encode() in r.stderr
    # --go-live -o records through the same path: SIGTERM finishes the branch too.
    branch = tmp_path / "branch.rrr"
    code, err = stop_after(["replay", str(path), "--go-live", "m0", "-o", str(branch)], branch,
                           signal.SIGTERM, 0.5)
    assert code == EXIT_TERMINATED, err
    assert_finished_by_sigterm(branch, err, "instruction")


def test_sigterm_ends_a_live_run_like_ctrl_c(kernels, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "rrstub", "run", str(kernels / "race.elf"),
                             "--cmdline", "increments=100000000"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)      # past interpreter start-up: the guest runs
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == EXIT_TERMINATED
    assert err == b"rrstub: terminated (SIGTERM)\n"


# rrstub.recording's os on a disk that fills up: the Nth write to the file
# writes half its bytes, the next ones fail with ENOSPC.
FULL_DISK = """
import errno, os, sys
from rrstub import recording
from rrstub.cli import main

class FullDisk:
    def __init__(self, writes):
        self.left = writes
    def __getattr__(self, name):
        return getattr(os, name)
    def write(self, fd, data):
        self.left -= 1
        if self.left > 0:
            return os.write(fd, data)
        if self.left == 0:
            return os.write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

recording.os = FullDisk(int(sys.argv[1]))
sys.exit(main(sys.argv[2:]))
"""


def test_a_full_disk_stops_recording_with_its_own_status_and_keeps_a_replayable_prefix(kernels, tmp_path):
    path = tmp_path / "race.rrr"
    # Writes: file header, CONFIG, KERNEL, m0, then events and markers: the 12th is cut short.
    r = subprocess.run([sys.executable, "-c", FULL_DISK, "12", "record", str(kernels / "race.elf"),
                        "-o", str(path), "--mode", "fast", "--cmdline", "increments=2000",
                        "--marker-every", "0.01"], cwd=ROOT, capture_output=True, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == EXIT_DISK_FULL, err
    assert f"rrstub: {path}: cannot write at byte offset " in err and "No space left on device" in err
    assert f"rrstub: the disk is full: recording stopped; {path} keeps every chunk written before" in err
    assert "Traceback" not in err
    info = info_json(path)
    assert not info["complete"] and info["last_position"] > 0 and len(info["markers"]) >= 2
    r = rrstub("replay", str(path))
    assert r.returncode == EXIT_INCOMPLETE, r.stderr
    assert (f"replayed the incomplete recording to its last complete chunk: "
            f"{place('exit', info['last_position'])}, ").encode() in r.stderr
    assert not r.stdout or RACE_LINE.startswith(r.stdout[:len(RACE_LINE)])


@pytest.mark.parametrize("command", ["record", "run", "replay", "crop"])
def test_help_documents_the_full_disk_and_sigterm_statuses(command):
    r = rrstub(command, "--help")
    assert r.returncode == 0
    assert b"74 " in r.stdout and b"the disk (or" in r.stdout
    if command != "crop":
        assert b"143" in r.stdout
