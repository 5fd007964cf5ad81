"""The command line without a guest: help, argument errors, unusable kernels, missing KVM."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from conftest import ROOT, rrstub
from elfgen import make_elf
from vmm.kvm import Kvm, KvmUnavailable

pytestmark = pytest.mark.timeout(60)


def test_help_teaches_the_commands():
    r = rrstub("--help")
    assert r.returncode == 0
    for word in (b"run", b"doctor", b"RRSTUB_KVM_DEVICE"):
        assert word in r.stdout
    r = rrstub("run", "--help")
    assert r.returncode == 0
    for word in (b"--serial-in", b"--serial-out", b"--timeout", b"--mem", b"exit status", b"124", b"0xf4"):
        assert word in r.stdout
    assert rrstub("doctor", "--help").returncode == 0


def test_no_command_prints_help_and_fails():
    r = rrstub()
    assert r.returncode == 2
    assert b"usage: rrstub" in r.stdout


@pytest.mark.parametrize("content, message", [
    (b"#!/bin/sh\necho not a kernel\n", b"not an ELF file"),
    (b"", b"not an ELF file"),
    (make_elf(b"\xf4", elf_class=1), b"32-bit ELF"),
    (make_elf(b"\xf4", machine=183), b"not x86-64"),
    (make_elf(b"\xf4", e_type=3), b"not an executable"),
    (make_elf(b"\xf4")[:100], b"run past the end of the file"),
])
def test_unusable_kernel_files(tmp_path, content, message):
    path = tmp_path / "kernel"
    path.write_bytes(content)
    r = rrstub("run", str(path))
    assert r.returncode == 2
    assert str(path).encode() in r.stderr
    assert message in r.stderr
    assert b"Traceback" not in r.stderr


def test_missing_kernel_and_missing_serial_input(tmp_path):
    r = rrstub("run", str(tmp_path / "nope.elf"))
    assert r.returncode == 2
    assert b"no such kernel file" in r.stderr
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(make_elf(b"\xf4"))
    r = rrstub("run", str(kernel), "--serial-in", str(tmp_path / "missing.txt"))
    assert r.returncode == 2
    assert b"cannot open" in r.stderr and b"missing.txt" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--mem", "lots"], b"not a size"),
    (["--mem", "1M"], b"1M is out of range: give a size from 2M to 3G"),
    (["--timeout", "-1"], b"-1 is out of range: give seconds from 0.001 to"),
])
def test_bad_arguments(tmp_path, args, message):
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(make_elf(b"\xf4"))
    r = rrstub("run", str(kernel), *args)
    assert r.returncode == 2
    assert message in r.stderr


def test_missing_kvm_device_is_exit_3(tmp_path):
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(make_elf(b"\xf4"))
    env = dict(os.environ, RRSTUB_KVM_DEVICE=str(tmp_path / "kvm"))
    r = rrstub("run", str(kernel), env=env)
    assert r.returncode == 3
    assert b"does not exist: this machine has no KVM" in r.stderr
    r = rrstub("doctor", env=env)
    assert r.returncode == 3
    r = rrstub("run", str(kernel), env=dict(os.environ, RRSTUB_KVM_DEVICE="/dev/null"))
    assert r.returncode == 3
    assert b"/dev/null is not a KVM device" in r.stderr


def test_kvm_permission_denied_tells_how_to_fix(monkeypatch):
    def denied(path, flags):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(KvmUnavailable) as e:
        Kvm("/dev/kvm")
    assert e.value.errno == errno.EACCES
    assert "kvm' group" in str(e.value)


@pytest.mark.parametrize("ci, outcome, returncode", [("true", b"KVM test cannot run in CI", 1),
                                                      ("", b"1 skipped", 0)])
def test_kvm_tests_fail_in_ci_and_skip_elsewhere_without_kvm(tmp_path, ci, outcome, returncode):
    env = dict(os.environ, CI=ci, RRSTUB_KVM_DEVICE=str(tmp_path / "no-kvm"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/kvm/test_examples.py::test_hello_prints_banner_and_exits_0"],
                       cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert r.returncode == returncode, r.stdout
    assert outcome in r.stdout
