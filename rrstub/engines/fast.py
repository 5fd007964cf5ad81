"""The fast engine (``FastEngine``): runs the guest freely.

The position counts deterministic exits (port I/O, MMIO, hlt, interrupt
window) and landmarks.
When something must be delivered while the guest computes without exiting,
the recorder kicks the vCPU and logs a landmark: the general registers and
a hash of the pages dirtied since the last marker.  Replay finds the
landmark with a hardware breakpoint at its RIP (``rr_run_to_regs``) plus the
page hash.  Interrupts are injected only at deterministic exits (at a
landmark the engine asks for an interrupt window, whose exit is
deterministic), so injection never depends on where a kick landed.

A kick that lands inside a tight loop (race's spin loop, a busy-wait)
would make replay pass the landmark's rip once per iteration, each pass a
breakpoint hit of tens of microseconds; the recorder first lets the guest
run on to the loop's exit (``_relocate``, ``TightLoops``), which is passed
once per run of the loop.  This costs the recording one breakpoint run per
such kick and cut race's replay from about 3.8x to 1.5x of its recording
time here.  The recorder never single-steps: after a single step this
host's KVM sometimes ran an injected interrupt's handler into the
following hlt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from rrstub import events as ev
from rrstub.engines.base import (AF_ONLY, LANDMARK_BUDGET_FACTOR, LANDMARK_BUDGET_MIN_NS, NEVER, RELOCATE_NS, RELOCATE_TRIES,
                                 RETRY_NS, Engine,
                                 EngineError, Outcome, describe_entry, describe_exit_code, exit_code, place,
                                 regs_tuple)
from vmm import paging
from vmm.clock import SampledClock
from vmm.kvm import Hlt, Interrupted, IoIn, IoOut, IrqWindowOpen, REG_NAMES, _check, host_monotonic_ns
from vmm.machine import GuestTimeout
from vmm._native import ffi, lib


EFER_LMA = 1 << 10
LOOP_SCAN = 24                      # instructions decoded after a kick's rip to find its loop's branch
LOOP_BYTES = 15 * LOOP_SCAN
LEAVES = frozenset(("call", "ret", "retf", "iret", "iretd", "iretq", "hlt", "int", "int1", "int3", "into",
                    "syscall", "sysret", "sysretq", "sysenter", "sysexit", "ud2", "ljmp", "lcall"))


@dataclass
class Loop:
    exit: int           # where control falls through when the loop ends (after its backward branch)
    timeouts: int = 0   # runs in a row that outlasted RELOCATE_NS (a host hiccup, or a wait)

    @property
    def outlasts(self) -> bool:
        """Left alone: it outlasted RELOCATE_NS RELOCATE_TRIES times in a row (it waits for an interrupt)."""
        return self.timeouts >= RELOCATE_TRIES


class TightLoops:
    """The fast recorder's knowledge of the loops its kicks land in, by rip.

    A rip is in a tight loop when the straight line of code after it (no
    call, return or other jump first) reaches a conditional branch back to
    at or before it; capstone decodes it once per rip.
    """

    def __init__(self):
        self._at: dict[int, Optional[Loop]] = {}
        self._by_exit: dict[int, Loop] = {}
        self._disassembler = None

    def around(self, rip: int, read: Callable[[int, int], bytes]) -> Optional[Loop]:
        if rip not in self._at:
            loop = self._find(rip, read(rip, LOOP_BYTES))
            self._at[rip] = None if loop is None else self._by_exit.setdefault(loop.exit, loop)
        return self._at[rip]

    def _find(self, rip: int, code: bytes) -> Optional[Loop]:
        if self._disassembler is None:
            from capstone import CS_ARCH_X86, CS_MODE_64, Cs
            self._disassembler = Cs(CS_ARCH_X86, CS_MODE_64)
        for n, (address, size, mnemonic, operand) in enumerate(self._disassembler.disasm_lite(code, rip)):
            if n == LOOP_SCAN or mnemonic in LEAVES or mnemonic.startswith("ret"):
                return None
            if mnemonic.startswith(("j", "loop")):
                try:
                    target = int(operand, 16)
                except ValueError:
                    return None         # an indirect jump
                if mnemonic != "jmp" and target <= rip and rip - target <= 4096:
                    return Loop(address + size)
                return None
        return None


# Said with every divergence of a fast replay: what it most likely is, and what to do.
HOST_READS = ("The guest's state depends on something fast mode cannot replay on this host: "
              "at guest CPL0, rdtsc, rdtscp, rdrand, rdseed and cpuid run on the host CPU (Linux "
              "reads the TSC all the time, rdtsc the likely cause). Record such a guest with "
              "--mode exact, which emulates them")


class FastLog:
    """What replaying a fast log needs, whether the guest runs freely (``FastEngine``) or is
    stepped (``faststep.FastStepEngine``): clock values from the log at exits, landmarks as
    registers plus the hash of the pages written since the last recorded marker
    (``DirtyTracker.marked``), and the report of a landmark that cannot be found."""

    def divergence_words(self, what: str) -> str:
        if HOST_READS in what or AF_ONLY in what:
            return what
        return f"{what}. {HOST_READS}"

    def settle(self) -> None:
        vcpu = self.machine.vcpu
        _check(lib.rr_settle(vcpu.fd, vcpu._run, vcpu._exit), "KVM_RUN (settle)")

    def _sample(self) -> int:
        """A device read the clock while handling an exit."""
        if self.sink is not None:
            ns = self.host_virtual_ns()
            self.sink.emit(ev.ClockRead(self.position, ns))
            return ns
        e = self.source.peek()
        if not isinstance(e, ev.ClockRead) or e.pos != self.log_pos:
            self._diverged(f"the guest read the clock, and the recording has no clock value here "
                           f"(next recorded: {describe_entry(e)})")
        return self.source.pop().time_ns

    def guest_now(self) -> int:
        return self.clock.peek_ns()

    def set_time(self, ns: int, ps: Optional[int]) -> None:
        self.clock.set(ns)

    def run_due(self) -> None:
        if self.clock.fresh:
            self.clock.run_due()

    def _verify_marker(self, point: ev.Point) -> None:
        super()._verify_marker(point)
        tracker = self.markers.tracker
        tracker.collect()
        tracker.mark()              # a landmark's page hash covers what was written since here

    def _wanted(self, p: ev.Point):
        """``p``'s landmark registers as the struct kvm_regs the C searches compare."""
        want = self._want
        for name, value in zip(REG_NAMES, p.landmark):
            setattr(want, name, value)
        return want

    def _pages_match(self, p: ev.Point) -> bool:
        tracker = self.markers.tracker
        tracker.collect()
        return tracker.marked_digest(self.machine.mem) == p.landmark_digest

    def _recorded_ns(self, p: ev.Point) -> int:
        """The guest time the recorder took from here to landmark ``p``."""
        return max(0, p.time_ns - self.clock.peek_ns()) if p.time_ns is not None else 0

    def _landmark_budget(self, p: ev.Point) -> int:
        """Host time a landmark search may take: ``LANDMARK_BUDGET_*`` of the guest time it took to record."""
        return max(LANDMARK_BUDGET_MIN_NS, LANDMARK_BUDGET_FACTOR * self._recorded_ns(p))

    def _landmark_lost(self, p: ev.Point, budget_ns: int, hits: int) -> None:
        """The landmark search ran out of its budget: report what differs, as a divergence."""
        self._diverged(self._landmark_lost_words(p, budget_ns, hits))

    def _landmark_lost_words(self, p: ev.Point, budget_ns: int, hits: int) -> str:
        rip = p.landmark[REG_NAMES.index("rip")]
        if hits:
            differs = [f"{n} recorded {want:#x}, replay {getattr(self._last_hit, n):#x}"
                       for n, want in zip(REG_NAMES, p.landmark) if getattr(self._last_hit, n) != want]
            seen = (f"the guest reached rip {rip:#x} {hits} times, never with the recorded registers "
                    f"(at the last: {'; '.join(differs[:8]) or 'all equal, but not the pages written'})")
        else:
            seen = f"the guest never reached rip {rip:#x}"
        return (f"replay did not find the landmark at {place(self.log_unit, p.pos)} within {budget_ns / 1e9:.1f} s: "
                f"{seen}. {HOST_READS}")


class FastEngine(FastLog, Engine):
    mode = "fast"
    unit = "exit"

    def __init__(self, *args, cpl3_landmarks: bool = False, **kw):
        super().__init__(*args, **kw)
        self.clock = SampledClock(self._sample)
        self.cpl3_landmarks = cpl3_landmarks
        self.landmarks = 0
        self.delayed = 0
        self.breakpoint_hits = ffi.new("uint64_t *")
        self._last_hit = ffi.new("struct kvm_regs *")     # the registers of the last landmark miss
        self._retry_at = 0
        self._want = ffi.new("struct kvm_regs *")
        # Recording: moving landmarks out of tight loops (``_relocate``).
        self.relocated = 0
        self._marker_clock_waits = False    # recording from power-on, before the first exit
        self._loops = TightLoops()
        self._rip = ffi.new("uint64_t *")

    def engine_state(self) -> dict:
        return {"position": self.position, "clock_ns": self.clock.peek_ns(),
                "guest_ns": self.clock.peek_ns(), "next_check_ns": self.next_check_ns}

    def load_engine_state(self, s: dict) -> None:
        self.clock.set(s["clock_ns"])
        self.clock.new_point()
        self.next_check_ns = s["next_check_ns"]

    # -- time -----------------------------------------------------------------------
    def sample_time(self) -> tuple[int, None]:
        return self.host_virtual_ns(), None

    def time_wanted(self) -> bool:
        return not self.clock.fresh and self._time_due()

    def after_point(self, landmark: bool) -> None:
        """Inject where it is deterministic: KVM delivers at the very next entry.

        When the guest cannot take the interrupt now, the recorder asks for an
        interrupt window; on this host the window exit does not come at a fixed
        instruction, so it becomes a landmark (``_window_open``) and replay,
        which never asks for windows, reaches it by breakpoint instead.
        """
        self.machine.inject(window=self.sink is not None)
        self.clock.new_point()

    def initial_marker(self, origin: str = "start", resume: Optional[str] = None) -> tuple[bytes, dict]:
        """Recording: as ``Engine.initial_marker``; a recording from power-on starts its marker clock at the
        guest's first exit.

        Fast guest time is host time, and the first KVM_RUN of a machine can
        take longer than ``--marker-every`` on a loaded host (KVM builds its
        page tables then): a marker due meanwhile would be taken before the
        guest's first instruction, at the same state as marker 0.
        """
        blob, meta = super().initial_marker(origin, resume)
        if self.position == 0:
            self._marker_clock_waits = True
            self.next_marker_ns = NEVER
        return blob, meta

    def _start_marker_clock(self) -> None:
        self._marker_clock_waits = False
        self._schedule_next_marker()

    def _time_due(self) -> bool:
        deadline = self.machine.clock.next_deadline()
        return deadline is not None and self.host_virtual_ns() >= deadline

    # -- the loop -------------------------------------------------------------------
    def run(self) -> Outcome:
        m = self.machine
        vcpu = m.vcpu
        vcpu.attach_kicks()
        try:
            while m._stop is None:
                if self.until is not None and self.position >= self.until:
                    return Outcome("until", 0, self.position, self.clock.peek_ns())
                if self.source is not None:
                    if self.position >= self.source.stop_position:
                        return self._log_end()
                    nxt = self.source.peek()
                    if (isinstance(nxt, ev.Point) and nxt.landmark is not None
                            and nxt.pos == self.position + 1):
                        self._reach(nxt)
                        continue
                exit = vcpu.run(self._host_deadline())
                if isinstance(exit, Interrupted):
                    if self.sink is None:
                        continue
                    # A guest that computes without exiting logs nothing: the
                    # deadline kick is where its buffered events reach the file.
                    self.sink.maybe_flush(self.position)
                    exit = self._kicked()
                    if exit is None:
                        continue
                if isinstance(exit, IrqWindowOpen):
                    if self.sink is None:
                        raise EngineError("interrupt window exit during replay (replay never asks for one)")
                    self._landmark(window=True)
                    continue
                self.position += 1
                m.exits += 1
                m.recent_exits.append(exit)
                if self._marker_clock_waits:
                    self._start_marker_clock()
                if isinstance(exit, Hlt):
                    self.halt()
                    continue
                self.handle_exit(exit)
                if m._stop is not None:
                    break
                if self.on_io_done is not None:
                    self.on_io_done(exit)
                if isinstance(exit, (IoOut, IoIn)):
                    self.exit_check(exit)
                self.point(True)
        finally:
            vcpu.detach_kicks()
        reason, status = m._stop
        return Outcome(reason, status, self.position, self.clock.peek_ns())

    def _host_deadline(self) -> int:
        if self.sink is None:
            return 0
        deadline = self.machine.clock.next_deadline()
        if self.next_marker_ns < NEVER:
            deadline = self.next_marker_ns if deadline is None else min(deadline, self.next_marker_ns)
        host = 0 if deadline is None else self.host_origin + deadline
        if self._retry_at:
            host = max(host, self._retry_at)
            self._retry_at = 0
        if self.end_host_ns is not None:
            host = self.end_host_ns if host == 0 else min(host, self.end_host_ns)
        flush = self.sink.flush_due_ns()
        return flush if host == 0 else min(host, flush)


    def _kicked(self):
        """Recording: the vCPU was kicked; make a landmark if anything is due.

        Returns the deterministic exit that came first while the landmark was
        being moved out of a loop (``_relocate``), to be handled as any exit;
        otherwise None.
        """
        m = self.machine
        if self.end_host_ns is not None and host_monotonic_ns() >= self.end_host_ns:
            raise GuestTimeout("timeout")
        due = (self._time_due() or self.marker_requested
               or self.host_virtual_ns() >= self.next_marker_ns
               or m.input_waiting())
        if not due:
            return None
        if not m.vcpu.event_in_flight():
            exit = self._relocate()
            if exit is not None:
                return exit
        self._landmark(window=False)
        return None

    def _relocate(self):
        """Recording: a kick that stopped the guest in a tight loop moves on to the loop's exit.

        Replay stops at a landmark with a breakpoint at its rip and pays for
        every earlier pass over it (``rr_run_to_regs``): an instruction of an
        8-iteration spin loop is passed eight times per call, the loop's exit
        once.  The loop is found by decoding the code after the kick's rip
        (``TightLoops``); the guest then runs natively to the loop's exit
        with a breakpoint there, for at most ``RELOCATE_NS`` (a loop that
        waits for an interrupt does not end by itself: after
        ``RELOCATE_TRIES`` such runs in a row it is not tried again).  Returns a deterministic exit that came first, or None.
        """
        vcpu = self.machine.vcpu
        _check(lib.rr_current_rip(vcpu.fd, self._rip), "KVM_GET_REGS")
        loop = self._loops.around(self._rip[0], self._read_code)
        if loop is None or loop.outlasts:
            return None
        deadline = host_monotonic_ns() + RELOCATE_NS
        r = lib.rr_relocate_to(vcpu.fd, vcpu._run, loop.exit, deadline, vcpu._exit)
        _check(r, "KVM_RUN (moving a landmark out of a loop)")
        if r == lib.RR_RELOCATE_EXIT:
            return vcpu.last_exit()
        if r == lib.RR_RELOCATE_FOREIGN:
            raise EngineError(f"the guest raised a debug exception of its own at {vcpu._exit.debug_pc:#x} "
                              "(TF or its debug registers): rrstub cannot record a guest that debugs itself")
        if r == lib.RR_RELOCATE_TIMEOUT:
            if host_monotonic_ns() >= deadline:     # not a kick from the host (input, a marker, Ctrl-C)
                loop.timeouts += 1
        else:
            loop.timeouts = 0
            self.relocated += 1
        self._sync_vcpu_flags()
        return None

    def _read_code(self, rip: int, length: int) -> bytes:
        """Up to ``length`` bytes of 64-bit code at ``rip`` (fewer before an unmapped page; b"" if not 64-bit)."""
        s = self.machine.vcpu.get_sregs()
        if not (s.efer & EFER_LMA and s.cs.l) or s.cs.selector & 3:
            return b""
        for n in (length, 4096 - (rip & 4095)):
            try:
                return paging.read_virtual(self.machine.mem, s.cr0, s.cr3, s.cr4, s.efer, rip, n)
            except paging.PageFault:
                continue
        return b""

    def _landmark(self, window: bool) -> None:
        """Recording: log the registers and dirty-page hash here, then deliver what is due."""
        m = self.machine
        if not self.cpl3_landmarks and m.vcpu.cpl() == 3:
            self._delay()   # replay could not stop here: deliver at the next chance
            return
        if m.vcpu.event_in_flight():
            # The kick came between KVM_INTERRUPT (or an exception) and its
            # delivery: replay would deliver before reaching these registers.
            self._delay()
            return
        regs = m.vcpu.get_regs()
        self.markers.tracker.collect()
        digest = self.markers.tracker.digest(m.mem)
        self.position += 1
        self.landmarks += 1
        self.point(False, sync=not window, landmark=(regs_tuple(regs), digest))

    def _delay(self) -> None:
        """Let the guest run a little before the next try (a due deadline would kick at once)."""
        self.delayed += 1
        self._retry_at = host_monotonic_ns() + RETRY_NS

    def _reach(self, p: ev.Point) -> None:
        """Replay: run to the landmark ``p`` and deliver it.

        The search is bounded: a guest whose state depends on something fast
        mode cannot replay (rdtsc or rdrand at CPL0 on a host that does not
        trap them) hits the landmark's rip forever with other registers.
        The budget grows with the guest time the recorder spent getting
        there (``LANDMARK_BUDGET_*``), so a correct replay never meets it.
        """
        vcpu = self.machine.vcpu
        want = self._wanted(p)
        budget_ns = self._landmark_budget(p)
        give_up = host_monotonic_ns() + budget_ns
        hits_before = self.breakpoint_hits[0]
        step_over = 0
        while True:
            r = lib.rr_run_to_regs(vcpu.fd, vcpu._run, want, step_over, give_up, self.breakpoint_hits,
                                   self._last_hit, vcpu._exit)
            _check(r, "KVM_RUN (landmark search)")
            if r == lib.RR_LANDMARK_MATCH:
                self._sync_vcpu_flags()
                if self._pages_match(p):
                    break
                step_over = 1
            elif r == lib.RR_LANDMARK_KICK:
                if host_monotonic_ns() >= give_up:
                    self._landmark_lost(p, budget_ns, self.breakpoint_hits[0] - hits_before)
                step_over = 0
            else:
                exit = vcpu.last_exit()
                self._diverged(f"replay reached a {describe_exit_code(exit_code(exit))} "
                               f"({type(exit).__name__}) before the recorded landmark at rip "
                               f"{p.landmark[16]:#x}")
        self.position = p.pos
        self.landmarks += 1
        self.last_match = p.pos
        self.point(False, recorded=self.source.pop())
