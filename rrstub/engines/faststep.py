"""Replaying a fast recording instruction by instruction (``FastStepEngine``).

A fast recording's log is keyed by exit numbers: the recorder ran the
guest freely and nothing on this host counts instructions (no PMU).  This
engine replays the same log while single-stepping every instruction in C
like the exact engine, so its positions are instruction counts from the
recording's first marker, the unit exact recordings use, and everything
built on the exact engine's stepping works on fast recordings too: the
timeline's checkpoints, breakpoints and watchpoints, reverse execution,
trace, VAssert evaluation, ``--until``/``--from``/``--go-live``.

Where the free-running replay stops at a landmark with a hardware
breakpoint, this one stops at it inside the step loop: ``rr_step`` compares
rip at every boundary, then every general register (``ctl.landmark``), and
Python compares the hash of the pages written since the last recorded
marker (``DirtyTracker.marked``, which the timeline's own checkpoints do
not reset).  Landings (``rr_step``) make an interrupt's delivery and an
iretq's return boundaries of their own, so a kick that stopped the
recorder at a handler's first instruction is a boundary here too.

Everything else follows ``FastEngine``'s replay: clock values come from
the log at exits, interrupts are injected only at logged points with the
interrupt flags of the exit itself (an instruction completed by a step
can end an `sti` shadow the recorder still saw), state checks compare the
registers before the I/O instruction completes, and rdtsc, cpuid, rdmsr
and rdrand run on the host CPU, as they did when the recording was made.

Why stepping and not (exit, steps) positions refined on demand: measured
on race (benchmarks/debug_bench.py), stepping costs about 9 us per
instruction here against about 2.2 us for the free-running replay (4x),
and a position that names an exit plus a step count is only comparable
with another once both are refined, which is the same stepping, later:
every reverse step, `monitor when`, watchpoint and checkpoint needs it.
A first `continue` through a fast recording therefore runs at the
stepping rate; later ones through code replay has seen skip ahead by the
timeline's visited summaries.  Plain ``rrstub replay`` of a fast
recording still runs freely (``FastEngine``), and a recording's markers
and end are counted in instructions when a stepping replay passes them.
"""
from __future__ import annotations

from typing import Callable, Optional

from rrstub import events as ev
from rrstub.engines.base import NEVER, EngineError, Outcome, describe_entry, describe_exit_code, exit_code, place
from rrstub.engines.exact import ExactEngine
from rrstub.engines.fast import FastEngine, FastLog
from rrstub.markers import MarkerState
from vmm import x86special
from vmm.clock import SampledClock
from vmm.kvm import Debug, IoIn, IoOut, REG_NAMES, _check, host_monotonic_ns
from vmm.machine import GuestTimeout
from vmm._native import ffi, lib

RIP = REG_NAMES.index("rip")


class FastStepEngine(FastLog, ExactEngine):
    """Replays a fast recording's log, one instruction per position."""
    mode = "fast"
    unit = "instruction"
    log_unit = "exit"
    inject_anywhere = False         # only at logged points, as the recorder did

    def __init__(self, *args, **kw):
        kw.pop("ps_per_instr", None)
        super().__init__(*args, **kw)
        if self.source is None:
            raise ValueError("FastStepEngine only replays; fast recordings are made by FastEngine")
        self.clock = SampledClock(self._sample)
        self.landings = True        # a landmark can be at a handler's first instruction
        self.exits = 0              # the log's position: deterministic exits and landmarks
        self.landmarks = 0
        self.last_marker = 0        # the last recorded marker whose point replay delivered
        self.until_marker: Optional[int] = None   # stop right after the point of this recorded marker
        self.on_recorded_marker: Optional[Callable[[int, int], None]] = None   # (index, instruction)
        self._want = ffi.new("struct kvm_regs *")
        self._last_hit = ffi.new("struct kvm_regs *")
        self.ctl.landmark_last = self._last_hit
        self._armed: Optional[ev.Point] = None
        self._give_up = 0
        self._budget = 0
        self._hits_before = 0

    @property
    def log_pos(self) -> int:
        return self.exits

    def settle(self) -> None:
        # The interrupt flags of the last exit are the ones its point injects by (``_exit``).
        ex = self.machine.vcpu._exit
        flags = ex.if_flag, ex.ready_for_injection
        super().settle()
        ex.if_flag, ex.ready_for_injection = flags

    # -- state ------------------------------------------------------------------------
    def engine_state(self) -> dict:
        tracker = self.markers.tracker
        tracker.collect()
        return {"position": self.exits, "clock_ns": self.clock.peek_ns(), "guest_ns": self.clock.peek_ns(),
                "next_check_ns": self.next_check_ns, "icount": self.ctl.icount, "marked": tracker.marked,
                "last_marker": self.last_marker}

    def load_engine_state(self, s: dict) -> None:
        """A recorded marker (``FastEngine.engine_state``) or one of ours; a recorded one starts at 0 instructions."""
        self.clock.rewind(s["clock_ns"])
        self.next_check_ns = s["next_check_ns"]
        self.exits = s["position"]
        self.ctl.icount = s.get("icount", 0)
        self.markers.tracker.marked = s.get("marked", 0)
        self.last_marker = s.get("last_marker", 0)
        self._disarm()

    def restore(self, state: MarkerState, chain: Optional[list[bytes]] = None) -> None:
        self.markers.restore(state, chain)
        self.load_engine_state(state.engine)
        self.position = self.last_match = self.ctl.icount
        self.resume_delivery()

    def _verify_marker(self, point: ev.Point) -> None:
        super()._verify_marker(point)
        self.last_marker = point.marker
        if self.on_recorded_marker is not None:
            self.on_recorded_marker(point.marker, self.ctl.icount)
        if point.marker == self.until_marker:
            self.until = self.ctl.icount

    # -- points -----------------------------------------------------------------------
    def after_point(self, landmark: bool) -> None:
        super().after_point(landmark)
        self.clock.new_point()

    def _limit(self) -> int:
        return NEVER                # points come at exits and landmarks, not at instruction counts

    def run(self) -> Outcome:
        self._disarm()              # a search's budget counts from here (not while a debugger waited)
        return super().run()

    def _stop_here(self) -> Optional[Outcome]:
        c = self.ctl
        if self.exits >= self.source.stop_position:
            return self._log_end()
        if self.until is not None and c.icount >= self.until:
            return Outcome("until", 0, c.icount, self.guest_now())
        nxt = self.source.peek()
        if nxt is not None and not isinstance(nxt, ev.End) and nxt.pos <= self.exits:
            if isinstance(nxt, ev.Point) and nxt.landmark is None and nxt.pos == self.exits:
                # Restored where a recorded marker was taken in a halt: its other wake-ups come first.
                self.halt()
                return self._stop_here()
            self._diverged(f"replay went past the recording's {describe_entry(nxt)} "
                           f"(replay is at {place(self.log_unit, self.exits)})")
        if isinstance(nxt, ev.Point) and nxt.landmark is not None and nxt.pos == self.exits + 1:
            if self._armed is not nxt:
                self._arm(nxt)
        else:
            self._disarm()
        return None

    def _arm(self, p: ev.Point) -> None:
        c = self.ctl
        c.landmark = self._wanted(p)
        c.landmark_la = (self.cs_base + p.landmark[RIP]) & 0xFFFFFFFFFFFFFFFF
        self._armed = p
        self._budget = self._landmark_budget(p)
        self._give_up = host_monotonic_ns() + self._budget
        self._hits_before = c.landmark_hits

    def _disarm(self) -> None:
        self._armed = None
        self.ctl.landmark = ffi.NULL

    def _host_deadline(self) -> int:
        return self._give_up if self._armed is not None else 0

    def _deadline(self) -> None:
        """The landmark search's host-time budget passed: is the replay lost, or only slow?

        Stepping runs far slower than the recorder did (a thousand times on a
        host that runs kernel code natively), so time alone proves nothing.
        The free-running search (``FastEngine._reach``) answers within its own
        budget, run on from a copy of the state that is put back afterwards:
        if it finds the landmark, stepping goes on; if not, the replay is lost.
        """
        p = self._armed
        if p is None:
            raise GuestTimeout("timeout")
        lost = self._search_freely(p)
        if lost is not None:
            self._diverged(lost)
        self._give_up = host_monotonic_ns() + self._budget

    def _search_freely(self, p: ev.Point) -> Optional[str]:
        """Run freely from here to landmark ``p`` and come back: None if found, else what went wrong."""
        m = self.machine
        vcpu = m.vcpu
        tracker = self.markers.tracker
        tracker.collect()
        saved = vcpu.get_state(), bytes(m.mem.view), bytes(ffi.buffer(vcpu._exit))
        flags = vcpu.if_flag, vcpu.ready_for_injection
        budget_ns = self._landmark_budget(p)
        give_up = host_monotonic_ns() + budget_ns
        hits = ffi.new("uint64_t *")
        step_over, found = 0, None
        written: set[int] = set()       # pages the search wrote: KVM's log is read, not kept
        try:
            while found is None:
                r = lib.rr_run_to_regs(vcpu.fd, vcpu._run, self._wanted(p), step_over, give_up, hits,
                                       self._last_hit, vcpu._exit)
                _check(r, "KVM_RUN (landmark search)")
                if r == lib.RR_LANDMARK_MATCH:
                    written.update(tracker.take_new())
                    if tracker.marked_digest(m.mem, written) == p.landmark_digest:
                        found = ""
                    step_over = 1
                elif r == lib.RR_LANDMARK_KICK:
                    if host_monotonic_ns() >= give_up:
                        found = self._landmark_lost_words(p, budget_ns, hits[0])
                    step_over = 0
                else:
                    exit = vcpu.last_exit()
                    found = (f"the guest reaches a {describe_exit_code(exit_code(exit))} before the recorded "
                             f"landmark at {place(self.log_unit, p.pos)} (rip {p.landmark[RIP]:#x})")
        finally:
            state, memory, exit_bytes = saved
            m.mem.view[:] = memory
            tracker.take_new()          # what the search wrote is gone again
            vcpu.set_state(state)
            _check(lib.rr_settle(vcpu.fd, vcpu._run, vcpu._exit), "KVM_RUN (settle after a landmark search)")
            ffi.memmove(vcpu._exit, exit_bytes, len(exit_bytes))
            vcpu.if_flag, vcpu.ready_for_injection = flags
            self.enable_stepping()
            c = self.ctl
            c.landmark = self._wanted(p)
        return found or None

    def _at_landmark(self) -> None:
        c, p = self.ctl, self._armed
        if not self._pages_match(p):
            c.flags |= lib.RR_STEP_SKIP_LANDMARK      # the registers recur; the memory is not yet there
            return
        self.source.pop()
        self._disarm()
        self.exits = p.pos
        self.landmarks += 1
        self.last_match = c.icount
        self.point(False, recorded=p)

    def _before_landmark(self, what: str) -> None:
        """An exit or hlt came where the recording has its landmark next: a divergence."""
        if self._armed is not None:
            self._diverged(f"replay reached a {what} before the recorded landmark at "
                           f"{place(self.log_unit, self._armed.pos)} (rip {self._armed.landmark[RIP]:#x})")

    # -- what the step loop hands over ---------------------------------------------------
    def _special(self) -> None:
        c = self.ctl
        sp = x86special.decode(bytes(ffi.buffer(c.insn, c.insn_len)), self.long_mode)
        if sp is None:
            c.flags |= lib.RR_STEP_NO_CHECK_ONCE
            return
        K = x86special.Kind
        if sp.kind in (K.CR_WRITE, K.WRMSR):
            self._step_one()
            self._load_paging()
        elif sp.kind == K.HLT and c.deliver_vector:
            # An interrupt injected here is delivered first (KVM delivers at entry, as it did
            # while recording); hlt comes after its handler returns.
            c.flags |= lib.RR_STEP_NO_CHECK_ONCE
        elif sp.kind == K.HLT:
            self._before_landmark("hlt")
            self._emulate_hlt(sp)
        else:
            self._step_one()        # rdtsc, cpuid, rdmsr, rdrand...: on the host CPU, as recorded

    def _halting(self) -> None:
        # The recorder saw a hlt exit: one log position, then the wake-ups logged there.
        self.exits += 1
        self.machine.exits += 1

    def _exit(self) -> None:
        m = self.machine
        vcpu = m.vcpu
        ex = vcpu._exit
        exit = vcpu.last_exit()
        m.exits += 1
        m.recent_exits.append(exit)
        if isinstance(exit, Debug):
            raise EngineError(f"unexpected debug exit at {exit.pc:#x} while single-stepping")
        self._before_landmark(describe_exit_code(exit_code(exit)))
        self.exits += 1
        self.handle_exit(exit)
        if m._stop is not None:
            return
        if isinstance(exit, (IoOut, IoIn)):
            self.exit_check(exit)       # the registers the recorder saw: before the instruction completes
        flags = ex.if_flag, ex.ready_for_injection
        self._one_instruction(lib.RR_STEP_COMPLETE, "KVM_RUN (completing I/O)")
        ex.if_flag, ex.ready_for_injection = flags
        if self.on_io_done is not None:
            self.on_io_done(exit)
        self.point(True)

    def live(self) -> FastEngine:
        """A fast recorder that runs the guest on from exactly here (go-live; ``start_recording`` next)."""
        e = FastEngine(source=self.source, marker_every_ns=self.marker_every_ns)
        e.machine, e.markers = self.machine, self.markers
        e.clock = self.clock
        self.clock.sampled_by(e._sample)
        e.position = e.last_match = self.exits
        e.next_check_ns = self.next_check_ns
        e.on_io_done = self.on_io_done
        return e

    def _random(self) -> int:
        raise EngineError("a fast recording has no random numbers in its log")

