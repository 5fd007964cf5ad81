"""The `rrstub` command line: argument parsing, error reporting, exit codes.

Every failure a user can cause or meet (a bad kernel file, no KVM, a guest
that crashes or hangs) ends here as one `rrstub: ...` message on stderr and
a documented exit status; tracebacks are for bugs only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from typing import Callable, Optional, Sequence

from rrstub import __version__

EXIT_USAGE = 2
EXIT_NO_KVM = 3
EXIT_KVM_ERROR = 70
EXIT_RECORDING = 2   # the recording file is unusable
EXIT_DISK_FULL = 74  # a recording stopped because the disk (or the user's quota) is full, as EX_IOERR

RUN_EPILOG = """\
exit status:
  0-255  the value the guest wrote to the debug-exit port (0xf4);
         0 also when the guest reset the machine through the i8042 (0xfe to port 0x64)
         or powered it off through ACPI (S5, as Linux does for poweroff)
  2      bad arguments or an unusable kernel file
  3      KVM is not available (no /dev/kvm, or no permission)
  70     the guest crashed: triple fault, or an instruction the host KVM cannot
         emulate; a register dump and the last exits are printed (also: a KVM
         call failed)
  71     the guest halted with no way to wake up
  74     --allow-guest-record: the disk (or quota) filled up; -o REC keeps what was written
  124    the guest was still running at --timeout
  130    Ctrl-C; 143 SIGTERM

examples:
  rrstub run examples/build/hello.elf
  rrstub run examples/build/race.elf --timeout 30
  printf 'hello\\nquit\\n' | rrstub run examples/build/echo.elf --serial-in -
"""

DOCTOR_EPILOG = """\
Each line is measured now, on this host, by running a few instructions in a
fresh VM: what single-stepping, breakpoints, watchpoints and CPUID masking do
at guest CPL0/CPL3, whether a PMU exists, how fast guest kernel code runs and
what one port-I/O exit costs. Record/replay picks its engine from these facts.
"""


def _bounded(what: str, low: float, high: float, parse: Callable = float, words: Optional[dict] = None):
    """The one argparse type for numeric options: a finite number from ``low`` to ``high``.

    ``parse`` reads the text (float, int, a size); ``words`` are named values
    (``--speed max``).  Every error is one line naming the input and the range.
    """
    words = words or {}
    span = f"{what} from {_plain(low)} to {_plain(high)}"

    def check(text: str):
        if text in words:
            return words[text]
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or (isinstance(value, float) and math.isnan(value)):
            named = f"{', '.join(words)} or " if words else ""
            kind = "a size (e.g. 64M, 1G, 131072)" if what == "a size" else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}: give {named}{span}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {span}")
        return value
    return check


def _plain(v: float) -> str:
    """A bound as a user types it: 0.0001, 100000000, 64K, 3G."""
    if isinstance(v, int) and v >= 1 << 10 and v % (1 << 10) == 0:
        for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
            if v % (1 << shift) == 0:
                return f"{v >> shift}{unit}"
    return f"{v:f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


def _size_of(text: str) -> int:
    from vmm.memory import parse_size
    return parse_size(text)


def _guest_mem(text: str) -> int:
    from vmm.memory import MAX_MEM, MIN_MEM, PAGE_SIZE
    size = _bounded("a size", MIN_MEM, MAX_MEM, _size_of)(text)
    if size % PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"{text}: guest memory is a whole number of 4 KiB pages")
    return size


# The ranges of the numeric options: wide enough for any real use, narrow
# enough that no value overflows a clock or turns a feature off unseen.
MAX_SECONDS = 100_000_000.0     # about three years
_seconds = _bounded("seconds", 0.001, MAX_SECONDS)
_marker_every = _bounded("seconds", 0.0001, MAX_SECONDS)
_rolling = _bounded("seconds", 0.001, MAX_SECONDS)      # a marker every quarter of it stays >= 0.0001 s
_quota = _bounded("a size", 64 << 10, 1 << 50, _size_of)  # 64K holds a small recording; 1 PiB is no limit
_speed = _bounded("a factor", 0.001, 1_000_000.0, words={"max": None, "realtime": 1.0})
_clients = _bounded("a number of sessions", 1, 1_000_000, int)


RECORD_EPILOG = """\
modes:
  exact  single-steps every guest instruction; the position in time is the
         instruction count. rdtsc, rdtscp, rdrand, rdseed, rdpid, cpuid and
         rdmsr of the TSC are emulated from the virtual clock, the log and a
         fixed CPUID table. Slow (every instruction is a KVM exit) but complete.
  fast   runs the guest freely; only deterministic exits, clock values, input
         and "landmarks" (where an interrupt had to be delivered while the guest
         computed) are logged. Near live speed, but rdtsc, rdrand and cpuid at
         guest CPL0 run on the host: record guests that read the TSC with exact.
         `replay` runs it freely too; `serve`, `trace` and replay's --until,
         --from, --go-live and --vassert replay it instruction by instruction,
         at exact's speed, so positions are instruction counts in both modes.
  auto   (default) picks one from what `rrstub doctor` measures on this host
         (cached per boot) and says which and why.

markers: a full snapshot at the start, then one every --marker-every seconds
of guest time (pages the guest changed since the previous one). More, named:
press m on the terminal (when standard input is a terminal and not the
guest's --serial-in), send SIGUSR1 to the recorder, or let the guest call
the marker hypercall with a name (examples/include/rrstub_machine.h).
`rrstub info REC` lists them all.

disk quota and rolling:
  --quota SIZE          recording stops (status 75) before the file exceeds SIZE
                        by more than one chunk; the file replays up to there
  --rolling SECONDS     keeps the last SECONDS of guest time: when the file
                        covers 1.5x that, it restarts at a later marker (a full
                        snapshot there); stderr says each time what was dropped
  --rolling with --quota  also drops the oldest part when the file nears SIZE

exit status: as `rrstub run` (the guest's own status, 70 crash, 71 hung,
124 --timeout, 130 Ctrl-C, 143 SIGTERM), and 75 when --quota stopped the
recording. The recording is complete in every case: replay reproduces the
crash, the hang, or the run up to the timeout or the signal. Also:
  2   bad arguments, or an output that cannot be a recording or is not ours:
      REC must be a new file, an empty one, or (with --force) a recording
  74  the disk (or the user's disk quota) filled up: the message says where;
      REC is an incomplete recording that replays up to its last complete chunk

examples:
  rrstub record examples/build/race.elf -o race.rrr
  rrstub record examples/build/ticks.elf -o ticks.rrr --mode exact
  printf 'hi\\nquit\\n' | rrstub record examples/build/echo.elf --serial-in - -o echo.rrr
"""

REPLAY_EPILOG = """\
Replay needs no input: serial input, clock values and interrupt timing all
come from the recording, and the kernel image is inside it.

exit status:
  the guest's recorded exit status (and 70/71/124/130/143 as recorded) when
  the replay matched the recording to its end
  130  Ctrl-C; 143 SIGTERM (stops the replay the same way)
  0    stopped at --until
  74   --go-live -o: the disk (or quota) filled up while recording the branch
  65   the recording is incomplete (its recorder was killed): replayed up to the
       last complete chunk
  66   replay diverged from the recording (a report says where and what)
  2    the recording file is unusable (damaged, truncated header, newer format,
       wrong --kernel)
  67   --vassert: a VASSERT failed or could not be evaluated (instead of the
       guest's status; 2, 65, 66 and 130 keep theirs); a VASSERT that wrote memory
       outside its stack stops the replay with 70

vassert: a VASSERT(cond) in the guest costs one exit while recording and does
nothing else; `replay --vassert` evaluates cond where the guest reached it,
then restores the machine exactly and replays on. The report counts the
checks, groups the failures by site (file:line, function, condition, first
and last position) and lists the first ones.

examples:
  rrstub replay race.rrr
  rrstub replay race.rrr --until 500        # stop at instruction 500 (either mode)
  rrstub replay race.rrr --until m2         # stop at marker 2
  rrstub replay ticks.rrr --speed realtime
  rrstub record examples/build/race-vassert.elf -o rv.rrr --cmdline increments=300
  rrstub replay rv.rrr --vassert            # which stores lost updates, and where
  rrstub replay rv.rrr --vassert-report checks.jsonl
"""


SERVE_EPILOG = """\
a session (either mode: a fast recording is replayed instruction by instruction,
and `monitor when` says "of ?" for its end until replay has been there):
  rrstub record examples/build/race.elf -o race.rrr --cmdline increments=2000
  rrstub serve race.rrr                     # listens on 127.0.0.1:1234
  gdb examples/build/race.elf -ex 'target remote :1234'
  (gdb) break increment
  (gdb) continue
  (gdb) watch counter
  (gdb) reverse-continue                    # back to the write before this one
  (gdb) monitor help                        # when, markers, marker add, goto, info

exit status:
  0  served (Ctrl-C or --clients ended it)
  2  the recording is unusable, or the address cannot be used (port taken, bad host)
"""


CROP_EPILOG = """\
The cropped recording replays on its own (`rrstub replay OUT`) and ends with
reason "cropped" at the --to marker, after checking the machine's state there
against the digest the original recorded. Its `rrstub info` names the source
recording and marker. The serial output of a crop is not checked against a
recorded hash (the original only hashed the whole run's output).

exit status:
  0  written (and, unless --no-verify, replayed and verified)
  2  bad arguments, an unusable recording, or markers that do not exist or are
     out of order (the message lists the markers there are)
  66 the crop was written but did not verify (please report it: a bug)
  74 the disk (or quota) filled up while writing it (nothing is left at OUT)

examples:
  rrstub info race.rrr                         # markers m0, m1, ...
  rrstub crop race.rrr --from m2 --to m5 -o part.rrr
  rrstub replay part.rrr
"""


def _add_boot_options(p: argparse.ArgumentParser) -> None:
    """The options of every command that boots a kernel (run, record)."""
    p.add_argument("--initrd", metavar="FILE",
                   help="Linux: an initramfs (cpio, compressed or not) handed to the kernel as its "
                        "ramdisk; a recording stores it with the kernel")
    p.add_argument("--boot", choices=("auto", "pvh", "bzimage"), default="auto",
                   help="Linux: how to enter a bzImage. auto/pvh: decompress its vmlinux on the host "
                        "and enter it through PVH (fast where kernel code is emulated); bzimage: its "
                        "own 64-bit entry and decompressor (default auto)")
    p.add_argument("--no-platform-cmdline", action="store_true",
                   help="Linux: pass --cmdline alone, without the options rrstub's platform needs "
                        "(console=ttyS0 nolapic noapic ...; they are printed at boot)")
    p.add_argument("--clock-rate", type=_bounded("a rate", 0.01, 1000.0), default=1.0, metavar="FACTOR",
                   help="the guest's clock runs FACTOR times as fast as the host's (exact mode: as the "
                        "nominal instruction rate; --timeout stays in host seconds). Timer ticks come "
                        "FACTOR times as often per host second: where guest code is emulated and every "
                        "tick costs thousands of instructions, a factor above 1 can leave the guest "
                        "doing little but ticks (Linux stalls at 10 here), below 1 it takes fewer "
                        "(default 1)")


def _open_boot(args: argparse.Namespace):
    """The kernel to boot, the full command line and guest RAM from the boot options (BootError if bad)."""
    from vmm.boot.kernel import linux_cmdline, open_kernel_file
    kernel = open_kernel_file(args.kernel, args.initrd, args.boot)
    cmdline = args.cmdline
    if kernel.linux:
        cmdline = linux_cmdline(args.cmdline, not args.no_platform_cmdline)
    mem = args.mem if args.mem is not None else (LINUX_DEFAULT_MEM if kernel.linux else 64 << 20)
    if kernel.linux and not args.quiet:
        _err(f"booting {kernel.name}: {kernel.how}")
        _err(f"command line: {cmdline}")
    return kernel, cmdline, mem


LINUX_DEFAULT_MEM = 512 << 20


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line, like every other rrstub error (the usage is in --help)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="rrstub",
        description="rrstub runs guest kernels on KVM with fully userspace, deterministic devices "
                    "(the base for recording, replaying and reverse-debugging them).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with `rrstub doctor` to see what this host's KVM supports, then "
               "`rrstub run examples/build/hello.elf`. `rrstub COMMAND --help` explains each "
               "command.\n\nenvironment:\n  RRSTUB_KVM_DEVICE  the KVM device node (default /dev/kvm)")
    p.add_argument("--version", action="version", version=f"rrstub {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="boot a kernel live", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Boot an ELF64 kernel in long mode at CPL0 and run it live, with its serial "
                    "port (COM1) on this terminal. The guest stops the machine by writing its "
                    "exit status to port 0xf4 (see examples/include/rrstub_machine.h).",
        epilog=RUN_EPILOG)
    run.add_argument("kernel", metavar="KERNEL",
                     help="the kernel: an rrstub ELF64 kernel (e.g. examples/build/hello.elf), a Linux "
                          "vmlinux with a PVH note, or a Linux bzImage (/boot/vmlinuz-*)")
    run.add_argument("--mem", type=_guest_mem, default=None, metavar="SIZE",
                     help="guest RAM, e.g. 64M or 1G (default 64M; 512M for Linux)")
    run.add_argument("--serial-in", metavar="PATH|-",
                     help="bytes for the guest's UART to receive: a file, a named pipe, or - for "
                          "standard input (default: none)")
    run.add_argument("--serial-out", metavar="PATH",
                     help="write the guest's UART output to this file instead of standard output")
    run.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                     help="stop with status 124 and a register dump if the guest still runs after "
                          "this many seconds")
    run.add_argument("--cmdline", default="", metavar="TEXT",
                     help="command line passed to the kernel in its boot info")
    run.add_argument("--allow-guest-record", action="store_true",
                     help="let the guest start and stop recording into -o REC through the hypercall "
                          "port (RRSTUB_HC_RECORD_START/STOP); the run is then driven by a recorder "
                          "(--mode) from the start")
    run.add_argument("-o", "--output", metavar="REC", help="with --allow-guest-record: the recording")
    run.add_argument("--force", action="store_true", help="replace REC if it is an existing recording")
    run.add_argument("--mode", choices=("auto", "exact", "fast"), default="auto",
                     help="with --allow-guest-record: the recording engine (default auto)")
    run.add_argument("-q", "--quiet", action="store_true",
                     help="no summary line on stderr when the guest stops")
    _add_boot_options(run)

    rec = sub.add_parser(
        "record", help="boot a kernel and record its run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a kernel like `rrstub run` and record everything that reaches it, into one "
                    "self-contained file that `rrstub replay` reproduces exactly, on this or another machine.",
        epilog=RECORD_EPILOG)
    rec.add_argument("kernel", metavar="KERNEL",
                     help="the kernel (an rrstub ELF64 kernel, a Linux vmlinux or bzImage, as for `run`)")
    rec.add_argument("-o", "--output", required=True, metavar="REC",
                     help="the recording file to write: a new file (an existing one only if it is a "
                          "recording and --force is given)")
    rec.add_argument("--force", action="store_true", help="replace REC if it is an existing recording")
    rec.add_argument("--mode", choices=("auto", "exact", "fast"), default="auto",
                     help="recording engine (default auto; see below)")
    rec.add_argument("--marker-every", type=_marker_every, default=1.0, metavar="SECONDS",
                     help="take a marker every SECONDS of guest time (default 1)")
    rec.add_argument("--no-markers", action="store_true", help="only the initial marker")
    rec.add_argument("--mem", type=_guest_mem, default=None, metavar="SIZE",
                     help="guest RAM (default 64M; 512M for Linux)")
    rec.add_argument("--serial-in", metavar="PATH|-", help="bytes for the guest's UART, as for `run`")
    rec.add_argument("--serial-out", metavar="PATH", help="write the guest's UART output to this file")
    rec.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                     help="stop recording after this many seconds (status 124); the recording is kept")
    rec.add_argument("--cmdline", default="", metavar="TEXT", help="kernel command line")
    rec.add_argument("--quota", type=_quota, metavar="SIZE",
                     help="keep the file under SIZE (e.g. 50M): recording stops there (status 75), "
                          "or with --rolling the oldest part is dropped")
    rec.add_argument("--rolling", type=_rolling, metavar="SECONDS",
                     help="keep only about the last SECONDS of guest time (at least that, at most "
                          "1.5x), by restarting the recording at a later marker")
    rec.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr")
    _add_boot_options(rec)

    rep = sub.add_parser(
        "replay", help="replay a recording", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Replay a recording: the guest runs again from the initial marker and prints "
                    "the same serial output; state hashes in the recording are checked on the way, "
                    "and any divergence is reported with the position where it happened.",
        epilog=REPLAY_EPILOG)
    rep.add_argument("recording", metavar="REC", help="a file written by `rrstub record`")
    rep.add_argument("--until", metavar="POSITION|mN",
                     help="stop at this position (an instruction count, in either mode: a fast "
                          "recording is then replayed instruction by instruction), at marker N, or "
                          "at a marker's or label's name")
    rep.add_argument("--speed", type=_speed, default=None, metavar="max|realtime|FACTOR",
                     help="max (default), realtime (paced by the recorded guest time), or a factor")
    rep.add_argument("--kernel", metavar="PATH",
                     help="check that PATH is the kernel the recording was made with")
    rep.add_argument("--serial-out", metavar="PATH", help="write the replayed UART output to this file")
    rep.add_argument("--vassert", action="store_true",
                     help="evaluate the guest's VASSERTs (examples/include/rrstub_vassert.h) on the way, "
                          "each in the state it was recorded in, and report which failed; the replay "
                          "itself is not changed (it is still checked against the recording)")
    rep.add_argument("--vassert-report", metavar="FILE",
                     help="with --vassert (implied): write every evaluation to FILE as JSON lines")
    rep.add_argument("--gdb", metavar="[HOST:]PORT",
                     help="instead of running to the end, serve the recording to gdb on this address "
                          "(the same as `rrstub serve REC --host HOST --port PORT`)")
    rep.add_argument("--from", dest="start", metavar="POSITION|MARKER",
                     help="start here instead of at the beginning: the nearest marker before it is "
                          "restored (a fast recording's first one) and replay runs silently up to it "
                          "(the serial hash of the whole run is then not checked; marker digests "
                          "still are)")
    rep.add_argument("--go-live", metavar="MARKER|POSITION",
                     help="replay to this marker (mN or a name), label or position, then stop "
                          "replaying and run on live from that exact state, serial on this terminal")
    rep.add_argument("-o", "--output", metavar="BRANCH",
                     help="with --go-live: record the live run as BRANCH, a recording whose parent is REC")
    rep.add_argument("--force", action="store_true",
                     help="with --go-live -o: replace BRANCH if it is an existing recording")
    rep.add_argument("--serial-in", metavar="PATH|-",
                     help="with --go-live: bytes for the guest's UART once live (as for `rrstub run`)")
    rep.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                     help="with --go-live: stop the live run after this many seconds (status 124)")
    rep.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr")

    srv = sub.add_parser(
        "serve", help="debug a recording with gdb, forwards and backwards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a recording to gdb as a remote target. gdb connects with `target remote "
                    "HOST:PORT` and debugs the recorded run as if it were live: breakpoints, "
                    "watchpoints, step and continue, and backwards with reverse-stepi, "
                    "reverse-continue, reverse-next and reverse-finish. Register and memory writes "
                    "are refused: the replay must match the recording. The only thing ever written "
                    "into the recording is a label: `monitor marker add NAME` names the current "
                    "position in its index (the recorded run is not changed; `rrstub info` lists "
                    "labels). gdb started without a file gets the recorded kernel from the server. "
                    "One gdb at a time: another one that connects meanwhile is told so and "
                    "disconnected, and a connection that sends no packet within 10 s is closed; "
                    "when a gdb detaches, the next one finds the recording where it was left.",
        epilog=SERVE_EPILOG)
    srv.add_argument("recording", metavar="REC", help="a file written by `rrstub record` (either mode)")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1; ::1 for IPv6; any other address, "
                          "such as 0.0.0.0 for every interface, lets whoever can reach it read the "
                          "guest's memory, and serve warns)")
    srv.add_argument("--port", type=int, default=1234, help="TCP port (default 1234; 0 picks a free one)")
    srv.add_argument("--kernel", metavar="PATH",
                     help="check that PATH is the kernel the recording was made with")
    srv.add_argument("--serial-out", metavar="PATH",
                     help="write the guest's UART output here (default: stdout), once per position")
    srv.add_argument("--clients", type=_clients, default=None, metavar="N",
                     help="exit after N gdb sessions (default: serve until Ctrl-C)")

    from rrstub import trace
    trace.add_parser(sub)
    from rrstub.ui import command as ui_command
    ui_command.add_parser(sub)
    from rrstub.index import command as index_command
    index_command.add_parsers(sub)

    crp = sub.add_parser(
        "crop", help="cut the part between two markers into its own recording",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write the part of a recording between two of its markers as a new, smaller, "
                    "self-contained recording: it starts with a full snapshot of the machine at "
                    "--from (rebuilt from the markers before it) and ends at --to, where replay "
                    "checks the machine against the original's marker. An exact recording's positions "
                    "keep the original's numbering; a fast one's instruction positions count from "
                    "the crop's start, and its labels are not copied. No KVM is needed.",
        epilog=CROP_EPILOG)
    crp.add_argument("recording", metavar="REC", help="the recording to crop (it is not changed)")
    crp.add_argument("--from", dest="start", required=True, metavar="MARKER",
                     help="first marker: mN, a marker's name, or its position (`rrstub info` lists them)")
    crp.add_argument("--to", dest="stop", required=True, metavar="MARKER", help="last marker, after --from")
    crp.add_argument("-o", "--output", required=True, metavar="OUT", help="the new recording")
    crp.add_argument("--force", action="store_true", help="replace OUT if it is an existing recording")
    crp.add_argument("--no-verify", action="store_true",
                     help="do not replay the cropped recording to check it (checking needs KVM)")
    crp.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr")

    inf = sub.add_parser("info", help="describe a recording", formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Describe a recording without replaying it: guest time, "
                                     "positions, markers, event counts, sizes, host and mode. It reads "
                                     "only the index at the end of the file (or scans the chunk "
                                     "headers of an incomplete one); --verify also checks every "
                                     "chunk's checksums.",
                         epilog="exit status:\n  0  described (also an incomplete recording: it says so)\n"
                                "  2  the file is not a usable recording (the message names the byte "
                                "offset and what to do)")
    inf.add_argument("recording", metavar="REC")
    inf.add_argument("--json", action="store_true", help="print as JSON")
    inf.add_argument("--verify", action="store_true", help="read the whole file and check every checksum")
    inf.add_argument("--kernel-out", metavar="FILE",
                     help="also write the kernel embedded in the recording to FILE (for gdb's symbols)")

    doc = sub.add_parser("doctor", help="probe what this host's KVM can do",
                         description="Probe /dev/kvm live and print what this host supports.",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DOCTOR_EPILOG)
    doc.add_argument("--json", action="store_true", help="print the report as JSON")
    doc.add_argument("--device", metavar="PATH",
                     help="KVM device (default $RRSTUB_KVM_DEVICE, else /dev/kvm)")
    return p


def _err(msg: str) -> None:
    print(f"rrstub: {msg}", file=sys.stderr, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    if args.allow_guest_record or args.output:
        return _cmd_run_guest_record(args)
    return _cmd_run_live(args)


def _recorder_mode(args: argparse.Namespace):
    """Check --mode and the kernel for a recorder: (host facts, mode, why), or an exit status."""
    from rrstub.hostfacts import choose_mode, host_facts
    from vmm import boot

    try:
        args.boot_plan = _open_boot(args)
    except boot.BootError as e:
        _err(str(e))
        return EXIT_USAGE
    facts = host_facts()
    mode, why = (args.mode, "asked for on the command line") if args.mode != "auto" else choose_mode(facts)
    if args.mode == "auto" and args.boot_plan[0].linux and facts.singlestep_cpl0:
        mode, why = "exact", ("Linux reads the TSC at CPL0, which no KVM can trap: only the exact "
                              "engine, which emulates rdtsc before it runs, replays it")
    if args.clock_rate != 1.0 and mode != "exact":
        _err("--clock-rate is offered for live runs and exact recordings; a fast recording takes "
             "its clock from the host")
        return EXIT_USAGE
    if mode == "exact" and not facts.singlestep_cpl0:
        _err("--mode exact needs single-stepping at guest CPL0, which this host's KVM does not do "
             "(see `rrstub doctor`); use --mode fast")
        return EXIT_USAGE
    return facts, mode, why


def _cmd_run_guest_record(args: argparse.Namespace) -> int:
    from rrstub.recording import RecordingError
    from rrstub.session import exit_status, run_guest_controlled
    from vmm import boot
    from vmm.memory import GuestMemoryError

    if not (args.allow_guest_record and args.output):
        _err("--allow-guest-record and -o REC go together: the guest decides when to record, "
             "into REC (`rrstub record` records a whole run)")
        return EXIT_USAGE
    refused = _output_refused(args.output, args.force)
    if refused is not None:
        return refused
    chosen = _recorder_mode(args)
    if isinstance(chosen, int):
        return chosen
    facts, mode, why = chosen
    try:
        serial_in, serial_out = _open_streams(args.serial_in, args.serial_out)
    except OSError as e:
        _err(f"cannot open {e.filename}: {e.strerror}")
        return EXIT_USAGE
    try:
        kernel, cmdline, mem = args.boot_plan
        outcome, summary = run_guest_controlled(
            kernel, args.output, mode, mem_size=mem, cmdline=cmdline,
            serial_in=serial_in, serial_out=serial_out, timeout=args.timeout, mode_reason=why,
            nominal_ps=int(1e12 * args.clock_rate / facts.cpl0_instructions_per_s), cpl3_landmarks=facts.singlestep_cpl3,
            warn=_err)
    except (boot.BootError, GuestMemoryError) as e:
        _err(str(e))
        return EXIT_USAGE
    except RecordingError as e:
        return _write_failed(e)
    finally:
        _close_streams(serial_in, serial_out)
    if not args.quiet:
        _err(f"guest {outcome.reason} (status {outcome.status}) after {outcome.guest_ns / 1e9:.3f} s")
        if summary is None:
            _err(f"the guest never started recording: {args.output} was not written")
        else:
            _err(f"{args.output}: {mode} recording of positions {summary.get('first_position')}.."
                 f"{summary['end_position']} ({summary['reason']})")
    if outcome.reason in ("crash", "hung", "timeout") and outcome.detail:
        _err(outcome.detail)
    return exit_status(outcome)


def _host_breaks_syscall() -> bool:
    from rrstub.hostfacts import host_facts
    from vmm.kvm import KvmError
    try:
        return host_facts().syscall_keeps_user_cs
    except KvmError:
        return False        # the run itself reports a missing or unusable /dev/kvm


def _cmd_run_live(args: argparse.Namespace) -> int:
    from vmm import boot
    from vmm.machine import Machine, MachineError
    from vmm.memory import GuestMemoryError

    from vmm.clock import HostClock
    try:
        kernel, cmdline, mem = _open_boot(args)
    except boot.BootError as e:
        _err(str(e))
        return EXIT_USAGE
    try:
        serial_in, serial_out = _open_streams(args.serial_in, args.serial_out)
    except OSError as e:
        _err(f"cannot open {e.filename}: {e.strerror}")
        return EXIT_USAGE
    try:
        try:
            machine = Machine(kernel, mem_size=mem, cmdline=cmdline, serial_in=serial_in,
                              serial_out=serial_out, clock=HostClock(args.clock_rate))
        except (boot.BootError, GuestMemoryError) as e:
            _err(str(e))
            return EXIT_USAGE
        if kernel.protocol != "elf" and _host_breaks_syscall():
            machine.repair_syscalls()
            if not args.quiet:
                _err("this host's KVM leaves CS/SS at user privilege after a user-mode syscall "
                     "(`rrstub doctor`: syscall CPL3); rrstub finishes each such syscall at the "
                     "guest's page-fault entry (a hardware breakpoint; guest memory is not touched)")
        try:
            result = machine.run(timeout=args.timeout)
        except MachineError as e:
            _err(str(e))
            return e.exit_code
        finally:
            machine.close()
    finally:
        _close_streams(serial_in, serial_out)
    if not args.quiet:
        how = {"reset": "reset the machine (i8042)", "poweroff": "powered off (ACPI S5)"}.get(
            result.reason, f"exited with status {result.status}")
        _err(f"guest {how} after {result.guest_ns / 1e9:.3f} s, {result.exits} exits")
        if machine.emulated:
            _err("instructions rrstub emulated (this host's KVM could not): "
                 + ", ".join(f"{n} x{c}" for n, c in sorted(machine.emulated.items())))
        if machine.syscall_repair is not None and machine.syscall_repair.repairs:
            _err(f"syscalls finished for the host: {machine.syscall_repair.repairs}")
    return result.status


def _open_streams(serial_in_arg, serial_out_arg):
    serial_in = serial_out = None
    if serial_in_arg == "-":
        serial_in = sys.stdin.buffer
    elif serial_in_arg:
        serial_in = open(serial_in_arg, "rb")
    if serial_out_arg:
        serial_out = open(serial_out_arg, "wb")
    return serial_in, serial_out


def _close_streams(*streams) -> None:
    for f in streams:
        if f is not None and f is not sys.stdin.buffer:
            f.close()


def _output_refused(path: str, force: bool) -> Optional[int]:
    """Check a new recording's -o before anything runs: None, or the exit status of a refusal."""
    from rrstub.recording import RecordingError, check_output
    try:
        check_output(path, force=force)
    except RecordingError as e:
        _err(str(e))
        return EXIT_USAGE
    return None


def _write_failed(e) -> int:
    """A RecordingError while recording: its message, and 74 when the disk (or quota) is full."""
    _err(str(e))
    if not e.disk_full:
        return EXIT_RECORDING
    _err(f"the disk is full: recording stopped; {e.path} keeps every chunk written before "
         f"(`rrstub info {e.path}` shows how far it replays). Free some space, or bound the file "
         "with --quota or --rolling.")
    return EXIT_DISK_FULL


def cmd_record(args: argparse.Namespace) -> int:
    from rrstub.recording import RecordingError
    from rrstub.session import exit_status, record
    from vmm import boot
    from vmm.memory import GuestMemoryError

    refused = _output_refused(args.output, args.force)
    if refused is not None:
        return refused
    chosen = _recorder_mode(args)
    if isinstance(chosen, int):
        return chosen
    facts, mode, why = chosen
    if not args.quiet:
        _err(f"recording in {mode} mode: {why}")
    try:
        serial_in, serial_out = _open_streams(args.serial_in, args.serial_out)
    except OSError as e:
        _err(f"cannot open {e.filename}: {e.strerror}")
        return EXIT_USAGE
    marker_every = 0 if args.no_markers else args.marker_every
    if args.rolling is not None:
        if args.no_markers:
            _err("--rolling needs markers to restart the recording at: drop --no-markers")
            return EXIT_USAGE
        if marker_every > args.rolling / 4:
            marker_every = args.rolling / 4
            if not args.quiet:
                _err(f"--rolling {args.rolling:g}: taking a marker every {marker_every:g} s of guest "
                     "time (a quarter of the window) so that old parts can be dropped")
    keys = sys.stdin if args.serial_in != "-" and sys.stdin is not None and sys.stdin.isatty() else None
    try:
        kernel, cmdline, mem = args.boot_plan
        result = record(kernel, args.output, mode, mem_size=mem, cmdline=cmdline,
                        serial_in=serial_in, serial_out=serial_out, timeout=args.timeout,
                        marker_every_ns=int(marker_every * 1e9),
                        mode_reason=why,
                        nominal_ps=int(1e12 * args.clock_rate / facts.cpl0_instructions_per_s),
                        cpl3_landmarks=facts.singlestep_cpl3, quota=args.quota,
                        rolling_ns=None if args.rolling is None else int(args.rolling * 1e9),
                        keys=keys, warn=_err)
    except (boot.BootError, GuestMemoryError) as e:
        _err(str(e))
        return EXIT_USAGE
    except RecordingError as e:
        return _write_failed(e)
    finally:
        _close_streams(serial_in, serial_out)
    o = result.outcome
    if result.message:
        _err(result.message)
    if not args.quiet:
        unit = "instructions" if mode == "exact" else "exits"
        _err(f"recorded {o.reason} (status {o.status}) after {o.guest_ns / 1e9:.3f} s of guest time, "
             f"{o.position} {unit}, {result.markers} markers, in {result.host_seconds:.2f} s: "
             f"{args.output} ({result.file_bytes} bytes)")
        r = result.rolling
        if r and r.get("rebases"):
            _err(f"rolling: the recording keeps {unit} {r['kept_from_position']}..{o.position} "
                 f"(guest {r['kept_from_guest_ns'] / 1e9:.3f}..{o.guest_ns / 1e9:.3f} s); "
                 f"{r['rebases']} restarts dropped {r['dropped_bytes']} bytes")
    return exit_status(o)


def _parse_until(text: Optional[str], rec, what: str = "--until") -> Optional[int]:
    """A position option's value (None when not given); ValueError names the bad input."""
    from rrstub.session import resolve_position
    return None if text is None else resolve_position(rec, text, what)


def cmd_serve(args: argparse.Namespace) -> int:
    from rrstub.gdbproto.server import check_port, connect_hint, exposure_warning, serve, stderr_log
    from rrstub.recording import RecordingError
    from rrstub.replay.timeline import Timeline, TimelineError

    log = stderr_log()
    try:
        check_port(args.port)
        exposure = exposure_warning(args.host, args.port)
    except ValueError as e:
        _err(f"--host/--port: {e}")
        return EXIT_USAGE
    serial_out = None
    try:
        serial_out = open(args.serial_out, "wb") if args.serial_out else sys.stdout.buffer
        log(f"loading {args.recording}")
        timeline = Timeline(args.recording, kernel_check=args.kernel, serial_out=serial_out, warn=_err)
    except (OSError, RecordingError, TimelineError) as e:
        if args.serial_out and serial_out is not None:
            _close_streams(serial_out)
        if isinstance(e, OSError):
            _err(f"cannot open {e.filename}: {e.strerror}")
            return EXIT_USAGE
        _err(str(e))
        return EXIT_RECORDING
    _open_index(timeline, args.recording, log)
    try:
        def ready(port: int) -> None:
            if exposure:
                log(f"warning: {exposure_warning(args.host, port)}")
            log(f"{args.recording}: instructions {timeline.first}..{timeline.last_words()}; waiting for gdb on "
                f"{args.host}:{port} (in gdb: {connect_hint(args.host, port)})")
        serve(timeline, args.host, args.port, log=log, ready=ready, clients=args.clients)
    except OSError as e:
        _err(str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        log("stopped")
    finally:
        timeline.close()
        if args.serial_out:
            _close_streams(serial_out)
    return 0


def _open_index(timeline, recording: str, log) -> None:
    """Give the timeline the recording's index when it has a fresh one (monitor who-wrote, fast
    reverse-continue to write watchpoints); say why not when it has a stale one."""
    from rrstub.index.query import Index, IndexMissing, StaleIndex
    try:
        timeline.index = Index(recording)
        log(f"using the index {timeline.index.folder}")
    except IndexMissing:
        pass
    except StaleIndex as e:
        log(f"not using an index: {e}")


def cmd_replay(args: argparse.Namespace) -> int:
    from rrstub.engines import Divergence, EngineError, place
    from rrstub.recording import Recording, RecordingError
    from rrstub.session import EXIT_DIVERGED, ReplayError, exit_status, replay

    vassert = _vassert_start(args)
    if isinstance(vassert, int):
        return vassert
    if args.gdb is not None:
        from rrstub.gdbproto.server import parse_address
        if args.until is not None or args.speed is not None:
            _err("--gdb serves the whole recording to gdb: drop --until and --speed (use breakpoints "
                 "or `monitor goto` in gdb instead)")
            return EXIT_USAGE
        try:
            args.host, args.port = parse_address(args.gdb)
        except ValueError as e:
            _err(f"--gdb: {e}")
            return EXIT_USAGE
        args.clients = None
        return cmd_serve(args)

    if args.go_live is not None:
        return _cmd_go_live(args)
    if args.output or args.serial_in or args.timeout:
        _err("-o, --serial-in and --timeout belong to --go-live (a replay needs no input and ends "
             "where the recording does)")
        return EXIT_USAGE
    try:
        with Recording.open(args.recording) as rec:
            until = _parse_until(args.until, rec)
            start = _parse_until(args.start, rec, "--from")
    except RecordingError as e:
        _err(str(e))
        return EXIT_RECORDING
    except ValueError as e:
        _err(str(e))
        return EXIT_USAGE
    serial_out = None
    try:
        if args.serial_out:
            serial_out = open(args.serial_out, "wb")
        keys = sys.stdin if sys.stdin is not None and sys.stdin.isatty() else None
        result = replay(args.recording, until=until, speed=args.speed, serial_out=serial_out,
                        kernel_check=args.kernel, warn=_err, keys=keys, start=start, vassert=vassert)
    except OSError as e:
        _err(f"cannot open {e.filename}: {e.strerror}")
        return EXIT_USAGE
    except (RecordingError, ReplayError) as e:
        _err(str(e))
        return EXIT_RECORDING
    except Divergence as e:
        _err(str(e))
        return EXIT_DIVERGED
    except EngineError as e:
        _err(f"replay failed: {e}")
        return EXIT_KVM_ERROR
    finally:
        _close_streams(serial_out)
        if vassert is not None and vassert.report.jsonl is not None:
            vassert.report.jsonl.close()
    o = result.outcome
    unit = result.engine.unit
    if isinstance(until, int) and o.reason not in ("until", "interrupted") and o.position < until:
        # Only a fast recording gets here: its end in instructions is known by replaying to it.
        _err(f"--until {args.until}: the recording ends at {place(unit, o.position)} ({o.reason}), before "
             f"reaching {until}")
        return EXIT_USAGE
    if o.reason == "incomplete":
        _err(f"replayed the incomplete recording to its last complete chunk: {place(unit, o.position)}, "
             f"{o.guest_ns / 1e9:.3f} s of guest time (the recorder did not finish the file)")
    elif o.reason == "until":
        _err(f"stopped at {place(unit, o.position)} (--until), {o.guest_ns / 1e9:.6f} s of guest time")
    elif not args.quiet:
        if o.detail and o.reason in ("crash", "hung", "timeout"):
            _err(o.detail)
        check = "matched the recording" if result.verified_end else "not verified"
        _err(f"replayed {o.reason} (status {o.status}) at {place(unit, o.position)}, "
             f"{o.guest_ns / 1e9:.3f} s of guest time, in {result.host_seconds:.2f} s: {check}")
    if vassert is not None:
        _err(vassert.report.format())
        if not vassert.report.ok and o.reason not in ("interrupted", "incomplete"):
            from rrstub.vassert import EXIT_VASSERT_FAILED
            return EXIT_VASSERT_FAILED
    return exit_status(o)


def _vassert_start(args: argparse.Namespace):
    """``replay --vassert``: a VAssertChecker (None without --vassert), or an exit status."""
    if not (args.vassert or args.vassert_report):
        return None
    if args.gdb is not None or getattr(args, "go_live", None) is not None:
        _err("--vassert replays the whole recording and reports its VASSERTs: drop --gdb and --go-live")
        return EXIT_USAGE
    from rrstub.vassert import VAssertChecker, VAssertReport
    jsonl = None
    if args.vassert_report:
        try:
            jsonl = open(args.vassert_report, "w")
        except OSError as e:
            _err(f"cannot open {e.filename}: {e.strerror}")
            return EXIT_USAGE
    return VAssertChecker(VAssertReport(jsonl=jsonl))


def _cmd_go_live(args: argparse.Namespace) -> int:
    from rrstub.engines import Divergence, EngineError, place
    from rrstub.recording import RecordingError
    from rrstub.session import EXIT_DIVERGED, ReplayError, exit_status, go_live

    if args.until is not None or args.speed is not None:
        _err("--go-live replays at full speed to its point and then runs live: drop --until and --speed")
        return EXIT_USAGE
    if args.output and os.path.abspath(args.output) == os.path.abspath(args.recording):
        _err(f"-o {args.output}: the branch needs its own file; {args.recording} is its parent")
        return EXIT_USAGE
    if args.output:
        refused = _output_refused(args.output, args.force)
        if refused is not None:
            return refused
    try:
        serial_in, serial_out = _open_streams(args.serial_in, args.serial_out)
    except OSError as e:
        _err(f"cannot open {e.filename}: {e.strerror}")
        return EXIT_USAGE
    keys = sys.stdin if args.serial_in != "-" and sys.stdin is not None and sys.stdin.isatty() else None
    try:
        result = go_live(args.recording, args.go_live, out_path=args.output, serial_in=serial_in,
                         serial_out=serial_out, timeout=args.timeout, kernel_check=args.kernel,
                         keys=keys, warn=_err)
    except RecordingError as e:
        return _write_failed(e)
    except ReplayError as e:
        _err(str(e))
        return EXIT_RECORDING
    except Divergence as e:
        _err(str(e))
        return EXIT_DIVERGED
    except EngineError as e:
        _err(f"go-live failed: {e}")
        return EXIT_KVM_ERROR
    finally:
        _close_streams(serial_in, serial_out)
    o = result.outcome
    if result.message:
        _err(result.message)
    if not args.quiet:
        unit = "instructions" if result.mode == "exact" else "exits"
        kept = f"branch recorded: {args.output} ({result.file_bytes} bytes)" if args.output else "not recorded"
        _err(f"live run ended: {o.reason} (status {o.status}) at {place(unit[:-1], o.position)}, "
             f"{o.guest_ns / 1e9:.3f} s of guest time; {kept}")
    return exit_status(o)


def cmd_info(args: argparse.Namespace) -> int:
    from rrstub.info import describe, format_info, write_kernel
    from rrstub.recording import RecordingError

    try:
        info = describe(args.recording, verify=args.verify)
        wrote = write_kernel(args.recording, args.kernel_out) if args.kernel_out else None
    except RecordingError as e:
        _err(str(e))
        return EXIT_RECORDING
    except OSError as e:
        _err(f"--kernel-out: cannot write {e.filename}: {e.strerror}")
        return EXIT_USAGE
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    if wrote:
        _err(wrote)
    return 0


def cmd_crop(args: argparse.Namespace) -> int:
    from rrstub.edit import EditError, crop
    from rrstub.recording import RecordingError

    progress = (lambda m: None) if args.quiet else (lambda m: _err(m))
    try:
        done = crop(args.recording, args.output, args.start, args.stop, progress=progress, force=args.force)
    except RecordingError as e:
        if e.disk_full:
            _err(f"cannot write {args.output}: the disk is full (nothing was left there): {e}")
            return EXIT_DISK_FULL
        _err(str(e))
        return EXIT_RECORDING
    except EditError as e:
        _err(str(e))
        return EXIT_RECORDING
    except OSError as e:
        _err(f"cannot write {args.output}: {e.strerror}")
        return EXIT_RECORDING
    if not args.quiet:
        _err(f"cropped m{done['from']}..m{done['to']} (positions {done['first_position']}.."
             f"{done['last_position']}) into {args.output}: {done['markers']} markers, {done['bytes']} "
             f"bytes ({done['source_bytes']} in the original)")
    if done["labels_dropped"]:
        _err(f"{done['labels_dropped']} labels were not copied: a fast recording's labels count instructions "
             "from its start, and the crop's start has no instruction count in the file")
    if args.no_verify:
        return 0
    return _verify_replay(args.output, args.quiet)


def _verify_replay(path: str, quiet: bool) -> int:
    """Replay a recording just written, to check it; 0 when it matched to its end."""
    from rrstub.engines import Divergence, EngineError
    from rrstub.session import EXIT_DIVERGED, ReplayError, replay

    try:
        with open(os.devnull, "wb") as sink:
            result = replay(path, serial_out=sink, warn=_err)
    except Divergence as e:
        _err(f"{path} was written but does not replay: {e}")
        return EXIT_DIVERGED
    except (ReplayError, EngineError) as e:
        _err(f"{path} was written but could not be replayed to check it: {e}")
        return EXIT_DIVERGED
    if not result.verified_end:
        _err(f"{path} was written, but its replay ended with {result.outcome.reason}, not its recorded end")
        return EXIT_DIVERGED
    if not quiet:
        _err(f"verified: {path} replays to its end and matches ({result.host_seconds:.2f} s)")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from rrstub.trace import cmd_trace as run_trace
    return run_trace(args)


def cmd_ui(args: argparse.Namespace) -> int:
    from rrstub.ui.command import cmd_ui as run_ui
    return run_ui(args)


def cmd_index(args: argparse.Namespace) -> int:
    from rrstub.index.command import cmd_index as run_index
    return run_index(args)


def cmd_query(args: argparse.Namespace) -> int:
    from rrstub.index.command import cmd_query as run_query
    return run_query(args)


def cmd_doctor(args: argparse.Namespace) -> int:
    from vmm.probe import format_report, probe_host

    progress = (lambda msg: None) if args.json else (lambda msg: print(f"probing {msg}...", file=sys.stderr, flush=True))
    report = probe_host(args.device, progress)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_report(report))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from vmm.kvm import KvmError, KvmUnavailable
    from vmm.probe import ProbeFailed

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    previous_term = _sigterm_as_interrupt()
    try:
        return {"run": cmd_run, "doctor": cmd_doctor, "record": cmd_record, "replay": cmd_replay,
                "info": cmd_info, "serve": cmd_serve, "trace": cmd_trace,
                "crop": cmd_crop, "ui": cmd_ui, "index": cmd_index,
                "query": cmd_query}[args.command](args)
    except KvmUnavailable as e:
        _err(str(e))
        return EXIT_NO_KVM
    except KvmError as e:
        _err(f"KVM error: {e}")
        return EXIT_KVM_ERROR
    except ProbeFailed as e:
        _err(f"doctor: {e}")
        return EXIT_KVM_ERROR
    except KeyboardInterrupt as e:
        from rrstub.session import interruption
        status, _, word = interruption(e)
        _err(word)
        return status
    except BrokenPipeError:
        # The reader of our output went away (`| head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _sigterm_as_interrupt():
    """SIGTERM stops a command the way Ctrl-C does (a recording is finished, not cut).

    Returns the handler it replaced, or None when it could not install one
    (``main`` called from a thread other than the main one).
    """
    from rrstub.session import Terminated
    try:
        return signal.signal(signal.SIGTERM, Terminated.handler)
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
