"""Arguments refused before anything runs: numeric options, recording outputs, positions.

Every refusal is one line on stderr naming the input and what is valid, with
exit status 2, and happens before KVM is touched (the tests point
RRSTUB_KVM_DEVICE at a missing path: reaching KVM would exit 3).  Recordings
here are built with RecordingWriter, so no guest runs.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import rrstub
from elfgen import make_elf
from rrstub.recording import RecordingWriter

pytestmark = pytest.mark.timeout(60)

EXIT_USAGE = 2


def no_kvm(tmp_path) -> dict:
    return dict(os.environ, RRSTUB_KVM_DEVICE=str(tmp_path / "no-kvm"))


def one_line_refusal(r, *fragments: str) -> str:
    err = r.stderr.decode()
    assert r.returncode == EXIT_USAGE, err
    assert err.count("\n") == 1 and err.startswith("rrstub"), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, (f, err)
    return err


# ---------------------------------------------------------------------------
# Numeric options

SECONDS = "give seconds from 0.001 to 100000000"
NUMERIC = [   # (command, option, value, what the message says)
    ("run", "--timeout", "inf", f"inf is out of range: {SECONDS}"),
    ("run", "--timeout", "nan", f"'nan' is not a number: {SECONDS}"),
    ("run", "--timeout", "1e300", f"1e300 is out of range: {SECONDS}"),
    ("run", "--timeout", "0", f"0 is out of range: {SECONDS}"),
    ("run", "--mem", "1M", "1M is out of range: give a size from 2M to 3G"),
    ("run", "--mem", "4G", "4G is out of range: give a size from 2M to 3G"),
    ("run", "--mem", "4097K", "4097K: guest memory is a whole number of 4 KiB pages"),
    ("record", "--timeout", "inf", f"inf is out of range: {SECONDS}"),
    ("record", "--marker-every", "inf", "inf is out of range: give seconds from 0.0001 to 100000000"),
    ("record", "--marker-every", "nan", "'nan' is not a number: give seconds from 0.0001"),
    ("record", "--marker-every", "1e-10", "1e-10 is out of range: give seconds from 0.0001"),
    ("record", "--rolling", "inf", f"inf is out of range: {SECONDS}"),
    ("record", "--rolling", "nan", f"'nan' is not a number: {SECONDS}"),
    ("record", "--rolling", "1e-9", f"1e-9 is out of range: {SECONDS}"),
    ("record", "--quota", "1K", "1K is out of range: give a size from 64K to 1048576G"),
    ("record", "--quota", "99999999999G", "99999999999G is out of range: give a size from 64K"),
    ("record", "--quota", "lots", "'lots' is not a size"),
    ("record", "--mem", "0", "0 is out of range: give a size from 2M to 3G"),
    ("replay", "--speed", "nan", "'nan' is not a number: give max, realtime or a factor from 0.001 to 1000000"),
    ("replay", "--speed", "inf", "inf is out of range: give a factor from 0.001 to 1000000"),
    ("replay", "--speed", "0", "0 is out of range: give a factor"),
    ("replay", "--speed", "-2", "-2 is out of range: give a factor"),
    ("replay", "--speed", "1e-300", "1e-300 is out of range: give a factor"),
    ("replay", "--timeout", "nan", f"'nan' is not a number: {SECONDS}"),
    ("serve", "--clients", "0", "0 is out of range: give a number of sessions from 1"),
    ("serve", "--clients", "-1", "-1 is out of range: give a number of sessions from 1"),
    ("serve", "--clients", "2.5", "'2.5' is not a number: give a number of sessions from 1"),
]


@pytest.mark.parametrize("command, option, value, message", NUMERIC,
                         ids=[f"{c}{o}={v}" for c, o, v, _ in NUMERIC])
def test_numeric_options_are_checked_in_one_line(tmp_path, capsys, command, option, value, message):
    from rrstub.cli import main
    out = tmp_path / "out.rrr"
    head = {"run": ["k.elf"], "record": ["k.elf", "-o", str(out)], "replay": ["rec.rrr"],
            "serve": ["rec.rrr"]}[command]
    with pytest.raises(SystemExit) as e:
        main([command, *head, f"{option}={value}"])
    assert e.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"rrstub {command}: argument {option}: ") and message in err, err
    assert err.count("\n") == 1 and err.endswith(f"(see `rrstub {command} --help`)\n"), err
    assert not out.exists()


def test_argument_errors_from_the_installed_command_are_one_line(tmp_path):
    r = rrstub("record", "k.elf", "-o", str(tmp_path / "r.rrr"), "--marker-every", "nan", env=no_kvm(tmp_path))
    one_line_refusal(r, "rrstub record: argument --marker-every: 'nan' is not a number")


def test_numeric_options_accept_their_bounds_and_named_values():
    from rrstub.cli import build_parser
    p = build_parser()
    a = p.parse_args(["record", "k", "-o", "r", "--marker-every", "0.0001", "--rolling", "0.001",
                      "--quota", "64K", "--mem", "3G", "--timeout", "100000000"])
    assert (a.marker_every, a.rolling, a.quota, a.mem, a.timeout) == (0.0001, 0.001, 64 << 10, 3 << 30, 1e8)
    assert p.parse_args(["replay", "r", "--speed", "max"]).speed is None
    assert p.parse_args(["replay", "r", "--speed", "realtime"]).speed == 1.0
    assert p.parse_args(["replay", "r", "--speed", "2.5"]).speed == 2.5
    assert p.parse_args(["serve", "r", "--clients", "3"]).clients == 3


# ---------------------------------------------------------------------------
# What `record -o` may replace

def fake_recording(path, first: int = 0, last: int = 1000, markers=(0, 500), mode: str = "exact") -> None:
    """A finished recording with markers at ``markers`` and an end at ``last`` (no guest behind it)."""
    with RecordingWriter(path, {"mode": mode, "mem_size": 64 << 20, "cmdline": ""}, "k.elf", b"\x7fELF") as w:
        for i, position in enumerate((first,) + tuple(m for m in markers if m > first)):
            w.add_marker({"index": i, "position": position, "guest_ns": position}, b"")
            w.add_events(position, position, 0, b"")
        w.finish({"reason": "exit", "status": 0, "end_position": last, "guest_ns": last})


def record_to(tmp_path, out, *extra: str):
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(make_elf(b"\xf4"))
    return rrstub("record", str(kernel), "-o", str(out), *extra, env=no_kvm(tmp_path))


def test_record_does_not_overwrite_a_file_that_is_not_a_recording(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_bytes(b"my notes\n")
    r = record_to(tmp_path, text, "--force")
    one_line_refusal(r, f"-o {text} exists and is not an rrstub recording: rrstub does not overwrite it")
    assert text.read_bytes() == b"my notes\n"
    kernel = tmp_path / "k.elf"
    r = rrstub("record", str(kernel), "-o", str(kernel), env=no_kvm(tmp_path))
    one_line_refusal(r, f"-o {kernel} exists and is not an rrstub recording")
    assert kernel.read_bytes() == make_elf(b"\xf4")


def test_record_replaces_an_existing_recording_only_with_force(tmp_path):
    rec = tmp_path / "old.rrr"
    fake_recording(rec)
    before = rec.read_bytes()
    r = record_to(tmp_path, rec)
    one_line_refusal(r, f"-o {rec} is an existing recording: give --force to replace it")
    assert rec.read_bytes() == before
    # Past the output check, on to KVM, which is missing here (exit 3).
    r = record_to(tmp_path, rec, "--force")
    assert r.returncode == 3 and b"-o " not in r.stderr, r.stderr
    empty = tmp_path / "empty.rrr"
    empty.write_bytes(b"")
    r = record_to(tmp_path, empty)
    assert r.returncode == 3 and b"-o " not in r.stderr, r.stderr


@pytest.mark.parametrize("what", ["/dev/null", "a directory", "a missing directory", "an unwritable directory"])
def test_record_refuses_an_output_that_cannot_be_a_recording_before_running(tmp_path, what):
    locked = tmp_path / "locked"
    if what == "an unwritable directory":
        if os.geteuid() == 0:
            locked = Path("/proc")      # root writes past permission bits, but not into /proc
        else:
            locked.mkdir(mode=0o555)
    out = {"/dev/null": "/dev/null", "a directory": str(tmp_path), "a missing directory": str(tmp_path / "no" / "r.rrr"),
           "an unwritable directory": str(locked / "r.rrr")}[what]
    message = {"/dev/null": "-o /dev/null is not a regular file",
               "a directory": f"-o {tmp_path} is a directory: give the recording a file name",
               "a missing directory": f"the directory {tmp_path / 'no'} does not exist",
               "an unwritable directory": f"cannot create a file in {locked}"}[what]
    one_line_refusal(record_to(tmp_path, out), message)


def test_every_recording_output_is_checked(tmp_path):
    """run --allow-guest-record -o, replay --go-live -o and crop -o follow the rule of record -o."""
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(make_elf(b"\xf4"))
    rec, text = tmp_path / "rec.rrr", tmp_path / "notes.txt"
    fake_recording(rec)
    text.write_bytes(b"keep me")
    env = no_kvm(tmp_path)
    for args in (["run", str(kernel), "--allow-guest-record", "-o", str(text)],
                 ["replay", str(rec), "--go-live", "m1", "-o", str(text)],
                 ["crop", str(rec), "--from", "m0", "--to", "m1", "-o", str(text), "--force"]):
        one_line_refusal(rrstub(*args, env=env), f"-o {text} exists and is not an rrstub recording")
    assert text.read_bytes() == b"keep me"


# ---------------------------------------------------------------------------
# Positions

@pytest.mark.parametrize("option", ["--until", "--from", "--go-live"])
def test_positions_past_the_end_are_refused_with_the_range(tmp_path, option):
    rec = tmp_path / "rec.rrr"
    fake_recording(rec)
    r = rrstub("replay", str(rec), option, "999999999", env=no_kvm(tmp_path))
    one_line_refusal(r, f"{option} 999999999: the recording has instructions 0..1000; "
                        "it ends before reaching 999999999")
    r = rrstub("replay", str(rec), option, "m7", env=no_kvm(tmp_path))
    one_line_refusal(r, f"{option} m7: the recording has markers m0..m1")


def test_positions_before_a_cropped_start_are_refused(tmp_path):
    rec = tmp_path / "crop.rrr"
    fake_recording(rec, first=300, last=900, markers=(300, 600), mode="exact")
    r = rrstub("replay", str(rec), "--until", "100", env=no_kvm(tmp_path))
    one_line_refusal(r, "--until 100: the recording has instructions 300..900; it starts at 300")
    r = rrstub("info", "--json", str(rec))
    assert b'"first_position": 300' in r.stdout and b'"last_position": 900' in r.stdout


def test_a_fast_recordings_positions_are_instruction_counts(tmp_path):
    # Its markers are logged at exit numbers: a later one is found by the replay, by its index.
    from rrstub.recording import Recording
    from rrstub.session import RecordedMarker, resolve_position
    rec_path = tmp_path / "fast.rrr"
    fake_recording(rec_path, first=300, last=900, markers=(300, 600), mode="fast")
    with Recording.open(rec_path) as rec:
        assert resolve_position(rec, "100") == 100          # instructions from its first marker
        assert resolve_position(rec, "m0") == 0
        assert resolve_position(rec, "m1") == RecordedMarker(1)
        with pytest.raises(ValueError, match="positions are instruction counts from 0"):
            resolve_position(rec, "-1")
        with pytest.raises(ValueError, match="has markers m0..m1"):
            resolve_position(rec, "m2")


def test_crop_names_the_range_of_markers(tmp_path):
    rec = tmp_path / "rec.rrr"
    fake_recording(rec)
    r = rrstub("crop", str(rec), "--from", "m0", "--to", "m9", "-o", str(tmp_path / "c.rrr"), "--no-verify")
    assert r.returncode == EXIT_USAGE
    assert b"--to 'm9': " in r.stderr and b"has no such marker. It has markers m0..m1: m0 at 0, m1 at 500" in r.stderr


def test_the_position_range_is_the_one_info_reports(tmp_path):
    from rrstub.recording import Recording
    from rrstub.session import resolve_position
    rec_path = tmp_path / "rec.rrr"
    fake_recording(rec_path)
    with Recording.open(rec_path) as rec:
        assert rec.position_range() == (0, 1000)
        assert resolve_position(rec, "1000") == 1000 and resolve_position(rec, "m1") == 500
        with pytest.raises(ValueError, match="--go-live 1001: the recording has instructions 0..1000"):
            resolve_position(rec, "1001", "--go-live")
