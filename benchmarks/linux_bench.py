"""Linux on rrstub, measured (`make bench`; minutes on a host where guest kernel code is emulated).

1. A live boot of Debian's cloud kernel with examples/build/linux/initrd.cpio.gz,
   exactly as `rrstub run KERNEL --initrd INITRD` does it (a subprocess),
   printing the host seconds from the start to each console milestone:
   the banner ("Linux version"), "Memory:", the kernel starting /init
   ("Run /init as init process"), our /init's own line, and the machine
   powering off (ACPI S5, the run's exit status 0).
2. An exact recording from the entry: a short one to measure this host's
   exact rate, then one sized from it to cover about --instructions
   instructions (default 20M).  Prints instructions per host second and the
   file's bytes per million instructions (the initial full marker apart,
   since it is the guest's RAM and does not grow with the run).

Prints figures and asserts nothing; a milestone not reached says so.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INITRD = ROOT / "examples" / "build" / "linux" / "initrd.cpio.gz"
MILESTONES = [("banner", rb"Linux version "), ("Memory:", rb"\] Memory: "),
              ("/init started", rb"Run /init as init process"), ("/init ran", rb"rrstub-init: hello from /init"),
              ("reboot: Power down", rb"reboot: Power down")]
PROBE_SECONDS = 10


def rrstub(*args: str) -> list[str]:
    return [sys.executable, "-m", "rrstub", *args]


def live_boot(kernel: Path, timeout: float) -> None:
    print(f"live boot of {kernel.name} with {INITRD.name} (timeout {timeout:.0f} s)")
    started = time.monotonic()
    seen: dict[str, float] = {}
    out = bytearray()
    proc = subprocess.Popen(rrstub("run", str(kernel), "--initrd", str(INITRD), "--timeout", str(timeout)),
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = bytearray()
    threading.Thread(target=lambda: err.extend(proc.stderr.read()), daemon=True).start()
    while chunk := proc.stdout.read1(4096):
        out += chunk
        for name, pattern in MILESTONES:
            if name not in seen and re.search(pattern, out):
                seen[name] = time.monotonic() - started
                print(f"  {name:<22} {seen[name]:8.1f} s", flush=True)
    status = proc.wait()
    total = time.monotonic() - started
    for name, _ in MILESTONES:
        if name not in seen:
            print(f"  {name:<22}   not reached")
    how = "powered off" if status == 0 and b"reboot: Power down" in out else f"ended with status {status}"
    print(f"  the run {how} after {total:.1f} s")
    for line in err.decode(errors="replace").splitlines():
        if "emulated" in line or "syscalls finished" in line or "guest " in line:
            print(f"  {line}")


def exact_record(kernel: Path, path: Path, seconds: float) -> dict:
    subprocess.run(rrstub("record", str(kernel), "--initrd", str(INITRD), "--mode", "exact", "-o", str(path),
                          "--force", "-q", "--serial-out", "/dev/null", "--timeout", f"{seconds:.1f}"),
                   cwd=ROOT, check=False, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    info = subprocess.run(rrstub("info", str(path), "--json"), cwd=ROOT, capture_output=True, check=True)
    return json.loads(info.stdout)


def exact_figures(kernel: Path, instructions: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        probe = exact_record(kernel, Path(tmp) / "probe.rrr", PROBE_SECONDS)
        rate = probe["end"]["position"] / probe["end"]["host_s"]
        seconds = instructions / rate
        print(f"exact recording: {rate:,.0f} instructions/s in a {PROBE_SECONDS} s probe; recording "
              f"{seconds:.0f} s for about {instructions / 1e6:.0f}M instructions", flush=True)
        info = exact_record(kernel, Path(tmp) / "linux.rrr", seconds)
        end = info["end"]
        initial = info["markers"][0]["stored_bytes"]
        grown = info["file_bytes"] - initial
        millions = end["position"] / 1e6
        print(f"  {end['position']:,} instructions in {end['host_s']:.1f} s: "
              f"{end['position'] / end['host_s']:,.0f} instructions/s, {end['guest_s']:.3f} s of guest time")
        print(f"  file {info['file_bytes'] / 1e6:.1f} MB: initial marker {initial / 1e6:.1f} MB, the rest "
              f"{grown / millions / 1e3:.1f} kB per million instructions ({len(info['markers'])} markers, "
              f"events {info['sizes']['events']['stored'] / millions / 1e3:.2f} kB per million)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", type=Path, help="default: the newest /boot/vmlinuz-*-cloud-amd64")
    ap.add_argument("--boot-timeout", type=float, default=1200, help="live boot limit, host seconds")
    ap.add_argument("--instructions", type=float, default=20e6, help="exact recording length")
    ap.add_argument("--no-live", action="store_true")
    ap.add_argument("--no-exact", action="store_true")
    args = ap.parse_args()
    kernel = args.kernel or next(iter(sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"), reverse=True)), None)
    if kernel is None or not INITRD.exists():
        print("linux_bench: needs a Debian cloud kernel in /boot and examples/build/linux/initrd.cpio.gz: "
              "run `make setup`", file=sys.stderr)
        return 2
    if not args.no_live:
        live_boot(kernel, args.boot_timeout)
    if not args.no_exact:
        exact_figures(kernel, int(args.instructions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
