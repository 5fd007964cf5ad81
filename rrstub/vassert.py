"""VAssert: replay-time assertions (`rrstub replay REC --vassert`).

A guest marks a check with ``VASSERT(cond)`` (examples/include/rrstub_vassert.h):
hypercall ``HC_VASSERT`` with RBX = the address of a static
``struct rrstub_vassert_site``.  While recording (and in a plain replay) the
call answers 0 and the guest skips the condition: one exit, nothing else.

During a --vassert replay, ``VAssertChecker`` is installed on the engine and
the machine.  The hypercall still answers 0 (the machine stays exactly as it
was recorded) and marks a check as pending; the engine then calls
``on_io_done`` once the ``out`` has completed, between instructions and
before anything is injected.  There the checker

1. saves what the evaluation may change: the vCPU state, the device states,
   the guest's ``vcpu._exit`` flags, and the physical pages of the stack
   around RSP (``STACK_BELOW`` bytes below it, ``STACK_ABOVE`` above); it folds
   KVM's dirty log into the engine's dirty tracker first, so that the pages
   the evaluation writes can be told apart;
2. sets RAX = HC_VASSERT_CHECK and runs the guest freely (no single-step, no
   interrupt injected) until its ``HC_VASSERT_DONE`` exit, at most
   ``EVAL_TIMEOUT_NS`` of host time.  The condition is single-stepped
   (``_step``), as the replay steps everything: a fast recording's --vassert
   replay steps its log too (``FastStepEngine``).  Any other exit (port I/O, MMIO, hlt,
   another hypercall, a triple fault, ...) ends the evaluation as "not
   evaluated" with the reason; the exit is not given to the devices;
3. finishes the pending exit without running guest code, reads which pages
   the evaluation wrote (``DirtyTracker.take_new``: not added to the
   tracker's set, so markers and fast-mode landmark digests see what a plain
   replay sees), puts the saved pages back, then the vCPU state (RAX = 0
   again, as recorded), the guest-debug setting of the engine, the devices
   if they changed, and the exit flags the engine reads next.

A page written outside the saved ones cannot be put back: ``VAssertError``
stops the replay (the rest of it could no longer match the recording).

The result is a ``VAssertReport``: one ``Evaluation`` per check, grouped by
site, optionally streamed as JSON lines.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass, field
from typing import Callable, Optional, TextIO

from rrstub.engines import EngineError, ExactEngine, place
from vmm import paging, x86special
from vmm.devices.hypercall import (HC_VASSERT, HC_VASSERT_CHECK, HC_VASSERT_DONE, HYPERCALL_PORT,
                                   NAMES)
from vmm.kvm import (Debug, FailEntry, Hlt, InternalError, IoIn, IoOut, IrqWindowOpen,
                     MmioRead, MmioWrite, Regs, Shutdown, SystemEvent, _check, host_monotonic_ns)
from vmm.memory import PAGE_SIZE
from vmm._native import ffi, lib

EXIT_VASSERT_FAILED = 67          # `rrstub replay --vassert`: an assertion failed or could not be evaluated
EVAL_TIMEOUT_NS = 250_000_000     # host time one evaluation may take (exact engine: ~35k stepped instructions)
STACK_BELOW = 16 << 10            # saved below RSP: the condition's own pushes and calls
STACK_ABOVE = 8 << 10             # saved above RSP: spills into the frame of the code around the VASSERT
NEVER_STEPS = (1 << 63) - 1
SITE_FLAG_EQ = 1                  # RRSTUB_VASSERT_EQ: RSI/RDI of the DONE call are the compared values
SHOW_FAILURES = 10                # the CLI lists this many failures one by one

_SITE = struct.Struct("<QQQII")   # file, expr, func, line, flags
_STRING_MAX = 512


class VAssertError(EngineError):
    """An evaluation changed the machine in a way that cannot be undone: the replay stops."""


@dataclass(frozen=True, slots=True)
class Site:
    """A ``struct rrstub_vassert_site``, read from guest memory."""
    address: int
    file: str
    line: int
    func: str
    expr: str
    flags: int = 0

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def describe(self) -> str:
        return f"{self.where} {self.func}: {self.expr}"


@dataclass(frozen=True, slots=True)
class Evaluation:
    index: int               # 0, 1, ... in replay order
    position: int
    unit: str                # "instruction" (exact) or "exit" (fast)
    guest_ns: int
    site: Site
    result: str              # "pass", "fail" or "not-evaluated"
    reason: str = ""         # why not evaluated
    values: Optional[tuple[int, int]] = None   # VASSERT_EQ: the two values

    @property
    def failed(self) -> bool:
        return self.result != "pass"

    def describe(self) -> str:
        text = f"{place(self.unit, self.position)}: {self.site.describe()}"
        if self.result == "not-evaluated":
            return f"{text}: not evaluated: {self.reason}"
        text += " failed" if self.result == "fail" else " passed"
        if self.values is not None:
            names = self.site.expr.split(" == ")
            a, b = names if len(names) == 2 else ("left", "right")
            text += f" ({a} = {self.values[0]}, {b} = {self.values[1]})"
        return text

    def as_dict(self) -> dict:
        d = {"index": self.index, "position": self.position, "unit": self.unit,
             "guest_ns": self.guest_ns, "file": self.site.file, "line": self.site.line,
             "func": self.site.func, "expr": self.site.expr, "site": f"{self.site.address:#x}",
             "result": self.result}
        if self.reason:
            d["reason"] = self.reason
        if self.values is not None:
            d["left"], d["right"] = self.values
        return d


@dataclass
class SiteStats:
    site: Site
    evaluated: int = 0
    passed: int = 0
    failed: int = 0
    not_evaluated: int = 0
    first_failure: Optional[Evaluation] = None
    last_failure: Optional[Evaluation] = None


@dataclass
class VAssertReport:
    """Every evaluation of a --vassert replay: counts, per-site groups, the first failures."""
    jsonl: Optional[TextIO] = None        # every evaluation as one JSON line
    keep_failures: int = SHOW_FAILURES
    evaluated: int = 0
    passed: int = 0
    failed: int = 0
    not_evaluated: int = 0
    sites: dict = field(default_factory=dict)       # Site -> SiteStats, in first-seen order
    failures: list = field(default_factory=list)    # the first keep_failures failing Evaluations
    stopped: Optional[str] = None                   # a VAssertError's message

    def add(self, e: Evaluation) -> None:
        self.evaluated += 1
        stats = self.sites.get(e.site)
        if stats is None:
            stats = self.sites[e.site] = SiteStats(e.site)
        stats.evaluated += 1
        if e.result == "pass":
            self.passed += 1
            stats.passed += 1
        else:
            if e.result == "fail":
                self.failed += 1
                stats.failed += 1
            else:
                self.not_evaluated += 1
                stats.not_evaluated += 1
            stats.first_failure = stats.first_failure or e
            stats.last_failure = e
            if len(self.failures) < self.keep_failures:
                self.failures.append(e)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(e.as_dict()) + "\n")

    @property
    def ok(self) -> bool:
        """No assertion failed, none was left unevaluated, and the replay was not stopped by one."""
        return self.failed == 0 and self.not_evaluated == 0 and self.stopped is None

    def format(self) -> str:
        lines = [f"vassert: {self.evaluated} assertion{'s' if self.evaluated != 1 else ''} evaluated: "
                 f"{self.passed} passed, {self.failed} failed"
                 + (f", {self.not_evaluated} could not be evaluated" if self.not_evaluated else "")]
        for s in self.sites.values():
            if not (s.failed or s.not_evaluated):
                continue
            first, last = s.first_failure, s.last_failure
            counts = [f"{s.failed} of {s.evaluated} failed"] if s.failed else []
            counts += [f"{s.not_evaluated} of {s.evaluated} not evaluated"] if s.not_evaluated else []
            lines.append(f"  {s.site.describe()}: {', '.join(counts)}; first at "
                         f"{place(first.unit, first.position)}, last at {place(last.unit, last.position)}")
        if self.failures:
            total = self.failed + self.not_evaluated
            lines.append(f"failures ({'all ' + str(total) if total == len(self.failures) else f'first {len(self.failures)} of {total}'}):")
            lines += [f"  {e.describe()}" for e in self.failures]
        if self.stopped:
            lines.append(f"stopped: {self.stopped}")
        return "\n".join(lines)


def _signed(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def describe_exit(exit) -> str:
    """What an exit other than HC_VASSERT_DONE says about the condition's code."""
    if isinstance(exit, IoOut):
        if exit.port == HYPERCALL_PORT:
            fn = int.from_bytes(exit.data[:4], "little")
            return (f"it made hypercall {fn} ({NAMES.get(fn, 'unknown')}); a VASSERT inside a VASSERT's "
                    "condition is not supported")
        return (f"it wrote to I/O port {exit.port:#x} (a condition must not do I/O; a fault in it "
                "also ends this way if the guest's exception handler prints)")
    if isinstance(exit, IoIn):
        return f"it read I/O port {exit.port:#x} (I/O is a side effect)"
    if isinstance(exit, (MmioRead, MmioWrite)):
        return f"it accessed {exit.addr:#x}, which is not RAM (MMIO)"
    if isinstance(exit, Hlt):
        return "it executed hlt"
    if isinstance(exit, Shutdown):
        return "the guest triple-faulted (an exception in the condition, with no usable IDT)"
    if isinstance(exit, InternalError):
        return f"KVM could not run it (internal error, suberror {exit.suberror})"
    if isinstance(exit, FailEntry):
        return "KVM could not enter the guest"
    if isinstance(exit, IrqWindowOpen):
        return "an interrupt window exit came"
    if isinstance(exit, (Debug, SystemEvent)):
        return f"an unexpected {type(exit).__name__} exit came"
    return f"an unexpected exit came ({exit!r})"


class VAssertChecker:
    """Evaluates each VASSERT during a replay and restores the machine afterwards."""

    def __init__(self, report: Optional[VAssertReport] = None,
                 timeout_ns: int = EVAL_TIMEOUT_NS):
        self.report = report if report is not None else VAssertReport()
        self.timeout_ns = timeout_ns
        self.engine = None
        self.machine = None
        self._pending: Optional[int] = None
        self._sites: dict[tuple[int, int], Site] = {}
        self._previous_io_done: Optional[Callable[[object], None]] = None
        self.flag_mismatches = 0     # exit flags KVM reported differently after a restore (should stay 0)

    # -- wiring -------------------------------------------------------------------
    def install(self, engine) -> None:
        """After ``engine.attach(machine)``: serve HC_VASSERT and evaluate after its exit.

        ``engine`` steps every instruction (``ExactEngine``, or ``FastStepEngine`` for a fast
        recording), as the evaluation does.
        """
        if not isinstance(engine, ExactEngine):
            raise EngineError("VAssert evaluation needs a replay that steps every instruction")
        self.engine = engine
        self.machine = engine.machine
        self.machine.hypercalls.handlers[HC_VASSERT] = self._on_vassert
        self._previous_io_done = engine.on_io_done
        engine.on_io_done = self._on_io_done

    def _on_vassert(self, regs: Regs) -> int:
        # Answer what the recording got (0: skip), so the machine stays as recorded;
        # the evaluation gives the guest HC_VASSERT_CHECK once the `out` has completed.
        self._pending = regs.rbx
        return 0

    def _on_io_done(self, exit) -> None:
        if self._previous_io_done is not None:
            self._previous_io_done(exit)
        site, self._pending = self._pending, None
        if site is not None and self.machine._stop is None:
            self.evaluate(site)

    # -- one evaluation -----------------------------------------------------------
    def evaluate(self, site_addr: int) -> Evaluation:
        engine, m = self.engine, self.machine
        vcpu = m.vcpu
        # What the engine reads next from the last exit (a fast log's stepper: the
        # flags of the I/O exit itself, as its recorder saw them).
        exit_flags = (vcpu.if_flag, vcpu.ready_for_injection)
        exit_bytes = bytes(ffi.buffer(vcpu._exit))
        kvm_flags = (vcpu._exit.if_flag, vcpu._exit.ready_for_injection)
        engine.settle()                  # finish a pending exit without running guest code
        tracker = engine.markers.tracker
        tracker.collect()                # what the guest wrote so far stays in the tracker's set
        state = vcpu.get_state()
        devices = m.device_states()
        sregs = state.sregs
        site = self._site(site_addr, sregs)
        saved = self._save_stack(state.regs.rsp, sregs)
        position, guest_ns = engine.position, engine.guest_now()

        vcpu.set_regs(dataclasses.replace(state.regs, rax=HC_VASSERT_CHECK))
        result, reason, values = self._step(site)

        # Finish a pending exit (an IN would write RAX later), then undo everything.
        _check(lib.rr_settle(vcpu.fd, vcpu._run, vcpu._exit), "KVM_RUN (settle after a VAssert)")
        written = tracker.take_new()
        view = m.mem.view
        for p, data in saved.items():
            view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = data
        vcpu.set_state(state)
        if m.device_states() != devices:
            m.restore_devices(devices)
        # Refresh kvm_run's interrupt flags (the exact engine's C loop reads them) for the restored state.
        _check(lib.rr_settle(vcpu.fd, vcpu._run, vcpu._exit), "KVM_RUN (settle after a VAssert)")
        if (vcpu._exit.if_flag, vcpu._exit.ready_for_injection) != kvm_flags:
            self.flag_mismatches += 1
        ffi.memmove(vcpu._exit, exit_bytes, len(exit_bytes))
        vcpu.if_flag, vcpu.ready_for_injection = exit_flags

        e = Evaluation(self.report.evaluated, position, engine.unit, guest_ns, site, result, reason, values)
        outside = [p for p in written if p not in saved]
        if outside:
            what = ", ".join(f"{p * PAGE_SIZE:#x}{self._page_role(p, sregs)}" for p in outside[:4])
            more = f" and {len(outside) - 4} more" if len(outside) > 4 else ""
            message = (f"the VASSERT at {site.where} ({site.func}: {site.expr}) at "
                       f"{place(engine.unit, position)} wrote guest memory outside its stack (physical "
                       f"page{'s' if len(outside) > 1 else ''} {what}{more}), which rrstub cannot undo; "
                       "the replay stops here. A VASSERT condition must not write memory (rrstub saves "
                       f"and restores only the pages from RSP-{STACK_BELOW >> 10} KiB to "
                       f"RSP+{STACK_ABOVE >> 10} KiB).")
            self.report.add(Evaluation(e.index, position, engine.unit, guest_ns, site, "not-evaluated",
                                       "it wrote memory outside its stack", values))
            self.report.stopped = message
            raise VAssertError(message)
        self.report.add(e)
        return e

    def _done(self, exit, site: Site) -> Optional[tuple[str, str, Optional[tuple[int, int]]]]:
        """The result if ``exit`` is the evaluation's HC_VASSERT_DONE, else None."""
        if not (isinstance(exit, IoOut) and exit.port == HYPERCALL_PORT and exit.size == 4):
            return None
        regs = self.machine.vcpu.get_regs()
        if regs.rax & 0xFFFFFFFF != HC_VASSERT_DONE:
            return None
        if regs.rbx != site.address:
            return "not-evaluated", f"it reported the end of another VASSERT (site {regs.rbx:#x})", None
        values = (_signed(regs.rsi), _signed(regs.rdi)) if site.flags & SITE_FLAG_EQ else None
        return ("pass" if regs.rcx == 1 else "fail"), "", values

    def _timed_out(self) -> tuple[str, str, None]:
        return ("not-evaluated", f"it did not finish within {self.timeout_ns / 1e6:g} ms of host time",
                None)

    def _not_evaluated(self, why: str) -> tuple[str, str, None]:
        return "not-evaluated", f"{why} at rip {self.machine.vcpu.get_regs().rip:#x}", None

    def _step(self, site: Site) -> tuple[str, str, Optional[tuple[int, int]]]:
        """Single-step the condition, as the replay steps everything.

        The guest-debug setup stays as the engine has it (switching single-step
        off and on again would change how KVM carries RFLAGS.TF, and with it
        what an interrupt frame pushed later holds).  A private step control
        leaves the engine's own (instruction count, rip, flags) untouched.
        """
        vcpu, engine = self.machine.vcpu, self.engine
        own = engine.ctl
        c = ffi.new("struct rr_step_ctl *")
        c.rip, c.cr0, c.cr3, c.cr4, c.efer = own.rip, own.cr0, own.cr3, own.cr4, own.efer
        c.mem, c.mem_size, c.long_mode = own.mem, own.mem_size, own.long_mode
        c.stop_icount = NEVER_STEPS
        c.host_deadline = host_monotonic_ns() + self.timeout_ns
        while True:
            _check(lib.rr_step(vcpu.fd, vcpu._run, c, vcpu._exit), "KVM_RUN (single-step, VAssert)")
            reason = c.reason
            if reason == lib.RR_STEP_EXIT:
                exit = vcpu.last_exit()
                done = self._done(exit, site)
                return done if done is not None else self._not_evaluated(describe_exit(exit))
            if reason == lib.RR_STEP_SPECIAL:
                sp = x86special.decode(bytes(ffi.buffer(c.insn, c.insn_len)), bool(c.long_mode))
                K = x86special.Kind
                if sp is not None and sp.kind == K.HLT:
                    return self._not_evaluated("it executed hlt")
                if sp is not None and sp.kind in (K.CR_WRITE, K.WRMSR):
                    return self._not_evaluated(f"it changes the machine ({sp.kind.name.lower().replace('_', ' ')})")
                c.flags |= lib.RR_STEP_NO_CHECK_ONCE    # reads host time/randomness/CPUID: harmless here
                continue
            if reason in (lib.RR_STEP_DEADLINE, lib.RR_STEP_LIMIT):
                return self._timed_out()
            if reason == lib.RR_STEP_KICK:
                if host_monotonic_ns() >= c.host_deadline:
                    return self._timed_out()
                continue
            if reason == lib.RR_STEP_NOFETCH:
                return self._not_evaluated("its paging mode cannot be stepped")
            return self._not_evaluated(f"single-stepping stopped (reason {reason})")

    # -- guest memory ---------------------------------------------------------------
    def _save_stack(self, rsp: int, sregs) -> dict[int, bytes]:
        """Copies of the physical pages behind [rsp - STACK_BELOW, rsp + STACK_ABOVE)."""
        m = self.machine
        view = m.mem.view
        saved: dict[int, bytes] = {}
        start = (rsp - STACK_BELOW) & ~(PAGE_SIZE - 1)
        for vaddr in range(start, rsp + STACK_ABOVE, PAGE_SIZE):
            try:
                paddr = paging.virt_to_phys(m.mem, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, vaddr)
            except paging.PageFault:
                continue
            p = paddr // PAGE_SIZE
            if paddr < m.mem.size and p not in saved:
                saved[p] = bytes(view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE])
        return saved

    def _read(self, vaddr: int, length: int, sregs) -> bytes:
        return paging.read_virtual(self.machine.mem, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer,
                                   vaddr, length)

    def _string(self, vaddr: int, sregs) -> str:
        if vaddr == 0:
            return "?"
        out = b""
        try:
            while len(out) < _STRING_MAX:
                chunk = self._read(vaddr, PAGE_SIZE - (vaddr & (PAGE_SIZE - 1)), sregs)
                end = chunk.find(b"\0")
                if end >= 0:
                    out += chunk[:end]
                    break
                out += chunk
                vaddr += len(chunk)
        except paging.PageFault:
            if not out:
                return f"<unreadable {vaddr:#x}>"
        return out[:_STRING_MAX].decode("utf-8", "replace")

    def _site(self, addr: int, sregs) -> Site:
        key = (sregs.cr3, addr)
        site = self._sites.get(key)
        if site is None:
            try:
                file, expr, func, line, flags = _SITE.unpack(self._read(addr, _SITE.size, sregs))
                site = Site(addr, self._string(file, sregs), line, self._string(func, sregs),
                            self._string(expr, sregs), flags)
            except paging.PageFault:
                site = Site(addr, f"<site {addr:#x} unreadable>", 0, "?", "?")
            self._sites[key] = site
        return site

    def _page_role(self, page: int, sregs) -> str:
        """' (a page table)' when ``page`` holds one of the guest's page tables (accessed/dirty bits)."""
        mem = self.machine.mem
        if not sregs.cr0 & paging.CR0_PG:
            return ""
        tables, frontier = set(), [(sregs.cr3 & paging.ADDR_MASK, 4)]
        while frontier and len(tables) < 4096:
            table, level = frontier.pop()
            if table + PAGE_SIZE > mem.size or table // PAGE_SIZE in tables:
                continue
            tables.add(table // PAGE_SIZE)
            if level == 1:
                continue
            for entry in struct.unpack_from("<512Q", mem.view, table):
                if entry & paging.PTE_PRESENT and not (level in (3, 2) and entry & paging.PTE_HUGE):
                    frontier.append((entry & paging.ADDR_MASK, level - 1))
        if page in tables:
            return (" (a page table: the condition touched memory the guest had not used, and the "
                    "CPU set accessed/dirty bits)")
        return ""
