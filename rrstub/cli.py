"""The `rrstub` command line: argument parsing, error reporting, exit codes.

Every failure a user can cause or meet (a bad kernel file, no KVM, a guest
that crashes or hangs) ends here as one `rrstub: ...` message on stderr and
a documented exit status; tracebacks are for bugs only.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from rrstub import __version__

EXIT_USAGE = 2
EXIT_NO_KVM = 3
EXIT_KVM_ERROR = 70

RUN_EPILOG = """\
exit status:
  0-255  the value the guest wrote to the debug-exit port (0xf4);
         0 also when the guest reset the machine through the i8042 (0xfe to port 0x64)
  2      bad arguments or an unusable kernel file
  3      KVM is not available (no /dev/kvm, or no permission)
  70     the guest crashed: triple fault, or an instruction the host KVM cannot
         emulate; a register dump and the last exits are printed (also: a KVM
         call failed)
  71     the guest halted with no way to wake up
  124    the guest was still running at --timeout

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


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return v


def _size(text: str) -> int:
    from vmm.memory import parse_size
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    run.add_argument("kernel", metavar="KERNEL", help="ELF64 x86-64 kernel image, e.g. examples/build/hello.elf")
    run.add_argument("--mem", type=_size, default="64M", metavar="SIZE",
                     help="guest RAM, e.g. 64M or 1G (default 64M)")
    run.add_argument("--serial-in", metavar="PATH|-",
                     help="bytes for the guest's UART to receive: a file, a named pipe, or - for "
                          "standard input (default: none)")
    run.add_argument("--serial-out", metavar="PATH",
                     help="write the guest's UART output to this file instead of standard output")
    run.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                     help="stop with status 124 and a register dump if the guest still runs after "
                          "this many seconds")
    run.add_argument("--cmdline", default="", metavar="TEXT",
                     help="command line passed to the kernel in its boot info")
    run.add_argument("-q", "--quiet", action="store_true",
                     help="no summary line on stderr when the guest stops")

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
    from vmm import boot
    from vmm.machine import Machine, MachineError
    from vmm.memory import GuestMemoryError

    try:
        image = boot.load_kernel_file(args.kernel)
    except boot.BootError as e:
        _err(str(e))
        return EXIT_USAGE
    serial_in = serial_out = None
    try:
        if args.serial_in == "-":
            serial_in = sys.stdin.buffer
        elif args.serial_in:
            serial_in = open(args.serial_in, "rb")
        if args.serial_out:
            serial_out = open(args.serial_out, "wb")
    except OSError as e:
        _err(f"cannot open {e.filename}: {e.strerror}")
        return EXIT_USAGE
    try:
        try:
            machine = Machine(image, mem_size=args.mem, cmdline=args.cmdline,
                              serial_in=serial_in, serial_out=serial_out)
        except (boot.BootError, GuestMemoryError) as e:
            _err(str(e))
            return EXIT_USAGE
        try:
            result = machine.run(timeout=args.timeout)
        except MachineError as e:
            _err(str(e))
            return e.exit_code
        finally:
            machine.close()
    finally:
        for f in (serial_in, serial_out):
            if f is not None and f is not sys.stdin.buffer:
                f.close()
    if not args.quiet:
        how = ("reset the machine (i8042)" if result.reason == "reset"
               else f"exited with status {result.status}")
        _err(f"guest {how} after {result.guest_ns / 1e9:.3f} s, {result.exits} exits")
    return result.status


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
    try:
        return {"run": cmd_run, "doctor": cmd_doctor}[args.command](args)
    except KvmUnavailable as e:
        _err(str(e))
        return EXIT_NO_KVM
    except KvmError as e:
        _err(f"KVM error: {e}")
        return EXIT_KVM_ERROR
    except ProbeFailed as e:
        _err(f"doctor: {e}")
        return EXIT_KVM_ERROR
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
