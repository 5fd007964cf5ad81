"""The exact engine (``ExactEngine``): single-steps every instruction.

The steps are made in C (native/rrnative.c ``rr_step``); the position is
the instruction count.
Every instruction is its own position, and so is every interrupt
delivery: KVM's single step would run an interrupt's delivery together
with the handler's first instruction, and an iretq together with the
instruction it returns to, so ``rr_step`` stops such steps at their
*landing* with an execution breakpoint (recordings whose config has
``positions`` >= ``EVENT_POSITIONS``; older ones replay as they were
recorded, with those pairs sharing a position).
Time is ``IcountClock``: a function of the instruction count, re-based at
logged sync points (every ``SYNC_INTERVAL_NS`` of guest time, and when a
halted guest wakes).  rdtsc/rdtscp/rdrand/rdseed/rdpid/cpuid/rdmsr(TSC) are
emulated before they execute (vmm.x86special, fixed table vmm.cpuid); hlt is
performed by the engine.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from rrstub import events as ev
from rrstub.engines.base import (EVENT_POSITIONS, NEVER, NOMINAL_PS_PER_INSTR, RFLAGS_IF, SYNC_CHECK_EVERY,
                                 SYNC_INTERVAL_NS, Engine, EngineError, Outcome, describe_entry, regs_digest)
from rrstub.markers import MarkerState
from vmm import x86special
from vmm.clock import IcountClock
from vmm.kvm import Debug, InternalError, IoIn, IoOut, Regs, _check, host_monotonic_ns
from vmm.machine import GuestTimeout, Machine
from vmm._native import ffi, lib


class ExactEngine(Engine):
    mode = "exact"
    unit = "instruction"

    def __init__(self, *args, ps_per_instr: int = NOMINAL_PS_PER_INSTR, **kw):
        super().__init__(*args, **kw)
        self.ctl = ffi.new("struct rr_step_ctl *")
        self.clock = IcountClock(lambda: self.ctl.icount, ps_per_instr)
        self._syncs = 0
        self._rate_icount = 0
        self._rate_host = host_monotonic_ns()
        self._next_sync_ns = SYNC_INTERVAL_NS
        self.cs_base = 0
        self.long_mode = True
        self.steps_emulated = 0
        self.nominal_ps = ps_per_instr
        self._busy_host_ns = 0
        self._busy_instructions = 0
        self._idle_from: Optional[tuple[int, int]] = None
        # Replay timeline: on_boundary() runs between instructions once icount reaches boundary_at.
        self.boundary_at = NEVER
        self.on_boundary: Callable[[], None] = lambda: None
        self.inject_pending_at = -1     # where an interrupt was last injected (delivered by the next step)
        recorded = self.source.recording.config.get("positions", 1) if self.source is not None else None
        self.landings = recorded is None or recorded >= EVENT_POSITIONS
        self._missed_seen = 0
        # The index's recorder (rrstub.index.capture): drains ctl.trace when rr_step says it is full.
        self.on_trace_full: Callable[[], None] = self._no_trace

    def attach(self, machine: Machine) -> None:
        super().attach(machine)
        c = self.ctl
        c.mem = ffi.cast("uint8_t *", machine.mem.host_addr)
        c.mem_size = machine.mem.size

    def settle(self) -> None:
        pass  # the exact engine only stops between instructions

    def engine_state(self) -> dict:
        c = self.clock
        return {"icount": self.ctl.icount, "base_ns": c.base_ns, "base_icount": c.base_icount,
                "ps_per_instr": c.ps_per_instr, "guest_ns": c.now_ns(), "next_check_ns": self.next_check_ns,
                "syncs": self._syncs}

    def load_engine_state(self, s: dict) -> None:
        self.ctl.icount = s["icount"]
        self.clock.base_ns, self.clock.base_icount = s["base_ns"], s["base_icount"]
        self.clock.ps_per_instr = s["ps_per_instr"]
        self.next_check_ns = s["next_check_ns"]
        self._syncs = s["syncs"]

    @property
    def icount(self) -> int:
        return self.ctl.icount

    def _no_trace(self) -> None:
        raise EngineError("rr_step filled a trace that nothing drains (ctl.trace set without on_trace_full)")

    def _load_paging(self) -> None:
        sregs = self.machine.vcpu.get_sregs()
        regs = self.machine.vcpu.get_regs()
        c = self.ctl
        c.cr0, c.cr3, c.cr4, c.efer = sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer
        c.idt_base, c.idt_limit = sregs.idt_base, sregs.idt_limit
        self.long_mode = bool(sregs.efer & (1 << 10)) and bool(sregs.cs.l)
        c.long_mode = 1 if self.long_mode else 0
        self.cs_base = sregs.cs.base
        c.rip = (self.cs_base + regs.rip) & 0xFFFFFFFFFFFFFFFF
        if c.trace != ffi.NULL:
            c.trace.fs_base, c.trace.gs_base = sregs.fs.base, sregs.gs.base   # wrmsr may have moved them

    # -- time -----------------------------------------------------------------------
    def sample_time(self) -> tuple[int, int]:
        """A sync point: the virtual time now, and the instruction time until the next one.

        The virtual CPU runs at the nominal rate on average, whatever the cost
        of stepping; each interval's rate follows how fast the host stepped in
        it relative to the average, so host timing moves interrupts the way it
        does in live runs, without making the guest see the recorder's
        slowdown.  A halted guest's idle time passes at host speed.
        """
        now = host_monotonic_ns()
        if self._idle_from is not None:
            ns = self.idle_now_ns()
            self._idle_from = None
            self._rate_icount, self._rate_host = self.ctl.icount, now
            return ns, self.clock.ps_per_instr
        done = self.ctl.icount - self._rate_icount
        ps = self.clock.ps_per_instr
        if done >= 1000:
            spent = now - self._rate_host
            self._busy_host_ns += spent
            self._busy_instructions += done
            average = self._busy_host_ns / self._busy_instructions
            ps = int(self.nominal_ps * (spent / done) / average)
            ps = min(self.nominal_ps * 4, max(self.nominal_ps // 4, ps))
        self._rate_icount, self._rate_host = self.ctl.icount, now
        return self.clock.now_ns(), ps

    def prepare_recording(self) -> None:
        self.landings = True            # what a new recording's config says (session.new_config)
        now = host_monotonic_ns()
        self._rate_icount, self._rate_host = self.ctl.icount, now
        self._busy_host_ns = self._busy_instructions = 0
        self._idle_from = None
        self._next_sync_ns = self.clock.now_ns()

    def hide_pause(self, ns: int) -> None:
        super().hide_pause(ns)
        self._rate_host += ns           # nor does it count as time spent stepping

    def idle_now_ns(self) -> int:
        start_ns, start_host = self._idle_from
        return start_ns + host_monotonic_ns() - start_host

    def set_time(self, ns: int, ps: Optional[int]) -> None:
        self.clock.sync(ns, ps or self.clock.ps_per_instr)
        self._syncs += 1

    def guest_now(self) -> int:
        return self.clock.now_ns()

    def run_due(self) -> None:
        self.clock.run_due()

    def sync_check(self):
        if self._syncs % SYNC_CHECK_EVERY:
            return None
        regs = self.machine.vcpu.get_regs()
        return regs.rip, regs_digest(regs)

    def after_point(self, landmark: bool) -> None:
        self._sync_vcpu_flags()
        injections = self.machine.injections
        self.machine.inject(window=False)
        if self.machine.injections != injections:
            # The next step delivers the interrupt: the instruction at rip
            # does not run now, so a breakpoint there is not hit now.
            self.ctl.flags |= lib.RR_STEP_SKIP_BREAK
            self.inject_pending_at = self.ctl.icount
            if self.landings:
                self.ctl.deliver_vector = self.machine.last_vector + 1

    def restore(self, state: MarkerState, chain: Optional[list[bytes]] = None) -> None:
        super().restore(state, chain)
        self.resume_delivery()

    def resume_delivery(self) -> None:
        """After a restore: the next step delivers the interrupt KVM holds, if any, as its own step."""
        vector = self.machine.vcpu.interrupt_in_flight() if self.landings else None
        self.ctl.deliver_vector = 0 if vector is None else vector + 1

    # -- the loop -------------------------------------------------------------------
    def enable_stepping(self) -> None:
        """Turn on KVM single-stepping (no breakpoints armed yet) without letting the guest see TF.

        KVM_SET_GUEST_DEBUG sets RFLAGS.TF for real while RIP is where it was
        set, so an interrupt delivered by the first step (or a pushf there)
        would save TF in guest memory, and whether it does would depend on
        where the run was last started.  ``rr_step_arm`` (and every re-arm in
        ``rr_step``) sets it with RIP at a non-canonical address no guest code
        can be at, then writes the registers back; this host steps in its
        instruction emulator, which does not need TF.
        """
        _check(lib.rr_step_arm(self.machine.vcpu.fd, self.ctl), "KVM_SET_GUEST_DEBUG")

    def run(self) -> Outcome:
        m, c = self.machine, self.ctl
        vcpu = m.vcpu
        self.enable_stepping()
        self._load_paging()
        self._rate_icount, self._rate_host = c.icount, host_monotonic_ns()
        vcpu.attach_kicks()
        stalls = 0
        try:
            while m._stop is None:
                self.position = c.icount
                if c.icount >= self.boundary_at:
                    self.on_boundary()
                end = self._limit()
                stop = self._stop_here()
                if stop is not None:
                    return stop
                c.stop_icount = min(end, self.boundary_at, NEVER if self.until is None else self.until)
                c.host_deadline = self._host_deadline()
                if m._intr and self.inject_anywhere:
                    c.flags |= lib.RR_STEP_STOP_IF_OPEN
                else:
                    c.flags &= ~lib.RR_STEP_STOP_IF_OPEN
                before = c.icount
                self._step("KVM_RUN (single-step)")
                reason = c.reason
                if reason == lib.RR_STEP_LIMIT and c.icount < end:
                    continue    # stopped for --until or a boundary, not for a point
                if reason == lib.RR_STEP_LIMIT or reason == lib.RR_STEP_IF_OPEN:
                    sync = self.sink is not None and self.clock.now_ns() >= self._next_sync_ns
                    if sync:
                        self._next_sync_ns = self.clock.now_ns() + SYNC_INTERVAL_NS
                    delivered = self.point(True, sync=sync)
                    if c.icount == before and not delivered and reason == lib.RR_STEP_LIMIT:
                        stalls += 1
                        if stalls > 1000:
                            raise EngineError(f"the exact engine made no progress at instruction {c.icount}")
                    else:
                        stalls = 0
                elif reason == lib.RR_STEP_LANDMARK:
                    self._at_landmark()
                elif reason == lib.RR_STEP_SPECIAL:
                    self._special()
                elif reason == lib.RR_STEP_EXIT:
                    self._exit()
                elif reason == lib.RR_STEP_BREAK:
                    return Outcome("break", 0, c.icount, self.guest_now())
                elif reason == lib.RR_STEP_WATCH:
                    return Outcome("watch", c.hit, c.icount, self.guest_now())
                elif reason == lib.RR_STEP_DEADLINE:
                    self._deadline()
                elif reason == lib.RR_STEP_KICK:
                    if self.sink is not None:
                        self.point(False)
                elif reason == lib.RR_STEP_NOFETCH:
                    raise EngineError(
                        "the exact engine reads guest instructions only with paging off or 4-level "
                        "long-mode paging; this guest uses another paging mode (32-bit, PAE without "
                        "long mode, or 5-level). Record it with --mode fast.")
                else:
                    raise EngineError(f"unknown step result {reason}")
        finally:
            vcpu.detach_kicks()
            vcpu.set_guest_debug(0)
        reason, status = m._stop
        return Outcome(reason, status, c.icount, self.guest_now())

    # Interrupts are injected at the first boundary where the guest can take
    # them (the fast-log stepper injects only where its recording did).
    inject_anywhere = True

    def _stop_here(self) -> Optional[Outcome]:
        """Before a step: the outcome if the run ends at this boundary (log end, --until)."""
        c = self.ctl
        if self.source is not None and c.icount >= self.source.stop_position:
            return self._log_end()
        if self.until is not None and c.icount >= self.until:
            return Outcome("until", 0, c.icount, self.guest_now())
        return None

    def _host_deadline(self) -> int:
        return self.end_host_ns or 0

    def _deadline(self) -> None:
        """rr_step passed ``_host_deadline``."""
        raise GuestTimeout("timeout")

    def _at_landmark(self) -> None:
        raise EngineError(f"the exact engine stopped at a landmark at instruction {self.ctl.icount}, "
                          "and it arms none")

    def _limit(self) -> int:
        deadline = self.machine.clock.next_deadline()
        end = NEVER if deadline is None else self.clock.icount_at(deadline)
        if self.sink is not None:
            end = min(end, self.clock.icount_at(self._next_sync_ns))
        if self.source is not None:
            end = min(end, self.source.next_point_position(), self.source.stop_position)
        return end


    def _advance(self, regs: Regs) -> None:
        self.machine.vcpu.set_regs(regs)
        self.ctl.flags &= ~lib.RR_STEP_SKIP_BREAK
        self.ctl.icount += 1
        self.ctl.rip = (self.cs_base + regs.rip) & 0xFFFFFFFFFFFFFFFF
        self.position = self.ctl.icount
        self.steps_emulated += 1

    def _step(self, what: str) -> None:
        """One rr_step call with the limits already in ``ctl``."""
        vcpu, c = self.machine.vcpu, self.ctl
        if self.landings:
            c.flags |= lib.RR_STEP_LANDINGS
        else:
            c.flags &= ~lib.RR_STEP_LANDINGS
        while True:
            _check(lib.rr_step(vcpu.fd, vcpu._run, c, vcpu._exit), what)
            if c.reason != lib.RR_STEP_TRACE_FULL:
                break
            self.on_trace_full()     # the buffers are drained: the step it stopped before runs now
        self._sync_vcpu_flags()
        self.position = c.icount
        if c.landings_missed != self._missed_seen:
            self._missed_seen = c.landings_missed
            if self._missed_seen == 1:
                self.machine.warn(
                    f"KVM ran past an event's landing at instruction {c.icount} (rip {c.rip:#x}): "
                    "that position joins two instructions; breakpoints and watchpoints there may be "
                    "missed (please report this host)")

    def _one_instruction(self, flag: int, what: str) -> None:
        """Finish or execute exactly one instruction (``flag``: NO_CHECK_ONCE or COMPLETE)."""
        c = self.ctl
        c.flags = (c.flags | flag) & ~lib.RR_STEP_STOP_IF_OPEN
        c.stop_icount = c.icount + 1
        self._step(what)

    def _step_one(self) -> None:
        """Execute the next instruction natively (it was looked at already)."""
        self._one_instruction(lib.RR_STEP_NO_CHECK_ONCE, "KVM_RUN (single-step)")
        if self.ctl.reason == lib.RR_STEP_EXIT:
            self._exit()

    def _special(self) -> None:
        c = self.ctl
        code = bytes(ffi.buffer(c.insn, c.insn_len))
        sp = x86special.decode(code, self.long_mode)
        if sp is None:
            c.flags |= lib.RR_STEP_NO_CHECK_ONCE
            return
        K = x86special.Kind
        vcpu = self.machine.vcpu
        if sp.kind in (K.CR_WRITE, K.WRMSR):
            self._step_one()
            self._load_paging()
            return
        if sp.kind == K.HLT:
            self._emulate_hlt(sp)
            return
        regs = vcpu.get_regs()
        ctx = x86special.EmulationContext(tsc=self.clock.now_ns(), random64=self._random)
        if not x86special.emulate(sp, regs, ctx):
            self._step_one()
            return
        self._advance(regs)

    def _emulate_hlt(self, sp) -> None:
        """hlt: the engine performs it (``halt``: points until an interrupt is due)."""
        regs = self.machine.vcpu.get_regs()
        regs.rip = (regs.rip + sp.length) & 0xFFFFFFFFFFFFFFFF
        self._advance(regs)
        self._end_interrupt_shadow(regs)
        self._halting()
        self.halt()

    def _halting(self) -> None:
        """Between a hlt and its wake-ups: what the log counts there (nothing, in an exact log)."""

    def _end_interrupt_shadow(self, regs: Regs) -> None:
        """After an emulated hlt: the `sti` shadow it stood in is over, as after a real one.

        KVM still holds the shadow (we skipped the instruction it covered), and
        would refuse the interrupt that wakes the guest at the next instruction.
        """
        vcpu = self.machine.vcpu
        in_flight = vcpu.end_interrupt_shadow()
        vcpu._exit.if_flag = 1 if regs.rflags & RFLAGS_IF else 0
        vcpu._exit.ready_for_injection = 1 if regs.rflags & RFLAGS_IF and not in_flight else 0
        self._sync_vcpu_flags()

    def _random(self) -> int:
        if self.sink is not None:
            value = int.from_bytes(os.urandom(8), "little")
            self.sink.emit(ev.Random(self.ctl.icount, value))
            return value
        e = self.source.peek()
        if not isinstance(e, ev.Random) or e.pos != self.ctl.icount:
            self._diverged(f"the guest asked for a random number the recording does not have "
                           f"(next recorded: {describe_entry(e)})")
        return self.source.pop().value

    def _emulated(self, done, exit) -> None:
        """KVM could not run the instruction and ``vmm.emulate`` did: it was one step.

        An exception it raises (int3's #BP) is delivered by the next step,
        which stops at the handler like an interrupt's delivery.
        """
        if done is None:
            self.machine.handlers[InternalError](exit)      # the clear stop naming the instruction
            return
        regs = self.machine.vcpu.get_regs()
        c = self.ctl
        c.flags &= ~lib.RR_STEP_SKIP_BREAK
        c.icount += 1
        c.rip = (self.cs_base + regs.rip) & 0xFFFFFFFFFFFFFFFF
        self.position = c.icount
        self.steps_emulated += 1
        if done.exception is not None and self.landings:
            c.deliver_vector = done.exception[0] + 1

    def before_idle(self) -> None:
        self._idle_from = (self.clock.now_ns(), host_monotonic_ns())

    def _exit(self) -> None:
        m = self.machine
        exit = m.vcpu.last_exit()
        m.exits += 1
        m.recent_exits.append(exit)
        if isinstance(exit, Debug):
            raise EngineError(f"unexpected debug exit at {exit.pc:#x} while single-stepping")
        if isinstance(exit, InternalError) and exit.is_emulation_failure:
            self._emulated(m.emulate_failed(), exit)
            return
        self.handle_exit(exit)
        if m._stop is not None:
            return
        # Finish the instruction now, so every point sees a whole instruction.
        self._one_instruction(lib.RR_STEP_COMPLETE, "KVM_RUN (completing I/O)")
        if self.on_io_done is not None:
            self.on_io_done(exit)
        if isinstance(exit, (IoOut, IoIn)):
            self.exit_check(exit)
        self.point(True)
