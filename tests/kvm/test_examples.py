"""The example kernels, live on KVM: what issue 2's 'done when' list promises."""
from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, rrstub
from rrstub.hostfacts import host_facts
from vmm import boot
from vmm.kvm import Interrupted
from vmm.machine import Machine

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

RACE_LINE = re.compile(rb"^race: counter=(\d+) expected=(\d+) lost=(\d+)\n\Z")


def test_hello_prints_banner_and_exits_0(kernels):
    r = rrstub("run", str(kernels / "hello.elf"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"Hello from rrstub guest kernel!\n"
    assert b"guest exited with status 0" in r.stderr


def test_race_live_runs_disagree(kernels):
    counters = []
    for _ in range(10):
        r = rrstub("run", str(kernels / "race.elf"), "--quiet")
        m = RACE_LINE.match(r.stdout)
        assert m, r.stdout + r.stderr
        counter, expected, lost = map(int, m.groups())
        assert counter + lost == expected
        assert r.returncode == (1 if lost else 0)
        counters.append(counter)
    assert len(set(counters)) >= 2, f"10 live runs all gave counter={counters[0]}"


def test_ticks_arrive_while_the_guest_never_exits(kernels):
    """ticks' loop has no I/O: only our deadline kick brings the vCPU out for IRQ 0."""
    out = bytearray()

    class Sink:
        def write(self, b):
            out.extend(b)

        def flush(self):
            pass

    # About half a second of the loop (12 instructions an iteration) at this host's measured speed.
    work = int(host_facts().cpl0_instructions_per_s * 0.5 / 12)
    kicks = 0
    with Machine(boot.load_kernel_file(kernels / "ticks.elf"), cmdline=f"work={work}", serial_out=Sink()) as m:
        real_run = m.vcpu.run

        def counting_run(deadline):
            nonlocal kicks
            exit = real_run(deadline)
            kicks += isinstance(exit, Interrupted)
            return exit

        m.vcpu.run = counting_run
        result = m.run(timeout=60)
    match = re.match(rb"ticks: (\d+) ", bytes(out))
    assert match, bytes(out)
    ticks = int(match.group(1))
    assert result.status == 0
    # 1 kHz PIT over a loop of half a second or more: hundreds of ticks, and
    # (nearly) every one needed a kick, since the loop never exits by itself.
    assert ticks >= 100
    assert kicks >= ticks * 0.9


def test_echo_round_trips_10kb_of_piped_input(kernels):
    rng = random.Random(2)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-_/()"
    lines = []
    while sum(len(l) + 1 for l in lines) < 10 * 1024:
        lines.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200))))
    text = ("\n".join(lines) + "\n").encode()
    proc = subprocess.Popen([sys.executable, "-m", "rrstub", "run", str(kernels / "echo.elf"),
                             "--serial-in", "-", "--timeout", "90"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def feed():
        # Random chunks with random host delays: input arrives while the guest runs and while it halts.
        pos = 0
        while pos < len(text):
            n = rng.randint(1, 700)
            proc.stdin.write(text[pos:pos + n])
            proc.stdin.flush()
            pos += n
            time.sleep(rng.choice([0, 0, 0.001, 0.02]))
        proc.stdin.write(b"quit\n")
        proc.stdin.close()

    feeder = threading.Thread(target=feed)
    feeder.start()
    stdout = proc.stdout.read()  # communicate() would close stdin under the feeder
    stderr = proc.stderr.read()
    proc.wait(timeout=100)
    feeder.join()
    assert proc.returncode == 0, stderr
    assert stdout == text.upper() + b"bye\n"


def test_echo_reads_a_file_and_writes_a_file(kernels, tmp_path):
    src, dst = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_bytes(b"first line\nsecond\nquit\n")
    r = rrstub("run", str(kernels / "echo.elf"), "--serial-in", str(src), "--serial-out", str(dst))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b""
    assert dst.read_bytes() == b"FIRST LINE\nSECOND\nbye\n"


def test_echo_without_input_is_reported_as_hung(kernels, tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    r = rrstub("run", str(kernels / "echo.elf"), "--serial-in", str(empty))
    assert r.returncode == 71
    assert b"no more serial input can arrive" in r.stderr
