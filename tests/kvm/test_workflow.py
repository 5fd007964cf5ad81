"""Everything around a recording, on real recordings of the example kernels: crop, quota and
rolling recording, going live into branches, guest-controlled recording, named markers, labels."""
from __future__ import annotations

import os
import re

import pytest

from conftest import guest_seconds, marker_every, recording_info as info, rrstub
from rrstub.edit import add_label
from rrstub.recording import Recording
from rrstub.replay.timeline import Timeline

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(180)]

RACE = ("--mode", "exact", "--mem", "4M", "--cmdline", "increments=2000", "--timeout", "60")
FAST_RACE = ("--mode", "fast", "--cmdline", "increments=3000", "--timeout", "60")


@pytest.fixture(scope="module")
def race(kernels, tmp_path_factory):
    """race, exact, about 16 markers (m0 and automatic ones)."""
    path = tmp_path_factory.mktemp("workflow") / "race.rrr"
    r = rrstub("record", str(kernels / "race.elf"), "-o", str(path), *RACE, "--marker-every",
               marker_every(16, kernels / "race.elf", *RACE), timeout=120)
    assert r.returncode == 1, r.stderr
    assert len(info(path)["markers"]) >= 10, "too few markers for the tests below"
    return path, r.stdout


def replays(path, *args) -> tuple[int, bytes, str]:
    r = rrstub("replay", str(path), *args, timeout=120)
    assert "matched the recording" in r.stderr.decode(), r.stderr
    return r.returncode, r.stdout, r.stderr.decode()


def test_crop_between_markers_replays_and_verifies(race, tmp_path):
    path, _ = race
    original = info(path)
    count = len(original["markers"])
    first, last = count // 4, 3 * count // 4       # inside the recording, after m1
    out = tmp_path / "part.rrr"
    r = rrstub("crop", str(path), "--from", f"m{first}", "--to", f"m{last}", "-o", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    assert b"verified" in r.stderr
    part = info(out)
    assert part["markers"][0]["position"] == original["markers"][first]["position"]
    assert part["markers"][0]["full"] and len(part["markers"]) == last - first + 1
    assert part["end"]["position"] == original["markers"][last]["position"]
    assert part["derived"]["from_id"] == original["id"] and part["derived"]["from_marker"] == first
    assert part["file_bytes"] < original["file_bytes"]
    status, _, _ = replays(out)
    assert status == 0
    # The crop is self-contained: the timeline serves it and moves inside it.
    with Timeline(str(out)) as t:
        middle = (part["markers"][0]["position"] + part["end"]["position"]) // 2
        t.goto(middle)
        assert t.position == middle


def test_crop_refuses_bad_markers_naming_them(race, tmp_path):
    path, _ = race
    r = rrstub("crop", str(path), "--from", "m5", "--to", "m2", "-o", str(tmp_path / "x.rrr"))
    assert r.returncode == 2 and b"is not after --from" in r.stderr
    r = rrstub("crop", str(path), "--from", "nosuch", "--to", "m2", "-o", str(tmp_path / "x.rrr"))
    assert r.returncode == 2 and b"no such marker" in r.stderr and b"m0" in r.stderr
    assert not (tmp_path / "x.rrr").exists()


def test_rolling_keeps_the_last_window_and_replays(kernels, tmp_path):
    out = tmp_path / "roll.rrr"
    window = round(guest_seconds(kernels / "race.elf", *RACE) / 5, 6)     # room for a few rebases
    r = rrstub("record", str(kernels / "race.elf"), "-o", str(out), *RACE, "--rolling", str(window),
               timeout=120)
    assert r.returncode == 1, r.stderr
    assert b"rolling: dropped guest time" in r.stderr
    i = info(out)
    assert i["markers"][0]["full"] and i["markers"][0]["position"] > 0
    first_s = i["markers"][0]["guest_s"]
    # At least the window; at most 1.5 windows, plus up to a marker interval (a quarter window)
    # until the next marker would rebase.
    assert window <= i["end"]["guest_s"] - first_s <= window * 1.5 + window / 3
    assert i["rolling"]["rebases"] >= 2
    status, stdout, _ = replays(out)
    assert status == 1 and b"race: counter=" in stdout


def test_quota_stops_recording_within_one_chunk(kernels, tmp_path):
    out = tmp_path / "q.rrr"
    quota = 100 * 1024
    # About 150 markers of about 1.5 KB: the whole run would take twice the quota.
    r = rrstub("record", str(kernels / "race.elf"), "-o", str(out), *RACE, "--marker-every",
               marker_every(150, kernels / "race.elf", *RACE), "--quota", "100K", timeout=120)
    assert r.returncode == 75, r.stderr
    assert b"reached --quota" in r.stderr
    with Recording.open(out) as rec:
        biggest = max(c.stored_size for c in rec.chunks)
    assert quota // 2 < os.path.getsize(out) <= quota + biggest
    status, _, _ = replays(out)
    assert status == 75


def test_rolling_with_quota_drops_the_oldest_part(kernels, tmp_path):
    out = tmp_path / "rq.rrr"
    quota = 100 * 1024
    whole_run = guest_seconds(kernels / "race.elf", *RACE)
    r = rrstub("record", str(kernels / "race.elf"), "-o", str(out), *RACE, "--marker-every",
               marker_every(150, kernels / "race.elf", *RACE), "--quota", "100K",
               "--rolling", str(round(whole_run * 10, 6)), timeout=120)   # only the quota drops anything
    assert r.returncode == 1, r.stderr          # the guest's own end: nothing stopped it
    assert b"neared --quota" in r.stderr
    with Recording.open(out) as rec:
        biggest = max(c.stored_size for c in rec.chunks)
        assert rec.markers[0].meta["position"] > 0
    assert os.path.getsize(out) <= quota + biggest
    status, stdout, _ = replays(out)
    assert status == 1 and b"race: counter=" in stdout


def test_go_live_from_a_marker_records_a_branch_that_replays(race, tmp_path):
    path, _ = race
    parent = info(path)
    middle = len(parent["markers"]) // 2
    branch = tmp_path / "branch.rrr"
    r = rrstub("replay", str(path), "--go-live", f"m{middle}", "-o", str(branch), timeout=120)
    assert r.returncode == 1, r.stderr
    assert b"race: counter=" in r.stdout and b"live from instruction" in r.stderr
    child = info(branch)
    assert child["parent"]["id"] == parent["id"]
    assert child["parent"]["position"] == parent["markers"][middle]["position"]
    assert child["markers"][0]["origin"] == "branch" and child["markers"][0]["full"]
    status, stdout, _ = replays(branch)
    assert status == 1 and stdout == r.stdout       # the same live run, replayed on its own


def test_go_live_between_markers_and_without_keeping(race, tmp_path):
    path, _ = race
    markers = info(path)["markers"]
    middle = len(markers) // 2
    between = (markers[middle]["position"] + markers[middle + 1]["position"]) // 2
    branch = tmp_path / "b2.rrr"
    r = rrstub("replay", str(path), "--go-live", str(between), "-o", str(branch), timeout=120)
    assert r.returncode == 1, r.stderr
    assert info(branch)["parent"]["position"] == between
    replays(branch)
    r = rrstub("replay", str(path), "--go-live", "m2", timeout=120)
    assert r.returncode == 1 and b"not recorded" in r.stderr
    r = rrstub("replay", str(path), "--go-live", "99999999", "-o", str(tmp_path / "b3.rrr"))
    assert r.returncode == 2 and b"before reaching 99999999" in r.stderr


def test_go_live_from_a_fast_recording(kernels, tmp_path):
    rec, branch = tmp_path / "fast.rrr", tmp_path / "fb.rrr"
    r = rrstub("record", str(kernels / "race.elf"), "-o", str(rec), *FAST_RACE, "--marker-every",
               marker_every(8, kernels / "race.elf", *FAST_RACE), timeout=120)
    assert r.returncode == 1, r.stderr
    parent = info(rec)
    markers = parent["markers"]
    assert len(markers) >= 2, markers       # live runs vary in length, but never by a factor of 8
    middle = len(markers) // 2
    # The marker is stored at an exit number; replay counts the instructions up to it.
    r = rrstub("replay", str(rec), "--until", f"m{middle}", timeout=120)
    assert r.returncode == 0, r.stderr
    at = int(re.search(rb"stopped at instruction (\d+) \(--until\)", r.stderr)[1])
    assert at > markers[middle]["position"]     # instructions outnumber exits
    r = rrstub("replay", str(rec), "--go-live", f"m{middle}", "-o", str(branch), timeout=120)
    assert r.returncode == 1, r.stderr
    assert b"race: counter=" in r.stdout and f"live from instruction {at} (".encode() in r.stderr, r.stderr
    child = info(branch)
    assert child["parent"]["id"] == parent["id"]
    assert (child["parent"]["position"], child["parent"]["unit"], child["parent"]["at"]) == (
        at, "instruction", f"m{middle}")
    assert child["markers"][0]["origin"] == "branch" and child["markers"][0]["full"]
    assert f"at instruction {at} (--go-live m{middle})".encode() in rrstub("info", str(branch)).stdout
    status, stdout, _ = replays(branch)
    assert status == 1 and stdout == r.stdout       # the same live run, replayed on its own
    # Between markers: an instruction count like any other.
    between = at + 1000
    r = rrstub("replay", str(rec), "--go-live", str(between), "-o", str(tmp_path / "fb2.rrr"), timeout=120)
    assert r.returncode == 1, r.stderr
    assert f"live from instruction {between} (".encode() in r.stderr
    child = info(tmp_path / "fb2.rrr")
    assert (child["parent"]["position"], child["parent"]["unit"]) == (between, "instruction")
    replays(tmp_path / "fb2.rrr")


def test_guest_started_recording_replays(kernels, tmp_path):
    out = tmp_path / "g.rrr"
    r = rrstub("run", str(kernels / "ticks.elf"), "--allow-guest-record", "-o", str(out), "--mode", "exact",
               "--cmdline", "guest_record=1 work=30000", timeout=120)
    assert r.returncode == 0, r.stderr
    assert b"the guest started recording" in r.stderr and b"the guest stopped recording" in r.stderr
    i = info(out)
    assert i["guest_controlled"]
    m0, m1 = i["markers"][:2]
    assert m0["origin"] == "guest-start" and m0["position"] > 100000      # a third of the work ran before
    assert m1["origin"] == "hypercall" and m1["name"] == "recorded-work"
    assert i["end"]["reason"] == "stopped"
    status, stdout, stderr = replays(out)
    assert status == 0 and re.match(rb"ticks: recorded part ends at tick \d+ \(start: recording\)\n$", stdout)
    assert "HC_DENIED" not in stderr


def test_guest_record_needs_permission(kernels, tmp_path):
    r = rrstub("run", str(kernels / "ticks.elf"), "--cmdline", "guest_record=1 work=3000", timeout=60)
    assert r.returncode == 0
    assert b"start: refused" in r.stdout and b"--allow-guest-record" in r.stderr
    r = rrstub("run", str(kernels / "ticks.elf"), "-o", str(tmp_path / "x.rrr"))
    assert r.returncode == 2 and b"go together" in r.stderr


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` now (SigCgt in /proc/PID/status)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def test_signal_markers_are_named(kernels, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "s.rrr"
    # A guest that outlasts --timeout: the recorder is running it whenever the signal arrives.
    proc = subprocess.Popen([sys.executable, "-m", "rrstub", "record", str(kernels / "ticks.elf"), "-o",
                             str(out), "--mode", "exact", "--cmdline", "work=4000000000", "--timeout", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not catches(proc.pid, signal.SIGUSR1):    # the recorder takes SIGUSR1 once the guest runs
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 124, err
    markers = info(out)["markers"]
    assert [m["name"] for m in markers if m["origin"] == "signal"] == ["signal-1"], markers


def test_labels_are_saved_and_taken_by_until(race, tmp_path):
    path, _ = race
    copy = tmp_path / "labelled.rrr"
    copy.write_bytes(path.read_bytes())
    middle = info(path)["end"]["position"] // 2
    add_label(str(copy), "here", middle)
    i = info(copy)
    assert i["labels"] == [{"name": "here", "position": middle}]
    assert b"here" in rrstub("info", str(copy)).stdout
    r = rrstub("replay", str(copy), "--until", "here", timeout=120)
    assert r.returncode == 0 and f"stopped at instruction {middle}".encode() in r.stderr
    rrstub("info", str(copy), "--verify").check_returncode()


def _interruptible(trace_lines: list[dict]) -> list[int]:
    """Positions where an interrupt can be taken at once: IF set, and not just after an sti."""
    out, rflags, after_sti = [], 0, False
    for x in trace_lines:
        if rflags & 0x200 and not after_sti:
            out.append(x["pos"])
        rflags = int(x["changed"].get("rflags", hex(rflags)), 16)
        after_sti = x["asm"] == "sti"
    return out


def test_go_live_with_input_waiting_at_the_branch_point_replays(kernels, tmp_path):
    """The live run delivers input at the branch's very first point; so must the branch's replay."""
    import json
    parent = tmp_path / "echo.rrr"
    r = rrstub("record", str(kernels / "echo.elf"), "-o", str(parent), "--mode", "exact", "--mem", "4M",
               "--serial-in", "-", input=b"first line\n", timeout=60)
    assert b"FIRST LINE" in r.stdout, r.stderr
    r = rrstub("trace", str(parent), "--format", "jsonl", timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    # The trace ends with the hlt the guest never woke from: every position has its line.
    assert lines[-1]["asm"] == "hlt" and lines[-1]["pos"] == info(parent)["end"]["position"] - 1
    open_at = [p for p in _interruptible(lines) if p < lines[-1]["pos"]]
    assert open_at, "the guest never ran with interrupts enabled"
    typed = tmp_path / "typed.txt"
    typed.write_bytes(b"typed\nquit\n")
    branch = tmp_path / "branch.rrr"
    r = rrstub("replay", str(parent), "--go-live", str(open_at[-1]), "-o", str(branch),
               "--serial-in", str(typed), timeout=60)
    assert r.returncode == 0 and b"TYPED\nbye\n" in r.stdout, r.stderr
    status, stdout, err = replays(branch)
    assert status == 0 and stdout.endswith(b"TYPED\nbye\n"), err
    # Its last position is where the guest hung: no live run can go on from there.
    r = rrstub("replay", str(parent), "--go-live", str(info(parent)["end"]["position"]), "-o", str(tmp_path / "b2.rrr"),
               "--serial-in", str(typed), timeout=60)
    assert r.returncode == 2 and b"the recording ends there (hung)" in r.stderr, r.stderr
    assert not (tmp_path / "b2.rrr").exists()
