"""Shared fixtures and the KVM policy for the test suite.

Tests that need /dev/kvm (or $RRSTUB_KVM_DEVICE) use the ``kvm`` marker.  When KVM is missing they FAIL under CI=true, and skip with the
reason otherwise: a CI machine without KVM must not look green.
"""
from __future__ import annotations

import os
import subprocess
import sys
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
