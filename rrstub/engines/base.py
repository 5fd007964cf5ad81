"""What both engines share: the engine contract and the names around it.

``Engine`` is what both engines do at points (deliver time, input and
markers; log them when recording, apply and verify them when replaying),
plus state checks, pacing (--speed), halts and waiting for the host.  Also
here: the module-level constants, ``Outcome``, ``Divergence`` and
``EngineError``, the exit codes of state checks and the register digests.

Points where the recorder logged nothing but replay would not stop (a kick
with nothing due) change nothing: they neither fire timers nor inject.
"""
from __future__ import annotations

import hashlib
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from rrstub import events as ev
from rrstub.markers import MarkerKeeper, MarkerState, decode_marker
from vmm import snapshot
from vmm.kvm import (Hlt, IoIn, IoOut, IrqWindowOpen, MmioRead, MmioWrite, REG_NAMES, Regs, _check,
                     host_monotonic_ns)
from vmm.machine import GuestTimeout, Machine
from vmm._native import lib

if TYPE_CHECKING:
    from rrstub.engines.log import LogSink, LogSource

# Exact engine: a sync point every 1 ms of guest time.  Each one re-rates the
# virtual CPU by how fast the host stepped since the last, which is how host
# timing reaches where interrupts land; at 50 ms a short recording had no sync
# at all and every recording of a race came out the same.
SYNC_INTERVAL_NS = 1_000_000
NOMINAL_PS_PER_INSTR = 1000         # exact engine: the virtual CPU retires one instruction per ns
CHECK_INTERVAL_NS = 100_000_000     # a state check at the first I/O exit after this much guest time
SYNC_CHECK_EVERY = 16               # exact engine: a state check in every Nth sync point
# Buffered events reach the file at least this often (host time), so that a
# killed recorder loses at most this much; half the 2 s we promise, because a
# check comes only at a point, a fast engine's kick or an exact engine's
# flush boundary (FLUSH_CHECK_EVERY instructions).
FLUSH_INTERVAL_NS = 1_000_000_000
IDLE_FLUSH_INTERVAL_NS = 2_000_000_000  # with nothing buffered, still mark progress this often
FLUSH_CHECK_EVERY = 4096            # exact recording: look at the flush clock this often (instructions)
FLUSH_BYTES = 256 << 10
DEFAULT_MARKER_EVERY_NS = 1_000_000_000
NEVER = (1 << 63) - 1
RFLAGS_AF = 1 << 4
# Said of a marker mismatch in AF alone (a fast replay then gives no other likely cause).
AF_ONLY = ("(only AF, which shifts and logic operations leave undefined: this host's CPU or KVM "
           "emulator sets it differently from the recording's host, and a recording does not replay "
           "across such hosts)")
RFLAGS_IF = 0x200
RETRY_NS = 100_000                  # fast engine: a kick that could not make a landmark retries after this
RELOCATE_NS = 100_000               # fast recording: host time a loop may take to end before a landmark
RELOCATE_TRIES = 3                  # fast recording: loops that outlast RELOCATE_NS this often in a row are left alone
# Fast replay gives up on a landmark after the longer of these (host time):
LANDMARK_BUDGET_MIN_NS = 5_000_000_000
LANDMARK_BUDGET_FACTOR = 500        # x the guest time the recorder took to get there
GUEST_ENDS = ("exit", "reset", "poweroff", "crash", "hung")
# Config "positions": 2 = interrupt deliveries and event returns (iret,
# int n, syscall, sysret) are positions of their own (rr_step landings).
EVENT_POSITIONS = 2


def place(unit: str, position: int) -> str:
    """A position in words: 'instruction 1234' (exact) or 'exit #1234' (fast)."""
    return f"exit #{position}" if unit == "exit" else f"{unit} {position}"


class Divergence(Exception):
    """Replay no longer follows the recording; the message is the report."""

    def __init__(self, position: int, what: str, last_match: int, unit: str):
        self.position = position
        self.what = what
        self.last_match = last_match
        super().__init__(
            f"replay diverged from the recording at {place(unit, position)}: {what}\n"
            f"last position where replay matched the recording: {place(unit, last_match)}")


class EngineError(Exception):
    """The engine cannot go on for a reason that is neither the guest's nor a divergence."""


@dataclass(frozen=True, slots=True)
class Outcome:
    reason: str          # exit, reset, crash, hung, timeout, interrupted, until, end, incomplete
    status: int
    position: int
    guest_ns: int
    detail: str = ""


def exit_code(exit) -> int:
    """A small number naming a deterministic exit, for state checks."""
    if isinstance(exit, IoOut):
        return (1 << 16) | exit.port
    if isinstance(exit, IoIn):
        return (2 << 16) | exit.port
    if isinstance(exit, (MmioRead, MmioWrite)):
        return 3 << 16
    if isinstance(exit, Hlt):
        return 4 << 16
    if isinstance(exit, IrqWindowOpen):
        return 5 << 16
    return 6 << 16


def describe_exit_code(code: int) -> str:
    kind, port = code >> 16, code & 0xFFFF
    return {1: f"port write to {port:#x}", 2: f"port read from {port:#x}", 3: "MMIO access",
            4: "hlt", 5: "interrupt window", 6: "other exit"}.get(kind, f"exit code {code:#x}")


_REGS_STRUCT = struct.Struct(f"<{len(REG_NAMES)}Q")


def regs_tuple(regs: Regs) -> tuple[int, ...]:
    return tuple(getattr(regs, n) for n in REG_NAMES)


def regs_digest(regs: Regs) -> int:
    return int.from_bytes(hashlib.blake2b(_REGS_STRUCT.pack(*regs_tuple(regs)), digest_size=8).digest(),
                          "little")


# ---------------------------------------------------------------------------
# Engine base: what both engines do at points


class Engine:
    mode = ""
    unit = "position"

    def __init__(self, sink: Optional[LogSink] = None, source: Optional[LogSource] = None,
                 marker_every_ns: int = DEFAULT_MARKER_EVERY_NS, until: Optional[int] = None,
                 speed: Optional[float] = None, progress: Optional[Callable[[str], None]] = None):
        if (sink is None) == (source is None):
            raise ValueError("an engine either records (sink) or replays (source)")
        self.sink = sink
        self.source = source
        self.marker_every_ns = marker_every_ns
        self.next_marker_ns = marker_every_ns if marker_every_ns > 0 else NEVER
        self.marker_requested = False
        self.marker_name: tuple[Optional[str], str] = (None, "signal")
        self.point_landmark = False     # recording: the point being delivered is a landmark
        self.running = None             # replay: a threading.Event, cleared while paused
        self._pace_base: Optional[tuple[int, int]] = None
        self.until = until
        self.end_host_ns: Optional[int] = None   # recording: --timeout, as host CLOCK_MONOTONIC
        self.speed = speed
        self.position = 0
        self.last_match = 0
        self.next_check_ns = 0
        self.points = 0
        self.machine: Optional[Machine] = None
        self.markers: Optional[MarkerKeeper] = None
        self.marker_sink: Optional[Callable[[bytes, dict], None]] = None
        self.recording_markers: list = []
        self.verify_markers = True      # replay: compare each recorded marker's digest
        self.host_origin = host_monotonic_ns()
        self.progress = progress
        # Runs after each completed I/O exit, before its point: the guest is
        # between instructions, nothing is injected yet (hypercall services).
        self.on_io_done: Optional[Callable[[object], None]] = None
        # Recording: runs in every point after its deliveries, before its
        # interrupt injection (where a recording can start or stop).
        self.before_injection: Optional[Callable[[bool], None]] = None

    @property
    def log_pos(self) -> int:
        """The position in the log's own unit (where its entries are keyed): ``position``."""
        return self.position

    @property
    def log_unit(self) -> str:
        return self.unit

    # -- wiring ------------------------------------------------------------------
    def attach(self, machine: Machine) -> None:
        self.machine = machine
        self.markers = MarkerKeeper(machine, self.settle)

    def settle(self) -> None:
        raise NotImplementedError

    def engine_state(self) -> dict:
        raise NotImplementedError

    def load_engine_state(self, state: dict) -> None:
        raise NotImplementedError

    def host_virtual_ns(self) -> int:
        """Host time since the recording began, in the virtual clock's scale."""
        return host_monotonic_ns() - self.host_origin

    def idle_now_ns(self) -> int:
        """Recording, guest halted: the virtual time it is now."""
        return self.host_virtual_ns()

    # -- markers ---------------------------------------------------------------
    def initial_marker(self, origin: str = "start", resume: Optional[str] = None) -> tuple[bytes, dict]:
        """Recording: the full marker that starts a recording here, (blob, meta)."""
        blob, digest, meta = self.markers.capture(self.position, self.engine_state(), full=True,
                                                  name=origin, origin=origin, resume=resume)
        self._schedule_next_marker()
        return blob, meta

    def resume(self, how: Optional[str]) -> None:
        """After restoring a recording's first marker: finish what its ``resume`` meta says.

        Either way the interrupt flags are read from the restored vCPU first: a
        branch's first point is at its marker, before any step, and the live run
        injected there by the flags of its last real exit.  Stale flags here made
        replay inject an interrupt waiting at the branch point later than the
        live run did (and diverge at the branch's first marker).
        """
        if how not in (None, "after_point", "after_landmark"):
            raise EngineError(f"the first marker asks replay to resume {how!r}, which this rrstub "
                              "does not know; use a newer rrstub")
        vcpu = self.machine.vcpu
        _check(lib.rr_settle(vcpu.fd, vcpu._run, vcpu._exit), "KVM_RUN (settle)")
        self._sync_vcpu_flags()
        if how is not None:
            self.after_point(how == "after_landmark")

    def _sync_vcpu_flags(self) -> None:
        """Take the interrupt flags from the last KVM_RUN's exit."""
        ex = self.machine.vcpu._exit
        self.machine.vcpu.if_flag = bool(ex.if_flag)
        self.machine.vcpu.ready_for_injection = bool(ex.ready_for_injection)

    def request_marker(self, name: Optional[str] = None, origin: str = "signal") -> None:
        """Recording: take a marker at the next point (thread- and signal-safe: only sets fields)."""
        self.marker_name = (name, origin)
        self.marker_requested = True

    def start_recording(self, sink: "LogSink", marker_sink: Callable[[bytes, dict], None]) -> None:
        """Turn this engine into a recorder from where it stands: it records from now on.

        A replaying engine goes live (the rest of the run comes from the host,
        not the log); a recording engine switches to another log.  The caller
        takes the new recording's initial marker next (``initial_marker``).
        """
        self.source = None
        self.sink = sink
        self.marker_sink = marker_sink
        self.until = None
        self.speed = None
        self.host_origin = host_monotonic_ns() - self.guest_now()
        self.next_marker_ns = NEVER
        self.prepare_recording()

    def prepare_recording(self) -> None:
        """Engine-specific state a recorder needs when it starts mid-run."""

    def restore(self, state: MarkerState, chain: Optional[list[bytes]] = None) -> None:
        self.markers.restore(state, chain)
        self.load_engine_state(state.engine)
        self.position = state.position
        self.last_match = state.position

    def _marker_due(self) -> bool:
        return self.marker_requested or self.guest_now() >= self.next_marker_ns

    def guest_now(self) -> int:
        """Virtual time now, without consuming or logging a clock value."""
        raise NotImplementedError

    def time_wanted(self) -> bool:
        """Recording: should this point read the host clock even without a sync?"""
        return False

    def _take_marker(self) -> tuple[int, bytes]:
        name, origin = self.marker_name if self.marker_requested else (None, "auto")
        self.marker_requested = False
        self.marker_name = (None, "signal")
        index = self.markers.count
        began = host_monotonic_ns()
        blob, digest, meta = self.markers.capture(self.position, self.engine_state(), full=False,
                                                  name=name, origin=origin)
        self.sink.flush(self.position)   # the events before a marker come before it in the file
        count = self.markers.count
        self.marker_sink(blob, meta)
        # The sink may have rebased the recording onto a later marker
        # (rolling, quota), renumbering markers: the point names the new index.
        index -= count - self.markers.count
        self.hide_pause(host_monotonic_ns() - began)
        self._schedule_next_marker()
        return index, digest

    def hide_pause(self, ns: int) -> None:
        """Recording: host time the recorder spent with the guest stopped (a marker) is not guest time.

        Otherwise a guest whose clock follows the host would see every marker
        as a jump, and markers closer than their own cost would leave it no
        time to run between them.
        """
        self.host_origin += ns

    def _schedule_next_marker(self) -> None:
        if self.marker_every_ns > 0:
            now = self.guest_now()
            if self.next_marker_ns == NEVER:
                self.next_marker_ns = now + self.marker_every_ns
            while self.next_marker_ns <= now:
                self.next_marker_ns += self.marker_every_ns

    def _verify_marker(self, point: ev.Point) -> None:
        if not self.verify_markers:
            self.last_match = self.position
            return
        digest = self.markers.current_digest()
        if point.marker != self.markers.count:
            self._diverged(f"the recording has marker {point.marker} here, replay is at marker "
                           f"{self.markers.count}")
        if digest != point.marker_digest:
            self._diverged(f"machine state differs from marker {point.marker}: "
                           + self.explain_marker_mismatch(point.marker))
        self.markers.verified(digest)
        self._schedule_next_marker()
        self.last_match = self.position

    def explain_marker_mismatch(self, index: int) -> str:
        """Name the register, device or page that differs from a recorded marker."""
        rec = self.source.recording
        if index >= len(rec.markers):
            return "(the marker itself is not in the file)"
        saved = decode_marker(rec.payload(rec.markers[index]))
        m = self.machine
        regs, sregs = m.vcpu.get_regs(), m.vcpu.get_sregs()
        diffs = [f"register {n}: recorded {getattr(saved.vcpu.regs, n):#x}, replay {getattr(regs, n):#x}"
                 for n in REG_NAMES if getattr(saved.vcpu.regs, n) != getattr(regs, n)]
        for n in ("cr0", "cr2", "cr3", "cr4", "efer"):
            if getattr(saved.vcpu.sregs, n) != getattr(sregs, n):
                diffs.append(f"{n}: recorded {getattr(saved.vcpu.sregs, n):#x}, replay {getattr(sregs, n):#x}")
        if (saved.vcpu.regs.rflags ^ regs.rflags) == RFLAGS_AF and len(diffs) == 1:
            diffs[0] += f" {AF_ONLY}"
        devices = m.device_states()
        diffs += [f"device {name} state differs" for name in sorted(set(devices) | set(saved.devices))
                  if devices.get(name) != saved.devices.get(name)]
        if not diffs:
            scratch = bytearray(m.mem.view[:])
            snapshot.apply_pages(scratch, saved.pages)
            view = m.mem.view
            for p in range(m.mem.size // 4096):
                if view[p * 4096:(p + 1) * 4096] != scratch[p * 4096:(p + 1) * 4096]:
                    diffs.append(f"memory page at guest physical {p * 4096:#x} differs")
                    break
        if not diffs:
            diffs.append("the set of pages the guest wrote since the previous marker differs")
        return "; ".join(diffs[:6])

    # -- the point -------------------------------------------------------------
    def point(self, deterministic: bool, sync: bool = False, landmark: Optional[tuple] = None,
              recorded: Optional[ev.Point] = None) -> bool:
        """Deliver what is due at this position; returns whether anything was delivered.

        Recording: gathers time (``sync``), input and marker, applies them,
        logs the Point.  Replay: applies ``recorded`` (or the Point the log has
        here).
        """
        if self.sink is not None:
            time_ns = ps = None
            if sync or self.time_wanted():
                time_ns, ps = self.sample_time()
            data = self._take_input()
            marker = self._marker_due()
            check = self.sync_check() if sync else None
            if time_ns is None and not data and not marker and check is None and landmark is None:
                if not deterministic:
                    return False
                self._deliver(None, b"")
                if self.before_injection is not None:
                    self.before_injection(False)
                self.after_point(False)
                return False
            self._deliver(time_ns, data, ps)
            index = digest = None
            self.point_landmark = landmark is not None
            if marker:
                index, digest = self._take_marker()
            self.sink.emit(ev.Point(
                self.position, time_ns=time_ns, ps_per_instr=ps, input=data, marker=index,
                marker_digest=digest or b"", landmark=landmark[0] if landmark else None,
                landmark_digest=landmark[1] if landmark else 0, check=check))
            self.points += 1
            self.sink.maybe_flush(self.position)
            if self.before_injection is not None:
                self.before_injection(landmark is not None)
            self.after_point(landmark is not None)
            return True
        p = recorded if recorded is not None else self.source.point_at(self.log_pos)
        if p is not None and p.landmark is not None and recorded is None:
            self._diverged(f"replay made a deterministic point at {place(self.log_unit, self.log_pos)}, where "
                           f"the recording has a landmark (rip {p.landmark[REG_NAMES.index('rip')]:#x})")
        if p is None:
            if not deterministic:
                return False
            self._deliver(None, b"")
            self.after_point(False)
            return False
        self._deliver(p.time_ns, p.input, p.ps_per_instr)
        if p.marker is not None:
            self._verify_marker(p)
        if p.check is not None:
            self.verify_check(p.check)
        self.points += 1
        self.pace()
        self.after_point(p.landmark is not None)
        return True

    def _deliver(self, time_ns: Optional[int], data: bytes, ps: Optional[int] = None) -> None:
        m = self.machine
        if time_ns is not None:
            self.set_time(time_ns, ps)
        self.run_due()
        if data:
            accepted = m.serial.receive(data)
            if accepted != len(data):
                self._diverged(f"the UART took {accepted} of {len(data)} recorded input bytes")

    def _take_input(self) -> bytes:
        m = self.machine
        return m.serial_in.take(m.serial.rx_room()) if m.input_waiting() else b""

    def _log_end(self) -> Outcome:
        """Replay reached ``LogSource.stop_position`` without the guest stopping."""
        e = self.source.end
        if e is not None and e.reason in GUEST_ENDS:
            self._diverged(f"the recording ends with the guest's {e.reason} at {place(self.log_unit, e.pos)}, "
                           "and replay went past it")
        if e is not None:
            return Outcome(e.reason, e.status, self.position, self.guest_now(), e.detail)
        return Outcome("incomplete", 0, self.position, self.guest_now())

    def divergence_words(self, what: str) -> str:
        """A divergence report's text, with what this engine knows of the likely cause."""
        return what

    def _diverged(self, what: str):
        raise Divergence(self.position, self.divergence_words(what), self.last_match, self.unit)

    def verify_check(self, check: tuple[int, int]) -> None:
        regs = self.machine.vcpu.get_regs()
        rip, digest = check
        if regs.rip != rip:
            self._diverged(f"rip is {regs.rip:#x}, the recording has {rip:#x}")
        if regs_digest(regs) != digest:
            self._diverged("the general registers differ from the recording (register digest mismatch); "
                           "registers now:\n" + _format_regs(regs))
        self.last_match = self.position

    def exit_check(self, exit) -> None:
        """At the first I/O exit each CHECK_INTERVAL_NS of guest time: log (record) or compare (replay) the state."""
        now = self.guest_now()
        if now < self.next_check_ns:
            return
        self.next_check_ns = now + CHECK_INTERVAL_NS
        regs = self.machine.vcpu.get_regs()
        code = exit_code(exit)
        if self.sink is not None:
            self.sink.emit(ev.Check(self.position, code, regs.rip, regs_digest(regs)))
            return
        e = self.source.peek()
        if not isinstance(e, ev.Check) or e.pos != self.log_pos:
            self._diverged(f"replay made a {describe_exit_code(code)} the recording does not have "
                           f"here (next recorded: {describe_entry(e)})")
        self.source.pop()
        if e.what != code:
            self._diverged(f"replay made a {describe_exit_code(code)}, the recording a "
                           f"{describe_exit_code(e.what)}")
        self.verify_check((e.rip, e.digest))

    # -- pacing (--speed) -----------------------------------------------------------
    def pace(self) -> None:
        """Replay: wait while paused; with --speed, keep guest time at speed x host time."""
        if self.running is not None and not self.running.is_set():
            self.running.wait()
            self._pace_base = None          # pacing restarts after a pause
        if not self.speed:
            return
        now, guest = host_monotonic_ns(), self.guest_now()
        if self._pace_base is None:
            self._pace_base = (guest, now)  # from where replay starts (0, or a crop's first marker)
            return
        g0, h0 = self._pace_base
        ahead = (guest - g0) / self.speed - (now - h0)
        if ahead > 1_000_000:
            time.sleep(ahead / 1e9)

    # -- engine specific -----------------------------------------------------------
    def sample_time(self) -> tuple[int, Optional[int]]:
        raise NotImplementedError

    def set_time(self, ns: int, ps: Optional[int]) -> None:
        raise NotImplementedError

    def run_due(self) -> None:
        raise NotImplementedError

    def sync_check(self) -> Optional[tuple[int, int]]:
        return None

    def after_point(self, landmark: bool) -> None:
        raise NotImplementedError

    # -- shared exit handling -------------------------------------------------------
    def handle_exit(self, exit) -> None:
        self.machine.handlers[type(exit)](exit)

    def halt(self) -> None:
        """The guest executed hlt: deliver points here until it has an interrupt.

        Recording waits on the host (timers, input) and logs each wake-up;
        replay applies the recorded wake-ups at this position.
        """
        m = self.machine
        if not m.vcpu.if_flag:
            raise m.halted_with_interrupts_off()
        injections = m.injections
        while not m._intr and m.injections == injections and m._stop is None:
            if self.sink is not None:
                self.before_idle()
                if not self.wait_for_host():
                    raise m.halted_for_good()
                self.point(False, sync=True)
            else:
                p = self.source.point_at(self.log_pos)
                if p is None:
                    if self.log_pos >= self.source.stop_position:
                        return
                    end = self.source.end
                    if end is not None and end.reason == "hung" and end.pos == self.log_pos:
                        raise m.halted_for_good()   # as the recorder found: nothing wakes it
                    self._diverged(f"the guest halted, and the recording has no wake-up at "
                                   f"{place(self.log_unit, self.log_pos)}")
                self.point(False, recorded=p)

    def before_idle(self) -> None:
        """Recording: the guest is about to wait for the host."""

    def wait_for_host(self) -> bool:
        """Recording, guest halted: wait until a timer is due or input can enter.

        Returns False when nothing can ever wake the guest (the caller reports
        a hung guest).
        """
        m = self.machine
        m.serial_out.flush()
        while True:
            deadline = m.clock.next_deadline()
            if deadline is None and not m.input_can_wake():
                return False
            if m.input_waiting():
                return True
            now = self.idle_now_ns()
            if deadline is not None and now >= deadline:
                return True
            left = None if self.end_host_ns is None else self.end_host_ns - host_monotonic_ns()
            if left is not None and left <= 0:
                raise GuestTimeout("timeout")
            if self.marker_requested:
                return True
            wait = None if deadline is None else deadline - now
            m.idle_wait(left if wait is None else wait if left is None else min(wait, left))


def _format_regs(regs: Regs) -> str:
    return "  " + " ".join(f"{n}={getattr(regs, n):#x}" for n in REG_NAMES)


def describe_entry(e) -> str:
    if e is None:
        return "nothing: the log ends"
    if isinstance(e, ev.Check):
        return f"{describe_exit_code(e.what)} at position {e.pos}"
    return f"{type(e).__name__} at position {e.pos}"
