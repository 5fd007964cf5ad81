"""Shared fixtures and the KVM policy for the test suite.

Tests that need /dev/kvm (or $RRSTUB_KVM_DEVICE) use the ``kvm`` marker.  When KVM is missing they FAIL under CI=true, and skip with the
reason otherwise: a CI machine without KVM must not look green.

Guest time follows the host's speed, which drifts from day to day and under
load (an exact recording's virtual CPU runs at the host's measured
instruction rate, a fast one at live speed).  So tests never assume how
many markers a --marker-every gives or where they land: they size
intervals with ``marker_every`` and take markers and positions from the
recording they made (``recording_info``).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vmm.kvm import default_kvm_path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "build"


def kvm_unavailable_reason(path: str | None = None) -> str | None:
    path = path or default_kvm_path()
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable by this user"
    return None


def require_kvm() -> None:
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"KVM test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"needs KVM: {reason}")


def pytest_runtest_setup(item):
    if item.get_closest_marker("kvm") is not None:
        require_kvm()


@pytest.fixture(scope="session")
def kernels() -> Path:
    """The built example kernels (make -C examples)."""
    missing = [k for k in ("hello", "race", "ticks", "echo", "race-vassert") if not (EXAMPLES / f"{k}.elf").exists()]
    if missing:
        subprocess.run(["make", "-s", "-C", str(ROOT / "examples")], check=True)
    return EXAMPLES


def rrstub(*args: str, input: bytes | None = None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run the installed CLI as a user would."""
    return subprocess.run([sys.executable, "-m", "rrstub", *args], input=input, capture_output=True,
                          timeout=timeout, cwd=ROOT, **kw)


def recording_info(path) -> dict:
    """`rrstub info PATH --json`."""
    r = rrstub("info", str(path), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@functools.cache
def guest_seconds(kernel: Path, *args: str) -> float:
    """The guest time a recording of ``kernel`` with ``args`` covers on this host, measured once."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "measure.rrr"
        r = rrstub("record", str(kernel), "-o", str(out), "--no-markers", "-q", *args, timeout=300)
        assert out.exists(), r.stderr
        return recording_info(out)["end"]["guest_s"]


def marker_every(markers: int, kernel: Path, *args: str) -> str:
    """--marker-every giving about ``markers`` markers in a recording of ``kernel`` with ``args``."""
    return f"{guest_seconds(kernel, *args) / markers:.9f}"


def symbol(name: str, elf) -> tuple[int, int]:
    """(address, size) of a symbol of the kernel."""
    out = subprocess.run(["nm", "-S", str(elf)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[3] == name:
            return int(parts[0], 16), int(parts[1], 16)
    raise AssertionError(f"{name} not in {elf}")
