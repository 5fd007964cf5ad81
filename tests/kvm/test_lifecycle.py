"""Machines come and go in one process (tests, doctor): nothing leaks, nothing lingers."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, rrstub
from elfgen import make_elf
from vmm import boot
from vmm.kvm import Kvm
from vmm.machine import Machine
from vmm.probe import probe_singlestep

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(60)]


class Sink:
    def __init__(self):
        self.data = bytearray()

    def write(self, b):
        self.data.extend(b)

    def flush(self):
        pass


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_failed_construction_releases_everything():
    image = boot.KernelImage("<big>", 0x100000, (boot.LoadSegment(0x100000, 0x100000, b"\xf4", 8 << 20),))
    before = open_fds()
    for _ in range(5):
        with pytest.raises(boot.BootError, match="does not fit"):
            Machine(image, mem_size=4 << 20)
    assert open_fds() == before


def test_closed_machine_input_cannot_disturb_the_next_vcpu(kernels):
    """Input arriving for a closed machine must neither be read nor kick a later vCPU."""
    r, w = os.pipe()
    with os.fdopen(r, "rb", buffering=0) as source:
        m = Machine(boot.load_kernel_file(kernels / "hello.elf"), serial_in=source, serial_out=Sink())
        assert m.run(timeout=30).status == 0
        m.close()
        m.close()  # twice is fine
        os.write(w, b"late input\n" * 100)
        with Kvm() as kvm:
            result, _ = probe_singlestep(kvm, cpl3=False, steps=500)
        assert result.works, result.detail
        assert os.read(r, 4096).startswith(b"late input")  # the stopped reader left it unread
    os.close(w)


def test_input_the_uart_refuses_does_not_hang_a_halted_guest(tmp_path):
    """sti; hlt with input pending but RTS never raised: reported as hung at once."""
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(make_elf(b"\xfb\xf4"))
    data = tmp_path / "in.txt"
    data.write_bytes(b"abc")
    r = rrstub("run", str(kernel), "--serial-in", str(data), timeout=20)
    assert r.returncode == 71
    assert b"no more serial input can arrive" in r.stderr


def test_reader_that_goes_away_is_not_a_traceback(kernels, tmp_path):
    data = tmp_path / "in.txt"
    data.write_bytes(b"".join(b"line %d of the input\n" % i for i in range(3000)) + b"quit\n")
    cmd = (f"{sys.executable} -m rrstub run {kernels / 'echo.elf'} --serial-in {data} | head -c 10; "
           "exit ${PIPESTATUS[0]}")
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, timeout=50)
    assert r.stdout == b"LINE 0 OF "
    assert r.returncode == 0, r.stderr
    assert b"broken pipe" in r.stderr
    assert b"Traceback" not in r.stderr and b"Exception ignored" not in r.stderr
