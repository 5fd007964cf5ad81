#!/usr/bin/env python3
"""Build the example Linux initramfs: busybox-static and an /init that says hello and powers off.

    python3 examples/linux/mkinitrd.py OUT.cpio.gz [--busybox /bin/busybox] [--init FILE]

The archive is a gzip-compressed "newc" cpio with fixed owners and times,
so the same busybox gives the same bytes (and a recording of it the same
kernel payload).  /init runs as PID 1: it prints "rrstub-init: hello from
/init", mounts /proc, prints the kernel's uptime, and powers off (ACPI S5)
with busybox's `poweroff -f`.
"""
import argparse
import gzip
import os
import sys

INIT = b"""#!/bin/sh
/bin/busybox mount -t proc proc /proc
echo "rrstub-init: hello from /init (uptime $(/bin/busybox cut -d' ' -f1 /proc/uptime) s)"
/bin/busybox poweroff -f
"""


def _entry(name: str, mode: int, data: bytes = b"", ino: int = 1, rdev: tuple = (0, 0)) -> bytes:
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    header = b"070701" + b"".join(f"{f:08X}".encode() for f in fields)
    out = header + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def build(busybox: bytes, init: bytes) -> bytes:
    parts = []
    ino = 1
    for d in ("bin", "dev", "proc", "sys", "sbin"):
        parts.append(_entry(d, 0o040755, ino=ino)); ino += 1
    parts.append(_entry("dev/console", 0o020600, ino=ino, rdev=(5, 1))); ino += 1
    parts.append(_entry("bin/busybox", 0o100755, busybox, ino)); ino += 1
    parts.append(_entry("bin/sh", 0o120777, b"busybox", ino)); ino += 1
    parts.append(_entry("init", 0o100755, init, ino)); ino += 1
    parts.append(_entry("TRAILER!!!", 0, ino=0))
    return gzip.compress(b"".join(parts), mtime=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output")
    ap.add_argument("--busybox", default="/bin/busybox")
    ap.add_argument("--init", help="a file to use as /init instead of the built-in script")
    a = ap.parse_args()
    try:
        busybox = open(a.busybox, "rb").read()
    except OSError as e:
        print(f"mkinitrd: cannot read {a.busybox}: {e.strerror}. Install Debian's busybox-static "
              "(apt-get install busybox-static)", file=sys.stderr)
        return 2
    if b"GLIBC_" in busybox[:4096] or b"ld-linux" in busybox[:8192]:
        print(f"mkinitrd: {a.busybox} is dynamically linked; the initramfs needs busybox-static", file=sys.stderr)
        return 2
    init = open(a.init, "rb").read() if a.init else INIT
    tmp = a.output + ".tmp"
    with open(tmp, "wb") as f:
        f.write(build(busybox, init))
    os.replace(tmp, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
