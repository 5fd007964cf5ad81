"""Errors a user can act on, from real guests: each names what happened and what to do."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, rrstub
from elfgen import make_elf
from vmm.devices.hypercall import HC_VERSION_VALUE
from vmm.kvm import Kvm
from vmm.probe import measure_cpl0_rate

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(60)]

OUT_STATUS_0 = b"\xb0\x00\xe6\xf4"    # mov al, 0; out 0xf4, al
OUT_STATUS_1 = b"\xb0\x01\xe6\xf4"    # mov al, 1; out 0xf4, al
HYPERCALL = b"\x66\xba\x10\x05\xef"   # mov dx, 0x510; out dx, eax


def kernel(tmp_path, code: bytes, **kw) -> str:
    path = tmp_path / "k.elf"
    path.write_bytes(make_elf(code, **kw))
    return str(path)


def expect_rax(value: int) -> bytes:
    """mov rbx, value; cmp rax, rbx; jne fail; exit 0; fail: exit 1."""
    return b"\x48\xbb" + value.to_bytes(8, "little") + b"\x48\x39\xd8\x75\x04" + OUT_STATUS_0 + OUT_STATUS_1


def test_triple_fault_dumps_registers_and_last_exits(tmp_path):
    code = b"\xe6\x80" + b"\x0f\x0b"  # out 0x80, al; ud2 with no IDT
    r = rrstub("run", kernel(tmp_path, code))
    assert r.returncode == 70
    err = r.stderr.decode()
    assert "triple-fault" in err
    assert "rip=0000000000100002" in err
    assert "out port 0x80" in err  # the last exits
    assert "CPL0" in err


def test_jump_outside_ram_is_explained(tmp_path):
    code = b"\x48\xb8" + (0x1000_0000).to_bytes(8, "little") + b"\xff\xe0"  # mov rax, 256M; jmp rax
    r = rrstub("run", kernel(tmp_path, code))
    assert r.returncode == 70
    assert b"rip 0x10000000 (physical 0x10000000), which is not guest RAM" in r.stderr


def test_instruction_the_host_cannot_emulate_is_emulated_by_rrstub(tmp_path):
    """lock cmpxchg16b: emulated CPL0 code (PVM hosts) cannot run it, so rrstub does (vmm.emulate);
    VMX hosts run it natively."""
    code = b"\x48\xc7\xc6\x00\x00\x20\x00" + b"\xf0\x48\x0f\xc7\x0e" + OUT_STATUS_0  # rsi=2M; lock cmpxchg16b [rsi]
    with Kvm() as kvm:
        emulated = measure_cpl0_rate(kvm) < 50e6
    r = rrstub("run", kernel(tmp_path, code))
    assert r.returncode == 0, r.stderr
    if emulated:
        assert "instructions rrstub emulated (this host's KVM could not): cmpxchg16b x1" in r.stderr.decode()


def test_instruction_nobody_can_emulate_is_a_clear_stop(tmp_path):
    """x87 arithmetic (fadd st0, st1) at CPL0: neither this host's KVM nor rrstub emulates it."""
    code = b"\xd8\xc1" + OUT_STATUS_0
    with Kvm() as kvm:
        emulated = measure_cpl0_rate(kvm) < 50e6
    r = rrstub("run", kernel(tmp_path, code))
    if emulated:
        assert r.returncode == 70, r.stderr
        err = r.stderr.decode()
        assert "could not emulate a guest instruction" in err
        assert "rip 0x100000 (CPL0): d8 c1" in err
    else:
        assert r.returncode == 0, r.stderr


def test_timeout_reports_a_spinning_guest(tmp_path):
    r = rrstub("run", kernel(tmp_path, b"\xeb\xfe"), "--timeout", "0.5")
    assert r.returncode == 124
    assert b"still running after --timeout 0.5 s" in r.stderr
    assert b"rip=0000000000100000" in r.stderr


@pytest.mark.parametrize("code, message", [
    (b"\xfa\xf4", b"halted with interrupts disabled"),
    (b"\xfb\xf4", b"no timer is armed and no more serial input can arrive"),
])
def test_guest_that_can_never_wake_up(tmp_path, code, message):
    r = rrstub("run", kernel(tmp_path, code))
    assert r.returncode == 71
    assert message in r.stderr


def test_i8042_reset_stops_the_machine(tmp_path):
    r = rrstub("run", kernel(tmp_path, b"\xb0\xfe\xe6\x64\xeb\xfe"))  # mov al, 0xfe; out 0x64, al; jmp .
    assert r.returncode == 0
    assert b"reset the machine" in r.stderr


@pytest.mark.parametrize("status", [0, 7, 255])
def test_debug_exit_value_is_the_exit_status(tmp_path, status):
    r = rrstub("run", kernel(tmp_path, b"\xb0" + bytes([status]) + b"\xe6\xf4"), "--quiet")
    assert r.returncode == status
    assert r.stderr == b""


def test_hypercall_version(tmp_path):
    code = b"\xb8\x00\x00\x00\x00" + HYPERCALL + expect_rax(HC_VERSION_VALUE)
    r = rrstub("run", kernel(tmp_path, code))
    assert r.returncode == 0, r.stderr


def test_reserved_hypercall_returns_all_ones_and_warns(tmp_path):
    code = b"\xb8\x2a\x00\x00\x00" + HYPERCALL + expect_rax((1 << 64) - 1)
    r = rrstub("run", kernel(tmp_path, code))
    assert r.returncode == 0, r.stderr
    assert b"hypercall 42" in r.stderr


def test_kernel_that_does_not_fit_in_memory(tmp_path):
    r = rrstub("run", kernel(tmp_path, b"\xf4", memsz=100 << 20), "--mem", "64M")
    assert r.returncode == 2
    assert b"does not fit in 64 MiB of guest memory" in r.stderr
    assert b"--mem" in r.stderr
    r = rrstub("run", kernel(tmp_path, b"\xe6\xf4", memsz=100 << 20), "--mem", "256M", "--quiet")
    assert r.returncode == 0, r.stderr


def has_vcpu(pid: int) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("anon_inode:kvm-vcpu"):
                return True
        except FileNotFoundError:
            pass
    return False


def test_ctrl_c_stops_a_running_guest(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "rrstub", "run", kernel(tmp_path, b"\xeb\xfe")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not has_vcpu(proc.pid):   # past interpreter start-up, however long it takes: a vCPU exists
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    time.sleep(0.2)                  # usually spinning in KVM_RUN by now; if not, the same must happen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert err == b"rrstub: interrupted\n"
