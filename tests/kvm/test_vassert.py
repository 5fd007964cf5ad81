"""VAssert: replay-time assertions (rrstub/vassert.py, examples/include/rrstub_vassert.h).

The race kernel built with -DRACE_VASSERT (examples/build/race-vassert.elf)
stores the counter with an exchange and asserts ``old == seen``: the store
overwrote nobody's update.  Each failure overwrote ``old - seen`` updates,
so over all failures the differences add up to the ``lost=`` the guest
prints, exactly.  A --vassert replay must find exactly those, and must
still be the recorded run: the same serial bytes, the same end, every
marker digest verified (recordings here take markers often), and the same
registers and memory as a plain replay at every I/O exit.

Tiny hand-assembled guests (tests/elfgen.py) check the conditions a
VASSERT must not have: I/O, hlt, an endless loop, an exception, a write
outside the stack.

Positions are instruction counts in both modes: a --vassert replay of a
fast recording steps every instruction (``FastStepEngine``), while its
plain replay runs freely and reports exit numbers.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import EXAMPLES, ROOT, rrstub
from elfgen import LOAD_ADDR, make_elf
from rrstub import session
from rrstub.engines import regs_digest
from rrstub.vassert import (EXIT_VASSERT_FAILED, SITE_FLAG_EQ, VAssertChecker, VAssertError,
                            VAssertReport, _SITE)

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(180)]

RACE_C = (ROOT / "examples" / "race.c").read_text().splitlines()
VASSERT_LINE = next(i + 1 for i, line in enumerate(RACE_C) if "VASSERT_EQ(old, seen);" in line)
RACE_LINE = re.compile(rb"race: counter=(\d+) expected=(\d+) lost=(-?\d+)\n")
END_LINE = re.compile(r"replayed exit \(status (\d+)\) at (instruction|exit #)\s*(\d+)")
MEM = "4M"


# ---------------------------------------------------------------------------
# Recordings of race-vassert.elf


@pytest.fixture(scope="module")
def race_vassert(kernels) -> Path:
    path = EXAMPLES / "race-vassert.elf"
    if not path.exists():
        subprocess.run(["make", "-s", "-C", str(ROOT / "examples")], check=True)
    return path


def _record(kernel: Path, out: Path, mode: str, increments: int, marker_every: str) -> int:
    """Record; returns the number of updates the guest says it lost."""
    serial = out.with_suffix(".serial")
    r = rrstub("record", str(kernel), "-o", str(out), "--mode", mode, "--mem", MEM, "--cmdline",
               f"increments={increments}", "--marker-every", marker_every, "--timeout", "60",
               "--serial-out", str(serial), "-q", timeout=120)
    m = RACE_LINE.fullmatch(serial.read_bytes())
    assert m, (r.returncode, r.stderr, serial.read_bytes())
    lost = int(m.group(3))
    assert r.returncode == (1 if lost else 0), r.stderr   # race exits 1 when it lost updates
    return lost


def _record_until(kernel, tmp, name, mode, candidates, marker_every, lossy: bool):
    """A recording that lost updates (``lossy``) or lost none, trying the increments in order.

    In exact mode the outcome is a function of the run's length (interrupts
    come at instruction counts): 300 increments per worker always lose
    some here, 20 never (each worker finishes inside its first tick).
    """
    for increments in candidates:
        path = tmp / f"{name}-{increments}.rrr"
        lost = _record(kernel, path, mode, increments, marker_every)
        if (lost > 0) == lossy:
            return path, lost
    pytest.fail(f"no {'lossy' if lossy else 'lossless'} {mode} recording with increments {candidates}")


@pytest.fixture(scope="module")
def lossy_exact(race_vassert, tmp_path_factory):
    return _record_until(race_vassert, tmp_path_factory.mktemp("vassert"), "lossy", "exact",
                         (300, 600), "0.004", lossy=True)


@pytest.fixture(scope="module")
def lossless_exact(race_vassert, tmp_path_factory):
    return _record_until(race_vassert, tmp_path_factory.mktemp("vassert"), "lossless", "exact",
                         (20, 10, 5), "0.002", lossy=False)


@pytest.fixture(scope="module")
def lossy_fast(race_vassert, tmp_path_factory):
    return _record_until(race_vassert, tmp_path_factory.mktemp("vassert"), "fast", "fast",
                         (2000, 5000), "0.03", lossy=True)


def _replay(rec: Path, *extra: str) -> tuple[subprocess.CompletedProcess, bytes]:
    tag = hashlib.blake2b(repr(extra).encode(), digest_size=4).hexdigest()
    out = rec.with_suffix(f".replay-{tag}.serial")
    r = rrstub("replay", str(rec), "--serial-out", str(out), *extra, timeout=120)
    return r, out.read_bytes()


def _evaluations(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_lossy(rec: Path, lost: int, increments_total_at_least: int = 1) -> None:
    report = rec.with_suffix(".jsonl")
    r, serial = _replay(rec, "--vassert-report", str(report))
    err = r.stderr.decode()
    assert r.returncode == EXIT_VASSERT_FAILED, err
    assert "matched the recording" in err, err

    evals = _evaluations(report)
    assert {e["unit"] for e in evals} == {"instruction"}      # in either mode
    counter, expected, printed_lost = map(int, RACE_LINE.fullmatch(serial).groups())
    assert printed_lost == lost
    assert len(evals) == expected            # one check per increment
    assert {(e["file"], e["line"], e["func"], e["expr"]) for e in evals} == {
        ("race.c", VASSERT_LINE, "increment", "old == seen")}
    failures = [e for e in evals if e["result"] != "pass"]
    assert failures and all(e["result"] == "fail" for e in failures)
    assert all((e["left"] == e["right"]) == (e["result"] == "pass") for e in evals)
    # Exactly the lost updates: each failing store overwrote old - seen of them.
    assert sum(e["left"] - e["right"] for e in failures) == lost
    positions = [e["position"] for e in evals]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)

    assert f"vassert: {expected} assertions evaluated: {expected - len(failures)} passed, " \
           f"{len(failures)} failed" in err
    assert (f"race.c:{VASSERT_LINE} increment: old == seen: {len(failures)} of {expected} failed; "
            f"first at {_place(failures[0])}, last at {_place(failures[-1])}") in err
    first = failures[0]
    assert (f"{_place(first)}: race.c:{VASSERT_LINE} increment: old == seen failed "
            f"(old = {first['left']}, seen = {first['right']})") in err

    # The same run as a plain replay: serial bytes, end, status (the guest's own).
    plain, plain_serial = _replay(rec)
    assert plain.returncode == 1, plain.stderr
    assert b"matched the recording" in plain.stderr
    assert plain_serial == serial
    end = END_LINE.search(err).groups()
    assert end[:2] == ("1", "instruction") and positions[-1] < int(end[2])
    # A fast recording's plain replay runs freely and ends at an exit number; stepping from m0
    # it ends at the instruction the VAssert replay reports.
    stepped = plain if b"at instruction" in plain.stderr else _replay(rec, "--from", "m0")[0]
    assert stepped.returncode == 1 and b"matched the recording" in stepped.stderr, stepped.stderr
    assert END_LINE.search(stepped.stderr.decode()).groups() == end


def _place(e: dict) -> str:
    return f"exit #{e['position']}" if e["unit"] == "exit" else f"instruction {e['position']}"


def test_exact_replay_finds_exactly_the_lost_updates(lossy_exact):
    rec, lost = lossy_exact
    _check_lossy(rec, lost)


def test_fast_replay_finds_exactly_the_lost_updates(lossy_fast):
    rec, lost = lossy_fast
    _check_lossy(rec, lost)


def test_lossless_run_passes_every_check(lossless_exact):
    rec, _ = lossless_exact
    report = rec.with_suffix(".jsonl")
    r, serial = _replay(rec, "--vassert", "--vassert-report", str(report))
    err = r.stderr.decode()
    assert r.returncode == 0, err          # the guest's own status: nothing lost
    assert "matched the recording" in err
    counter, expected, lost = map(int, RACE_LINE.fullmatch(serial).groups())
    assert lost == 0
    assert f"vassert: {expected} assertions evaluated: {expected} passed, 0 failed" in err
    evals = _evaluations(report)
    assert len(evals) == expected and all(e["result"] == "pass" for e in evals)
    assert [e["left"] for e in evals] == list(range(expected))     # each store saw the one before


def test_without_vassert_the_checks_cost_nothing_but_the_exit(lossless_exact):
    """The recording (made with VASSERTs in the guest) replays as usual, and the guest skipped them."""
    rec, _ = lossless_exact
    r, serial = _replay(rec, "--vassert-report", "/dev/null")   # implies --vassert
    plain, plain_serial = _replay(rec)
    assert plain.returncode == 0 and b"matched the recording" in plain.stderr, plain.stderr
    assert b"vassert" not in plain.stderr
    assert plain_serial == serial


class _Observer:
    """Notes registers (and every 16th time all of RAM) at every I/O exit, before any evaluation."""

    def __init__(self, inner=None):
        self.inner = inner
        self.seen = []

    def install(self, engine):
        m = engine.machine

        def note(exit):
            memory = (hashlib.blake2b(m.mem.view, digest_size=16).digest()
                      if len(self.seen) % 16 == 0 else b"")
            self.seen.append((engine.position, regs_digest(m.vcpu.get_regs()), memory,
                              m.vcpu.if_flag, m.vcpu.ready_for_injection, m.injections))
        engine.on_io_done = note
        if self.inner is not None:
            self.inner.install(engine)


@pytest.mark.parametrize("which", ["lossy_exact", "lossy_fast"])
def test_machine_after_each_evaluation_is_the_plain_replays(which, request):
    rec, _ = request.getfixturevalue(which)
    plain = _Observer()
    result = session.replay(str(rec), serial_out=io.BytesIO(), vassert=plain)
    checker = VAssertChecker()
    checked = _Observer(checker)
    result2 = session.replay(str(rec), serial_out=io.BytesIO(), vassert=checked)
    assert result.verified_end and result2.verified_end
    assert checker.report.evaluated > 100 and checker.report.failed > 0
    assert len(plain.seen) == len(checked.seen)
    first = next((i for i, (a, b) in enumerate(zip(plain.seen, checked.seen)) if a != b), None)
    assert first is None, (first, plain.seen[first], checked.seen[first])
    assert checker.flag_mismatches == 0
    assert result.outcome == result2.outcome


# ---------------------------------------------------------------------------
# Tiny guests: what a condition must not do

SITE = LOAD_ADDR + 0x800
PASS = b"\xb9\x01\x00\x00\x00"                       # mov ecx, 1
FAIL = b"\x31\xc9"                                   # xor ecx, ecx
STACK_BEFORE = b"\x48\xc7\x44\x24\xc0\x07\x00\x00\x00"   # mov qword [rsp-0x40], 7
STACK_WRITE = b"\x48\xc7\x44\x24\xc0\x09\x00\x00\x00"    # mov qword [rsp-0x40], 9 (in the condition)
STACK_AFTER = b"\x8a\x44\x24\xc0"                    # mov al, [rsp-0x40]: the exit status


def vassert_guest(condition: bytes, before: bytes = b"", after: bytes = b"\xb0\x00") -> bytes:
    """One VASSERT: HC_VASSERT with RBX = site; if it answers 1, run ``condition`` (which sets
    ECX) and HC_VASSERT_DONE; then ``after`` (sets AL) and exit with status AL."""
    check = condition + b"\xb8\x05\x00\x00\x00\xef"                       # mov eax, 5; out dx, eax
    code = (before + b"\xbb" + SITE.to_bytes(4, "little")                 # mov ebx, site
            + b"\xb8\x04\x00\x00\x00\x66\xba\x10\x05\xef"                 # mov eax, 4; mov dx, 0x510; out
            + b"\x48\x83\xf8\x01\x75" + bytes([len(check)]) + check       # cmp rax, 1; jne over
            + after + b"\xe6\xf4")                                        # out 0xf4, al
    site = _SITE.pack(SITE + 0x40, SITE + 0x50, SITE + 0x60, 42, 0).ljust(0x40, b"\0")
    strings = b"tiny.S\0".ljust(16, b"\0") + b"the condition\0".ljust(16, b"\0") + b"main\0".ljust(16, b"\0")
    return make_elf(code.ljust(0x800, b"\x90") + site + strings)


CASES = {
    # name: (condition, result, reason substring)
    "pass": (PASS, "pass", ""),
    "fail": (FAIL, "fail", ""),
    "io": (b"\xe6\x80" + PASS, "not-evaluated", "wrote to I/O port 0x80"),
    "hlt": (b"\xf4" + PASS, "not-evaluated", "executed hlt"),
    "endless": (b"\xeb\xfe", "not-evaluated", "did not finish within 250 ms"),
    "exception": (b"\x0f\x0b", "not-evaluated", "triple-faulted"),            # ud2, no IDT
}


def _record_tiny(tmp_path, mode: str, code: bytes) -> str:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(code)
    rec = tmp_path / f"k-{mode}.rrr"
    r = session.record(str(kernel), str(rec), mode, mem_size=4 << 20, serial_out=io.BytesIO(), timeout=30)
    assert r.outcome.reason == "exit", r.message
    return str(rec)


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_what_a_condition_does_is_reported_and_undone(tmp_path, mode, case):
    condition, result, reason = CASES[case]
    rec = _record_tiny(tmp_path, mode, vassert_guest(condition))
    checker = VAssertChecker()
    r = session.replay(rec, serial_out=io.BytesIO(), vassert=checker)
    assert r.verified_end and r.outcome.status == 0
    report = checker.report
    assert report.evaluated == 1
    (stats,) = report.sites.values()
    assert (stats.site.file, stats.site.line, stats.site.func, stats.site.expr) == (
        "tiny.S", 42, "main", "the condition")
    (e,) = report.failures or [None]
    if result == "pass":
        assert report.ok and e is None
    else:
        assert not report.ok and e.result == result and reason in e.reason, e
        # mov ebx; mov eax; mov dx; out: the fourth instruction, an instruction count in both modes
        assert (e.position, e.unit) == (4, "instruction")


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_stack_the_condition_writes_is_put_back(tmp_path, mode):
    """The guest stores 7 below RSP, the condition 9; after the VASSERT the guest exits with what is there."""
    rec = _record_tiny(tmp_path, mode, vassert_guest(STACK_WRITE + PASS, STACK_BEFORE, STACK_AFTER))
    checker = VAssertChecker()
    r = session.replay(rec, serial_out=io.BytesIO(), vassert=checker)
    assert (r.outcome.reason, r.outcome.status, r.verified_end) == ("exit", 7, True)
    assert checker.report.passed == 1


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_write_outside_the_stack_stops_the_replay(tmp_path, mode):
    write = b"\xc7\x04\x25\x00\x00\x20\x00\x01\x00\x00\x00"      # mov dword [0x200000], 1
    rec = _record_tiny(tmp_path, mode, vassert_guest(write + PASS))
    checker = VAssertChecker()
    with pytest.raises(VAssertError, match=r"outside its stack \(physical page 0x200000\)"):
        session.replay(rec, serial_out=io.BytesIO(), vassert=checker)
    assert checker.report.stopped and not checker.report.ok
    r = rrstub("replay", rec, "--vassert")
    err = r.stderr.decode()
    assert r.returncode == 70, err
    assert ("the VASSERT at tiny.S:42 (main: the condition) at instruction 4 wrote guest memory "
            "outside its stack (physical page 0x200000), which rrstub cannot undo") in err


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_cli_exit_status_and_report_for_a_failed_check(tmp_path, mode):
    rec = _record_tiny(tmp_path, mode, vassert_guest(FAIL))
    r = rrstub("replay", rec, "--vassert")
    err = r.stderr.decode()
    assert r.returncode == EXIT_VASSERT_FAILED, err
    assert "vassert: 1 assertion evaluated: 0 passed, 1 failed" in err
    assert "tiny.S:42 main: the condition: 1 of 1 failed; first at instruction 4, last at instruction 4" in err
    assert "instruction 4: tiny.S:42 main: the condition failed" in err
    plain = rrstub("replay", rec)
    assert plain.returncode == 0 and b"vassert" not in plain.stderr


def test_vassert_is_refused_with_gdb(tmp_path):
    r = rrstub("replay", str(tmp_path / "none.rrr"), "--vassert", "--gdb", "0")
    assert r.returncode == 2
    assert b"--vassert replays the whole recording" in r.stderr


def test_header_layout_is_what_the_vmm_reads(tmp_path):
    """struct rrstub_vassert_site as gcc lays it out == vassert._SITE; RRSTUB_VASSERT_EQ == SITE_FLAG_EQ."""
    src = tmp_path / "layout.c"
    src.write_text(
        '#include <stddef.h>\n#include "rrstub_vassert.h"\n'
        "#define AT(f, n) _Static_assert(offsetof(struct rrstub_vassert_site, f) == n, #f);\n"
        "AT(file, 0) AT(expr, 8) AT(func, 16) AT(line, 24) AT(flags, 28)\n"
        f"_Static_assert(sizeof(struct rrstub_vassert_site) == {_SITE.size}, \"size\");\n"
        f"_Static_assert(RRSTUB_VASSERT_EQ == {SITE_FLAG_EQ}, \"eq flag\");\n"
        "int f(int a, int b) { VASSERT(a < b); VASSERT_EQ(a, b); return 0; }\n")
    r = subprocess.run(["gcc", "-std=gnu11", "-O2", "-Wall", "-Werror", "-ffreestanding", "-c",
                        "-I", str(ROOT / "examples" / "include"), "-o", str(tmp_path / "layout.o"), str(src)],
                       capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    assert struct.calcsize("<QQQII") == _SITE.size == 32


def test_report_format_and_json_lines():
    from rrstub.vassert import Evaluation, Site
    buf = io.StringIO()
    report = VAssertReport(jsonl=buf, keep_failures=2)
    site = Site(0x1000, "a.c", 7, "f", "x == y", SITE_FLAG_EQ)
    for i, (result, values) in enumerate([("pass", (1, 1)), ("fail", (3, 1)), ("fail", (5, 4)),
                                          ("fail", (9, 8))]):
        report.add(Evaluation(i, 10 * i, "instruction", 0, site, result, "", values))
    text = report.format()
    assert text.splitlines()[0] == "vassert: 4 assertions evaluated: 1 passed, 3 failed"
    assert "  a.c:7 f: x == y: 3 of 4 failed; first at instruction 10, last at instruction 30" in text
    assert "failures (first 2 of 3):" in text
    assert "  instruction 10: a.c:7 f: x == y failed (x = 3, y = 1)" in text
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert len(lines) == 4 and lines[1]["left"] == 3 and lines[1]["result"] == "fail"
