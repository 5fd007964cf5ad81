"""Unmodified Linux (Debian's cloud kernel and our busybox initramfs) on rrstub, end to end.

* live: ``rrstub run`` boots the bzImage (its vmlinux decompressed on the
  host and entered through PVH) to the kernel's banner on the console;
* exact: a recording from the entry to well past ``start_kernel`` (as far
  as ``--timeout`` lets it run on this host: positions come from the
  recording, never from a rate) replays to its end twice, matching the
  recording both times;
* gdb 13 through MI: ``break start_kernel`` (the name comes from kallsyms
  decoded from the image: Debian ships no System.map), ``continue``,
  ``reverse-stepi`` 50 times, ``stepi`` 50 times: the registers at each
  instruction are the same going back and forward again.

The kernel comes from ``linux-image-cloud-amd64`` and the initramfs from
``examples/linux/setup.sh`` (both part of ``make setup``).  Without them
these tests fail under CI=true and skip otherwise.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, recording_info, rrstub
from test_gdb import Gdb, Server, registers

pytestmark = [pytest.mark.kvm]

INITRD = ROOT / "examples" / "build" / "linux" / "initrd.cpio.gz"
BANNER = re.compile(rb"Linux version (\S+) ")
RECORD_SECONDS = 8          # host seconds of exact recording; the test reads how far that got
STEPS = 50


def _kernel() -> Path | None:
    found = sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"))
    return found[-1] if found else None


@pytest.fixture(scope="module")
def linux() -> tuple[Path, Path]:
    kernel = _kernel()
    missing = []
    if kernel is None:
        missing.append("a Debian cloud kernel (/boot/vmlinuz-*-cloud-amd64, package linux-image-cloud-amd64)")
    if not INITRD.exists():
        missing.append(f"the initramfs {INITRD.relative_to(ROOT)} (examples/linux/setup.sh builds it "
                       "from busybox-static)")
    if missing:
        message = "the Linux tests need " + " and ".join(missing) + ": run `make setup`"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return kernel, INITRD


class LiveRun:
    """``rrstub run`` of Linux as a subprocess, its console read by a thread until a pattern shows."""

    def __init__(self, *args: str):
        self.out = bytearray()
        self.proc = subprocess.Popen([sys.executable, "-m", "rrstub", "run", *args], cwd=ROOT,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := self.proc.stdout.read1(4096):
            self.out += chunk

    def wait_for(self, pattern: re.Pattern, timeout: float) -> re.Match | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(self.out)
            if m or self.proc.poll() is not None:
                return m or pattern.search(self.out)
            time.sleep(0.1)
        return None

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._reader.join(10)                   # reads to EOF: the console is closed after it
        err = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return err.decode(errors="replace")


@pytest.mark.timeout(240)
def test_linux_boots_live_to_its_banner(linux):
    kernel, initrd = linux
    run = LiveRun(str(kernel), "--initrd", str(initrd), "--timeout", "200")
    try:
        m = run.wait_for(BANNER, 200)
    finally:
        err = run.stop()
    assert m, f"no banner on the console:\n{bytes(run.out[-2000:])!r}\n{err}"
    # The release it prints is the one in the file's name (vmlinuz-RELEASE).
    assert m.group(1).decode() == kernel.name.removeprefix("vmlinuz-")
    assert "lz4 vmlinux decompressed on the host" in err and "PVH entry" in err, err
    assert "command line: console=ttyS0" in err, err


@pytest.fixture(scope="module")
def linux_exact(linux, tmp_path_factory) -> tuple[Path, dict, bytes]:
    """An exact recording of Linux from its entry: (path, `info --json`, the console it printed)."""
    kernel, initrd = linux
    folder = tmp_path_factory.mktemp("linux")
    rec, console = folder / "linux.rrr", folder / "console.out"
    r = rrstub("record", str(kernel), "--initrd", str(initrd), "--mode", "exact", "-o", str(rec),
               "--serial-out", str(console), "--timeout", str(RECORD_SECONDS), timeout=180)
    assert r.returncode == 124, r.stderr          # stopped by --timeout, the recording kept
    info = recording_info(rec)
    assert info["complete"] and info["mode"] == "exact"
    return rec, info, console.read_bytes()


@pytest.mark.timeout(400)
def test_exact_linux_recording_replays_to_its_end_twice(linux_exact, tmp_path):
    rec, info, console = linux_exact
    last = info["last_position"]
    assert info["kernel"]["initrd"]["name"] == INITRD.name
    outputs = []
    for i in range(2):
        out = tmp_path / f"replay{i}.out"
        r = rrstub("replay", str(rec), "--serial-out", str(out), timeout=180)
        err = r.stderr.decode()
        assert r.returncode == 124, err            # the recording ended at the recorder's --timeout
        assert f"at instruction {last}," in err and "matched the recording" in err, err
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == console     # (empty until earlycon prints the log buffer)


@pytest.mark.timeout(400)
def test_gdb_breaks_at_start_kernel_and_steps_back_and_forth_identically(linux_exact, tmp_path):
    rec, info, _ = linux_exact
    server = Server(rec, 1, tmp_path)
    gdb = None
    try:
        gdb = Gdb(None, server.port)               # no file: gdb takes the symbol ELF the server offers
        gdb.cmd("-break-insert start_kernel")
        stop = gdb.run("-exec-continue", timeout=120)
        assert stop.reason == "breakpoint-hit", stop.payload
        assert stop.frame.get("func") == "start_kernel", stop.frame
        at, last = gdb.when()
        assert at + 1000 < last, f"the recording ends at {last}, too close to start_kernel at {at}"
        gdb.cmd("-break-delete")

        forward = [registers(gdb.cmd("-data-list-register-values x"))]
        for _ in range(STEPS):
            gdb.run("-exec-step-instruction --reverse", timeout=60)
            forward.append(registers(gdb.cmd("-data-list-register-values x")))
        assert gdb.when()[0] == at - STEPS
        back = forward[::-1]                        # the states from at - STEPS up to at
        again = [registers(gdb.cmd("-data-list-register-values x"))]
        for _ in range(STEPS):
            gdb.run("-exec-step-instruction", timeout=60)
            again.append(registers(gdb.cmd("-data-list-register-values x")))
        assert gdb.when()[0] == at
        assert again == back
        assert len(set(again)) == STEPS + 1          # every position a state of its own
    finally:
        if gdb is not None:
            gdb.close()
        server.stop()
