"""`rrstub trace`: every instruction of a recording, from its replay.

``InstructionTrace`` replays a ``Timeline`` forward over a range of
positions and reports each step as an ``Executed``: its position, address,
bytes, disassembly (capstone, Intel syntax) and the registers it changed.
It only observes: the guest runs exactly as in any replay (the engine's
between-instructions hook reads the vCPU; nothing is written to the guest).

Invariants and conventions:
* the step at position P is what runs while the count goes from P to P+1;
  its line is written when replay reaches P+1, from the registers at P and
  P+1, and its rip is the rip at P;
* every instruction is its own position, and so is every interrupt
  delivery (``<interrupt vector N>`` at the rip the interrupt came before;
  the instruction there runs later, on its own line) and every exception
  an instruction raises (the faulting instruction's line shows the
  delivery).  Recordings made before positions were split (config
  ``positions`` < 2) have steps that run one more instruction: an
  interrupt delivery also runs the handler's first instruction, an iretq
  the instruction it returns to.  Such a line carries the extra
  instruction as ``then``, and so does a step of any other instruction
  whose rip lands just past the following instruction;
* general registers and rflags are read after every step; segment, control
  and descriptor-table registers only after instructions that can change
  them (``_SYSTEM``), after interrupt deliveries, and when control did not
  fall through an instruction that is not a branch (an exception was
  delivered); kernel_gs_base only after swapgs and wrmsr;
* translations of code pages are cached until those registers are re-read
  (mov to a control register, invlpg and the like are in ``_SYSTEM``).
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from typing import Callable, NamedTuple, Optional, TextIO

from rrstub.engines import NEVER

TEXT_EPILOG = """\
output (--format text, the default): one line per position
  POSITION  RIP  BYTES  DISASSEMBLY  [<then RIP: DISASSEMBLY>]  CHANGED
  e.g. (spacing shortened)
     16052  00000000001000a0  8b 15 7a 6f 00 00   mov edx, dword ptr [rip + 0x6f7a]   rdx=0x1d5
  CHANGED lists the registers the step changed, with their new values (rip
  is not listed: the next line shows it). General registers and rflags are
  compared after every step; segment selectors, fs_base, gs_base,
  kernel_gs_base, cr0/2/3/4/8, efer, gdt_base, idt_base, tr and ldt when an
  instruction can change them or an exception or interrupt was delivered.

  An interrupt delivery is a position of its own: its line reads
  <interrupt vector N> at the rip the interrupt came before (the
  instruction there runs later, on its own line), and the handler's first
  instruction is the next line. An instruction that raises an exception
  (ud2, a page fault) shows the delivery's effects on its line.
  Older recordings (made before deliveries had positions of their own)
  join some pairs into one step
  (an interrupt and the handler's first instruction, an iretq and the
  instruction it returns to), shown as <then RIP: DISASSEMBLY>, with
  CHANGED covering the whole step.

output (--format jsonl): one JSON object per line
  {"pos": 16052, "rip": "0x1000a0", "bytes": "8b157a6f0000",
   "asm": "mov edx, dword ptr [rip + 0x6f7a]", "changed": {"rdx": "0x1d5"}}
  an interrupt step has "interrupt": N (its "bytes" are empty), and a step
  of an older recording that ran one more instruction has
  "then": {"rip": ..., "bytes": ..., "asm": ...}.
  Addresses and register values are hex strings: JSON readers such as jq
  lose precision in numbers above 2**53.

positions: an instruction count, mN for recorded marker N, or a marker or
label name (as `rrstub replay --until`). The trace covers [--from, --to):
--to is the first position not listed; the default is the whole recording
(a cropped recording starts where its first marker is).

exit status:
  0    traced (also when the output's reader went away early, e.g. `| head`)
  2    bad arguments (a position outside the recording, --from after --to) or an
       unusable recording
  66   replay did not follow the recording (a report says where)
  70   the replay engine failed
  130  Ctrl-C (143: SIGTERM): what was traced up to then is written

examples:
  rrstub record examples/build/race.elf -o race.rrr --cmdline increments=200
  rrstub trace race.rrr | head -20
  rrstub trace race.rrr --from 12000 --to 12100
  rrstub trace race.rrr --from m1 --format jsonl -o trace.jsonl
  rrstub trace race.rrr | grep -c 'interrupt vector 32'
"""

LONG_TRACE = 100_000             # positions: progress on stderr even when it is not a terminal
PROGRESS_EVERY_TTY = 0.25        # seconds between redraws on a terminal
PROGRESS_EVERY_LOG = 5.0         # seconds between progress lines otherwise
PROGRESS_FIRST = 0.5             # nothing is shown for traces shorter than this
WRITE_EVERY = 512                # lines buffered before a write
MSR_KERNEL_GS_BASE = 0xC0000102
CR0_PE = 1
EFER_LMA = 1 << 10
MAX_INSTRUCTION = 15

# How control leaves an instruction: what the hook expects of the next rip.
_FALLS = 0      # to the next instruction (or the same one: a rep iteration)
_BRANCH = 1     # anywhere
_SYSTEM = 2     # anywhere, and system registers may have changed

_SYSTEM_MNEMONICS = frozenset((
    "iret", "iretd", "iretq", "int", "int1", "int3", "into", "syscall", "sysret", "sysretq",
    "sysenter", "sysexit", "sysexitq", "swapgs", "wrmsr", "lgdt", "lidt", "lldt", "ltr", "lmsw",
    "clts", "ljmp", "lcall", "retf", "retfq", "lret", "lretq", "lss", "lds", "les", "lfs", "lgs",
    "wrfsbase", "wrgsbase", "rsm", "invlpg", "invlpga", "invpcid", "ud2"))
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss")
_MSR_MNEMONICS = frozenset(("swapgs", "wrmsr"))
_SYSTEM_NAMES = (*_SEGMENTS, "fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8",
                 "efer", "gdt_base", "idt_base", "tr", "ldt")
_K_GS_BASE = _SYSTEM_NAMES.index("k_gs_base")
_IDT_BASE = _SYSTEM_NAMES.index("idt_base")


class Executed(NamedTuple):
    """One step of the replay (a NamedTuple: one is made per instruction)."""
    pos: int
    rip: int                                # the rip at ``pos``
    code: bytes                             # empty for an interrupt delivery
    asm: str
    changed: tuple[tuple[str, int], ...]    # (register, new value), in a fixed order
    interrupt: Optional[int] = None         # the vector this step delivered
    then: Optional[tuple[int, bytes, str]] = None   # (rip, bytes, asm) of an extra instruction run


def flow_of(mnemonic: str, op_str: str) -> int:
    """_FALLS, _BRANCH or _SYSTEM for a decoded instruction."""
    if mnemonic in _SYSTEM_MNEMONICS:
        return _SYSTEM
    if mnemonic in ("mov", "pop"):
        dest = op_str.split(",", 1)[0].strip()
        if dest in _SEGMENTS or dest.startswith(("cr", "dr")):
            return _SYSTEM
        return _FALLS
    if mnemonic.startswith(("j", "call", "ret", "loop")):
        return _BRANCH
    return _FALLS


# ---------------------------------------------------------------------------
# Output formats


def format_text(x: Executed, pos_width: int = 10) -> str:
    parts = [f"{x.pos:>{pos_width}}  {x.rip:016x}  {x.code.hex(' '):<32} {x.asm:<40}"]
    if x.then is not None:
        parts.append(f"<then {x.then[0]:x}: {x.then[2]}>")
    if x.changed:
        parts.append(" ".join(f"{n}={v:#x}" for n, v in x.changed))
    return "  ".join(parts).rstrip()


def format_json(x: Executed) -> str:
    changed = ",".join(f'"{n}":"{v:#x}"' for n, v in x.changed)
    extra = "" if x.interrupt is None else f',"interrupt":{x.interrupt}'
    if x.then is not None:
        rip, code, asm = x.then
        extra += f',"then":{{"rip":"{rip:#x}","bytes":"{code.hex()}","asm":{json.dumps(asm)}}}'
    return (f'{{"pos":{x.pos},"rip":"{x.rip:#x}","bytes":"{x.code.hex()}","asm":{json.dumps(x.asm)},'
            f'"changed":{{{changed}}}{extra}}}')


# ---------------------------------------------------------------------------
# The trace


class InstructionTrace:
    """Replays a timeline forward and reports each instruction (see the module docstring)."""

    def __init__(self, timeline):
        from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_32, CS_MODE_64, Cs
        from vmm.kvm import REG_NAMES, _check
        from vmm._native import ffi, lib
        self.timeline = timeline
        self.engine = timeline.engine
        self.vcpu = timeline.machine.vcpu
        self.mem = timeline.machine.mem
        self._lib = lib
        self._check = _check
        self._names = REG_NAMES
        self._rip_index = REG_NAMES.index("rip")
        self._rsp_index = REG_NAMES.index("rsp")
        self._rcx_index = REG_NAMES.index("rcx")
        self._regs_buf = ffi.new("struct kvm_regs *")
        self._regs_view = ffi.buffer(self._regs_buf)
        self._regs_struct = struct.Struct(f"<{len(REG_NAMES)}Q")
        self._sregs_buf = ffi.new("struct kvm_sregs *")
        self._disassemblers = {64: Cs(CS_ARCH_X86, CS_MODE_64), 32: Cs(CS_ARCH_X86, CS_MODE_32),
                               16: Cs(CS_ARCH_X86, CS_MODE_16)}
        self._decoded: dict[tuple, tuple[int, str, int]] = {}
        self._pages: dict[int, int] = {}
        self._emit: Callable[[Executed], None] = lambda x: None
        self._tick: Callable[[int], None] = lambda pos: None
        self._stop = 0
        self._queued: Optional[tuple[int, int]] = None   # (position injected at, vector), not yet delivered

    # -- vCPU state --------------------------------------------------------------
    def _read_regs(self) -> tuple:
        self._check(self._lib.rr_ioctl(self.vcpu.fd, self._lib.KVM_GET_REGS, self._regs_buf), "KVM_GET_REGS")
        return self._regs_struct.unpack(self._regs_view)

    def _read_system(self, msrs: bool) -> None:
        """Segment/control/table registers now into ``self._system``; forgets cached translations."""
        s = self._sregs_buf
        self._check(self._lib.rr_ioctl(self.vcpu.fd, self._lib.KVM_GET_SREGS, s), "KVM_GET_SREGS")
        values = [getattr(s, n).selector for n in _SEGMENTS]
        values += [s.fs.base, s.gs.base,
                   self.vcpu.get_msrs([MSR_KERNEL_GS_BASE]).get(MSR_KERNEL_GS_BASE, 0) if msrs
                   else self._system[_K_GS_BASE],
                   s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.gdt.base, s.idt.base,
                   s.tr.selector, s.ldt.selector]
        self._system = tuple(values)
        self._paging = (s.cr0, s.cr3, s.cr4, s.efer)
        self._cs_base = s.cs.base
        long_mode = bool(s.efer & EFER_LMA) and bool(s.cs.l)
        self._bits = 64 if long_mode else 32 if s.cs.db else 16
        self._pages.clear()

    # -- guest code ----------------------------------------------------------------
    def _linear(self, rip: int) -> int:
        return rip if self._bits == 64 else (self._cs_base + rip) & 0xFFFFFFFF

    def _physical_page(self, linear_page: int) -> int:
        from vmm import paging
        phys = self._pages.get(linear_page)
        if phys is None:
            cr0, cr3, cr4, efer = self._paging
            phys = paging.virt_to_phys(self.mem, cr0, cr3, cr4, efer, linear_page << 12)
            self._pages[linear_page] = phys
        return phys

    def _read_code(self, linear: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``linear``, fewer where the next page is not mapped."""
        from vmm import paging
        out = b""
        view, size = self.mem.view, self.mem.size
        while length > 0:
            try:
                phys = self._physical_page(linear >> 12) + (linear & 0xFFF)
            except paging.PageFault:
                break
            n = min(length, 0x1000 - (linear & 0xFFF), size - phys)
            if n <= 0:
                break
            out += view[phys:phys + n]
            linear += n
            length -= n
        return out

    def _decode(self, rip: int) -> tuple[bytes, str, int]:
        """(bytes, disassembly, flow) of the instruction at ``rip``."""
        code = self._read_code(self._linear(rip), MAX_INSTRUCTION)
        key = (self._bits, rip, code)
        hit = self._decoded.get(key)
        if hit is None:
            insn = next(self._disassemblers[self._bits].disasm_lite(code, rip, 1), None)
            if insn is None:
                hit = (len(code), "(not mapped)" if not code else "(capstone cannot decode this)", _SYSTEM)
            else:
                _, length, mnemonic, op_str = insn
                hit = (length, f"{mnemonic} {op_str}".rstrip(), flow_of(mnemonic, op_str))
            self._decoded[key] = hit
        return code[:hit[0]], hit[1], hit[2]

    def _handler_entry(self, vector: int) -> int:
        """The rip of interrupt ``vector``'s handler, from the IDT (or real mode's vector table)."""
        cr0, _, _, efer = self._paging
        idt = self._system[_IDT_BASE]
        if not cr0 & CR0_PE:
            return int.from_bytes(self._read_code(idt + 4 * vector, 2), "little")
        if efer & EFER_LMA:
            gate = self._read_code(idt + 16 * vector, 16)
            return (int.from_bytes(gate[0:2], "little") | int.from_bytes(gate[6:8], "little") << 16
                    | int.from_bytes(gate[8:12], "little") << 32)
        gate = self._read_code(idt + 8 * vector, 8)
        return int.from_bytes(gate[0:2], "little") | int.from_bytes(gate[6:8], "little") << 16

    # -- the replay ----------------------------------------------------------------
    def run(self, start: int, stop: int, emit: Callable[[Executed], None],
            tick: Callable[[int], None] = lambda pos: None):
        """Move to ``start``, replay to ``stop``, ``emit`` each instruction in [start, stop).

        ``tick(position)`` is called every 4096 instructions (progress).
        Returns the engine's Outcome; raises Divergence when replay leaves the
        recording, TimelineError when it cannot get there.
        """
        from rrstub.engines import Outcome
        from rrstub.replay.timeline import TimelineError
        from vmm.machine import MachineError
        t, e = self.timeline, self.engine
        t.goto(start)
        c = e.ctl
        vector = self.vcpu.interrupt_in_flight()
        self._queued = None if vector is None else (start, vector)
        self._read_system(msrs=True)
        self._regs = self._read_regs()
        self._emulated = e.steps_emulated
        self._emit, self._tick, self._stop = emit, tick, stop
        if start >= stop:
            return Outcome("until", 0, start, e.guest_now())
        self._look_ahead(self._regs)
        vcpu = self.vcpu
        inject = vcpu.interrupt

        def noting_interrupt(vector: int) -> None:
            inject(vector)
            self._queued = (c.icount, vector)

        vcpu.interrupt = noting_interrupt
        saved_hook = e.on_boundary
        e.on_boundary = self._boundary
        e.until = stop
        e.boundary_at = start + 1
        try:
            return e.run()
        except MachineError as err:
            end = t.guest_end
            if c.icount >= e.boundary_at and c.icount <= stop:
                self._boundary()    # the last instruction (a hlt the guest never woke from) has its line
            if end is not None and e.log_pos >= end.pos:
                return Outcome(end.reason, end.status, c.icount, e.guest_now(), str(err))
            raise TimelineError(f"the guest stopped at instruction {c.icount}, where the recording "
                                f"does not end: {err}") from None
        finally:
            del vcpu.interrupt
            e.on_boundary = saved_hook
            e.until = None
            e.boundary_at = NEVER
            t.frontier = max(t.frontier, c.icount)

    def _landing(self, asm: str, regs: tuple) -> Optional[int]:
        """Where an iret or sysret at this state returns to (read before it runs)."""
        if asm == "iretq":
            return int.from_bytes(self._read_code(regs[self._rsp_index], 8), "little")
        if asm.startswith("sysret"):
            return regs[self._rcx_index] if asm == "sysretq" else regs[self._rcx_index] & 0xFFFFFFFF
        return None

    def _look_ahead(self, regs: tuple) -> None:
        """Decode the instruction the next step runs (and where it returns to, for iretq/sysret)."""
        self._next = self._decode(regs[self._rip_index])
        self._next_landing = self._landing(self._next[1], regs) if self._next[2] == _SYSTEM else None

    def _boundary(self) -> None:
        """Between instructions, at position ``pos``: write the line of ``pos - 1``."""
        e = self.engine
        pos = e.ctl.icount
        e.boundary_at = pos + 1
        regs = self._read_regs()
        old = self._regs
        rip_index = self._rip_index
        code, asm, flow = self._next
        rip, nrip = old[rip_index], regs[rip_index]
        landing = self._next_landing
        vector = then = None
        queued = self._queued
        emulated = e.steps_emulated != self._emulated
        self._emulated = e.steps_emulated
        if queued is not None and queued[0] < pos and not emulated:
            # This step entered KVM with the interrupt queued: it was delivered first.
            vector = queued[1]
            self._queued = None
            code, asm, flow, landing = b"", f"<interrupt vector {vector}>", _SYSTEM, None
        elif flow == _FALLS and nrip != rip + len(code) and nrip != rip:
            landing = rip + len(code)
            if nrip != landing + len(self._decode(landing)[0]):
                flow, landing = _SYSTEM, None   # not past the next instruction either: an exception
        changed = [(n, v) for n, v, o in zip(self._names, regs, old) if v != o and n != "rip"]
        if flow == _SYSTEM:
            system = self._system
            self._read_system(msrs=asm.split(" ", 1)[0] in _MSR_MNEMONICS)
            changed += [(n, v) for n, v, o in zip(_SYSTEM_NAMES, self._system, system) if v != o]
            if vector is not None:
                landing = self._handler_entry(vector)
        if landing is not None and nrip != landing:
            then = (landing, *self._decode(landing)[:2])
        self._regs = regs
        self._emit(Executed(pos - 1, rip, code, asm, tuple(changed), vector, then))
        if pos & 0xFFF == 0:
            self._tick(pos)
        if pos < self._stop:
            self._look_ahead(regs)


# ---------------------------------------------------------------------------
# Progress and output


class Progress:
    """A progress line on stderr: redrawn in place on a terminal, a plain line now and then otherwise."""

    def __init__(self, start: int, stop: int, stream: TextIO = sys.stderr, quiet: bool = False):
        self.start, self.stop = start, stop
        self.stream = stream
        self.tty = stream.isatty()
        self.enabled = not quiet and (self.tty or stop - start > LONG_TRACE)
        self.began = time.monotonic()
        self.next_at = self.began + PROGRESS_FIRST
        self.first: Optional[tuple[float, int]] = None
        self.drawn = False

    def __call__(self, pos: int) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = (now, pos)     # the rate counts from here, not from the replay to --from
        if not self.enabled or now < self.next_at:
            return
        self.next_at = now + (PROGRESS_EVERY_TTY if self.tty else PROGRESS_EVERY_LOG)
        done, total = pos - self.start, self.stop - self.start
        rate = (pos - self.first[1]) / (now - self.first[0]) if now > self.first[0] else 0
        if self.stop >= NEVER:      # a fast recording whose end is not counted yet
            line = f"rrstub: trace at instruction {pos}, {rate / 1e3:.0f}k instructions/s"
        else:
            eta = (total - done) / rate if rate else 0
            line = (f"rrstub: trace at instruction {pos} ({100 * done / total:.0f}%), "
                    f"{rate / 1e3:.0f}k instructions/s, {eta:.0f} s left")
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.drawn = True

    def done(self) -> None:
        if self.drawn and self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


class LineWriter:
    """Formats instructions and writes them in batches; ``flush`` writes what is left."""

    def __init__(self, out: TextIO, fmt: Callable[[Executed], str]):
        self.out = out
        self.fmt = fmt
        self.lines: list[str] = []
        self.count = 0

    def __call__(self, x: Executed) -> None:
        self.lines.append(self.fmt(x))
        if len(self.lines) >= WRITE_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            self.out.write("\n".join(self.lines) + "\n")
            self.count += len(self.lines)
            self.lines = []
        self.out.flush()


# ---------------------------------------------------------------------------
# Command line


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "trace", help="list every instruction a recording executed",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="List the instructions a recording executed, one per line, with "
                    "position, address, bytes, disassembly and the registers each one changed. The "
                    "trace comes from replaying the recording; the guest is not changed.",
        epilog=TEXT_EPILOG)
    p.add_argument("recording", metavar="REC", help="a file written by `rrstub record` (either mode)")
    p.add_argument("--from", dest="start", metavar="POSITION|mN",
                   help="first instruction to list (default: the start of the recording)")
    p.add_argument("--to", dest="stop", metavar="POSITION|mN",
                   help="stop before this instruction (default: the end of the recording)")
    p.add_argument("--format", choices=("text", "jsonl"), default="text",
                   help="text (default: aligned columns) or jsonl (one JSON object per line)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the trace here instead of standard output")
    p.add_argument("--kernel", metavar="PATH",
                   help="check that PATH is the kernel the recording was made with")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary on stderr")
    return p


def cmd_trace(args: argparse.Namespace) -> int:
    from rrstub.cli import EXIT_KVM_ERROR, EXIT_RECORDING, EXIT_USAGE, _err, _parse_until
    from rrstub.engines import Divergence, EngineError
    from rrstub.recording import Recording, RecordingError
    from rrstub.replay.timeline import PastTheEnd, Timeline, TimelineError
    from rrstub.session import EXIT_DIVERGED, interruption

    try:
        with Recording.open(args.recording) as rec:
            start = _parse_until(args.start, rec, "--from")
            stop = _parse_until(args.stop, rec, "--to")
    except RecordingError as e:
        _err(str(e))
        return EXIT_RECORDING
    except ValueError as e:
        _err(str(e))
        return EXIT_USAGE
    try:
        timeline = Timeline(args.recording, kernel_check=args.kernel, warn=_err)
    except (RecordingError, TimelineError) as e:
        _err(str(e))
        return EXIT_RECORDING
    with timeline:
        try:
            start, stop = (None if p is None else timeline.resolve(p) for p in (start, stop))
        except (Divergence, TimelineError) as e:
            _err(str(e))
            return EXIT_DIVERGED
        # A fast recording's end is counted when replay gets there: "to the end" until then.
        first, last = timeline.first, timeline.last if timeline.last is not None else NEVER
        start = first if start is None else start
        stop = last if stop is None else stop
        for option, text, value in (("--from", args.start, start), ("--to", args.stop, stop)):
            if not first <= value <= last:
                _err(f"{option} {text}: the recording has instructions {first}..{timeline.last_words()}")
                return EXIT_USAGE
        if start > stop:
            _err(f"--from {args.start} (instruction {start}) is after --to {args.stop} (instruction {stop})")
            return EXIT_USAGE
        try:
            out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        except OSError as e:
            _err(f"cannot open {e.filename}: {e.strerror}")
            return EXIT_USAGE
        width = max(6, len(str(stop))) if stop < NEVER else 8
        fmt = format_json if args.format == "jsonl" else (lambda x: format_text(x, width))
        writer = LineWriter(out, fmt)
        progress = Progress(start, stop, quiet=args.quiet)
        began = time.monotonic()
        failure = None
        try:
            try:
                InstructionTrace(timeline).run(start, stop, writer, progress)
            except KeyboardInterrupt as e:
                status, _, word = interruption(e)
                failure = status, word
            except PastTheEnd:
                _err(f"--from {args.start}: the recording has instructions {first}..{timeline.last_words()}")
                return EXIT_USAGE
            except (Divergence, TimelineError) as e:
                failure = EXIT_DIVERGED, str(e)
            except EngineError as e:
                failure = EXIT_KVM_ERROR, f"replay failed: {e}"
            writer.flush()
        finally:
            if args.output:
                out.close()
        progress.done()
        if failure is None and stop < NEVER and start + writer.count < stop and args.stop is not None:
            _err(f"--to {args.stop}: the recording ends at instruction {start + writer.count}, before "
                 f"reaching {stop}; traced [{start}, {start + writer.count})")
            return EXIT_USAGE
        if failure is not None:
            status, message = failure
            _err(f"{message}; the trace has positions [{start}, {start + writer.count})")
            return status
        seconds = time.monotonic() - began
        if not args.quiet:
            end = timeline.source.end
            note = f"; the recording ends there ({end.reason})" if stop == last and end is not None else ""
            stop = min(stop, start + writer.count)
            _err(f"traced {writer.count} instructions [{start}, {stop}) in {seconds:.2f} s, "
                 f"{writer.count / seconds / 1e3 if seconds else 0:.0f}k instructions/s{note}")
    return 0
