"""The record and replay engines: drive a Machine so that a run can be repeated exactly.

Two engines, one contract.  The guest's future is a function of (initial
marker, event log); every value from outside (clock, serial input, random
numbers) enters at an engine *point*, and each point that delivers anything
is logged as one ``events.Point``.  Recording and replaying run the same
code; only ``LogSink`` (recording: asks the host, writes the log) and
``LogSource`` (replay: reads the log) differ.

Exact engine (``ExactEngine``): single-steps every instruction in C
(native/rrnative.c ``rr_step``); the position is the instruction count.
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

Fast engine (``FastEngine``): runs the guest freely.  The position counts
deterministic exits (port I/O, MMIO, hlt, interrupt window) and landmarks.
When something must be delivered while the guest computes without exiting,
the recorder kicks the vCPU and logs a landmark: the general registers and
a hash of the pages dirtied since the last marker.  Replay finds the
landmark with a hardware breakpoint at its RIP (``rr_run_to_regs``) plus the
page hash.  Interrupts are injected only at deterministic exits (at a
landmark the engine asks for an interrupt window, whose exit is
deterministic), so injection never depends on where a kick landed.

Points where the recorder logged nothing but replay would not stop (a kick
with nothing due) change nothing: they neither fire timers nor inject.
"""
from __future__ import annotations

import hashlib
import os
import struct
import time
from dataclasses import dataclass
from typing import Callable, Optional

from rrstub import events as ev
from rrstub.markers import MarkerKeeper, MarkerState, decode_marker
from rrstub.recording import Recording, RecordingWriter
from vmm import snapshot, x86special
from vmm.clock import IcountClock, SampledClock
from vmm.kvm import (Debug, Hlt, Interrupted, IoIn, IoOut, IrqWindowOpen,
                     MmioRead, MmioWrite, REG_NAMES, Regs, _check, host_monotonic_ns)
from vmm.machine import GuestTimeout, Machine
from vmm._native import ffi, lib

SYNC_INTERVAL_NS = 50_000_000       # exact engine: a sync point every 50 ms of guest time
NOMINAL_PS_PER_INSTR = 1000         # exact engine: the virtual CPU retires one instruction per ns
CHECK_INTERVAL_NS = 100_000_000     # a state check at the first I/O exit after this much guest time
SYNC_CHECK_EVERY = 4                # exact engine: a state check in every Nth sync point
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
RFLAGS_IF = 0x200
RETRY_NS = 100_000                  # fast engine: a kick that could not make a landmark retries after this
# Fast replay gives up on a landmark after the longer of these (host time):
LANDMARK_BUDGET_MIN_NS = 5_000_000_000
LANDMARK_BUDGET_FACTOR = 500        # x the guest time the recorder took to get there
GUEST_ENDS = ("exit", "reset", "crash", "hung")
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
# The two sides of the log


class LogSink:
    """Recording: encodes entries and writes them in chunks that survive a crash.

    ``maybe_flush`` writes a chunk once ``flush_due_ns`` has passed; the
    engines call it at logged points, the fast engine also at its deadline
    kick (which ``flush_due_ns`` bounds), and an exact recording every
    FLUSH_CHECK_EVERY instructions (``session._flush_while_stepping``).
    """

    def __init__(self, writer: RecordingWriter):
        self.writer = writer
        self.encoder = ev.EventEncoder()
        self.last_flush = host_monotonic_ns()
        self.counts: dict[str, int] = {}

    def emit(self, e: ev.Entry) -> None:
        self.encoder.add(e)
        ev.count(self.counts, e)

    def flush_due_ns(self) -> int:
        """The host time (CLOCK_MONOTONIC) by which ``maybe_flush`` writes a chunk."""
        return self.last_flush + (FLUSH_INTERVAL_NS if self.encoder.count else IDLE_FLUSH_INTERVAL_NS)

    def maybe_flush(self, position: int) -> None:
        """Write a chunk if enough is buffered or waited; every entry up to ``position`` is emitted."""
        if len(self.encoder.buf) >= FLUSH_BYTES or host_monotonic_ns() >= self.flush_due_ns():
            self.flush(position)

    def flush(self, position: int) -> None:
        """Write what is buffered as one chunk covering the log up to ``position``."""
        first, count, payload = self.encoder.take()
        self.writer.add_events(position if first is None else first, position, count, payload)
        self.last_flush = host_monotonic_ns()


class LogSource:
    """Replay: the recording's entries in order, with one entry of look-ahead."""

    def __init__(self, recording: Recording):
        self.recording = recording
        self._chunks = recording.iter_event_payloads()
        self._entries = iter(())
        self._next: Optional[ev.Entry] = None
        self._exhausted = False
        self.end: Optional[ev.End] = None
        self.covered = 0          # the log is complete up to this position
        self._fill()

    def _fill(self) -> None:
        while self._next is None and not self._exhausted:
            try:
                self._next = next(self._entries)
                if isinstance(self._next, ev.End):
                    self.end = self._next
            except StopIteration:
                try:
                    info, payload = next(self._chunks)
                except StopIteration:
                    self._exhausted = True
                    return
                self.covered = max(self.covered, info.meta["last"])
                self._entries = ev.decode_events(payload)

    def peek(self) -> Optional[ev.Entry]:
        return self._next

    def pop(self) -> ev.Entry:
        e = self._next
        self._next = None
        self._fill()
        return e

    def point_at(self, position: int) -> Optional[ev.Point]:
        e = self._next
        if isinstance(e, ev.Point) and e.pos == position:
            return self.pop()
        return None

    def next_point_position(self) -> int:
        """Where the next Point is, NEVER if no Point is next."""
        e = self._next
        return e.pos if isinstance(e, ev.Point) else NEVER

    @property
    def stop_position(self) -> int:
        """Replay cannot go past this position.

        A guest-made end (exit, reset, crash, hung) is reached by the replay
        itself, at the recorded position; a host-made end (timeout, Ctrl-C) or
        an incomplete log stops replay where the log stops.
        """
        if self.end is not None:
            return self.end.pos + 1 if self.end.reason in GUEST_ENDS else self.end.pos
        if self._exhausted:
            return self.covered
        return NEVER


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
        self.host_origin = host_monotonic_ns()
        self.progress = progress
        # Runs after each completed I/O exit, before its point: the guest is
        # between instructions, nothing is injected yet (hypercall services).
        self.on_io_done: Optional[Callable[[object], None]] = None
        # Recording: runs in every point after its deliveries, before its
        # interrupt injection (where a recording can start or stop).
        self.before_injection: Optional[Callable[[bool], None]] = None

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
        """After restoring a recording's first marker: finish what its ``resume`` meta says."""
        if how in ("after_point", "after_landmark"):
            vcpu = self.machine.vcpu
            _check(lib.rr_settle(vcpu.fd, vcpu._run, vcpu._exit), "KVM_RUN (settle)")
            self._sync_vcpu_flags()
            self.after_point(how == "after_landmark")
        elif how is not None:
            raise EngineError(f"the first marker asks replay to resume {how!r}, which this rrstub "
                              "does not know; use a newer rrstub")

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
        devices = m.device_states()
        diffs += [f"device {name} state differs" for name in devices if devices[name] != saved.devices.get(name)]
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
        p = recorded if recorded is not None else self.source.point_at(self.position)
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
            self._diverged(f"the recording ends with the guest's {e.reason} at {place(self.unit, e.pos)}, "
                           "and replay went past it")
        if e is not None:
            return Outcome(e.reason, e.status, self.position, self.guest_now(), e.detail)
        return Outcome("incomplete", 0, self.position, self.guest_now())

    def _diverged(self, what: str):
        raise Divergence(self.position, what, self.last_match, self.unit)

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
        if not isinstance(e, ev.Check) or e.pos != self.position:
            self._diverged(f"replay made a {describe_exit_code(code)} the recording does not have "
                           f"here (next recorded: {_describe_entry(e)})")
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
                p = self.source.point_at(self.position)
                if p is None:
                    if self.position >= self.source.stop_position:
                        return
                    end = self.source.end
                    if end is not None and end.reason == "hung" and end.pos == self.position:
                        raise m.halted_for_good()   # as the recorder found: nothing wakes it
                    self._diverged(f"the guest halted, and the recording has no wake-up at this {self.unit}")
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


def _describe_entry(e) -> str:
    if e is None:
        return "nothing: the log ends"
    if isinstance(e, ev.Check):
        return f"{describe_exit_code(e.what)} at position {e.pos}"
    return f"{type(e).__name__} at position {e.pos}"


# ---------------------------------------------------------------------------
# Exact engine


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
                if self.source is not None and c.icount >= self.source.stop_position:
                    return self._log_end()
                if self.until is not None and c.icount >= self.until:
                    return Outcome("until", 0, c.icount, self.clock.now_ns())
                c.stop_icount = min(end, self.boundary_at, NEVER if self.until is None else self.until)
                c.host_deadline = self.end_host_ns or 0
                if m._intr:
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
                elif reason == lib.RR_STEP_SPECIAL:
                    self._special()
                elif reason == lib.RR_STEP_EXIT:
                    self._exit()
                elif reason == lib.RR_STEP_BREAK:
                    return Outcome("break", 0, c.icount, self.clock.now_ns())
                elif reason == lib.RR_STEP_WATCH:
                    return Outcome("watch", c.hit, c.icount, self.clock.now_ns())
                elif reason == lib.RR_STEP_DEADLINE:
                    raise GuestTimeout("timeout")
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
        return Outcome(reason, status, c.icount, self.clock.now_ns())

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
        _check(lib.rr_step(vcpu.fd, vcpu._run, c, vcpu._exit), what)
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
        regs = vcpu.get_regs()
        if sp.kind == K.HLT:
            regs.rip = (regs.rip + sp.length) & 0xFFFFFFFFFFFFFFFF
            self._advance(regs)
            self._end_interrupt_shadow(regs)
            self.halt()
            return
        ctx = x86special.EmulationContext(tsc=self.clock.now_ns(), random64=self._random)
        if not x86special.emulate(sp, regs, ctx):
            self._step_one()
            return
        self._advance(regs)

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
                           f"(next recorded: {_describe_entry(e)})")
        return self.source.pop().value

    def before_idle(self) -> None:
        self._idle_from = (self.clock.now_ns(), host_monotonic_ns())

    def _exit(self) -> None:
        m = self.machine
        exit = m.vcpu.last_exit()
        m.exits += 1
        m.recent_exits.append(exit)
        if isinstance(exit, Debug):
            raise EngineError(f"unexpected debug exit at {exit.pc:#x} while single-stepping")
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


# ---------------------------------------------------------------------------
# Fast engine


class FastEngine(Engine):
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

    def settle(self) -> None:
        vcpu = self.machine.vcpu
        _check(lib.rr_settle(vcpu.fd, vcpu._run, vcpu._exit), "KVM_RUN (settle)")

    def engine_state(self) -> dict:
        return {"position": self.position, "clock_ns": self.clock.peek_ns(),
                "guest_ns": self.clock.peek_ns(), "next_check_ns": self.next_check_ns}

    def load_engine_state(self, s: dict) -> None:
        self.clock.set(s["clock_ns"])
        self.clock.new_point()
        self.next_check_ns = s["next_check_ns"]

    # -- time -----------------------------------------------------------------------
    def _sample(self) -> int:
        """A device read the clock while handling an exit."""
        if self.sink is not None:
            ns = self.host_virtual_ns()
            self.sink.emit(ev.ClockRead(self.position, ns))
            return ns
        e = self.source.peek()
        if not isinstance(e, ev.ClockRead) or e.pos != self.position:
            self._diverged(f"the guest read the clock, and the recording has no clock value here "
                           f"(next recorded: {_describe_entry(e)})")
        return self.source.pop().time_ns

    def sample_time(self) -> tuple[int, None]:
        return self.host_virtual_ns(), None

    def guest_now(self) -> int:
        return self.clock.peek_ns()

    def time_wanted(self) -> bool:
        return not self.clock.fresh and self._time_due()

    def set_time(self, ns: int, ps: Optional[int]) -> None:
        self.clock.set(ns)

    def run_due(self) -> None:
        if self.clock.fresh:
            self.clock.run_due()

    def after_point(self, landmark: bool) -> None:
        """Inject where it is deterministic: KVM delivers at the very next entry.

        When the guest cannot take the interrupt now, the recorder asks for an
        interrupt window; on this host the window exit does not come at a fixed
        instruction, so it becomes a landmark (``_window_open``) and replay,
        which never asks for windows, reaches it by breakpoint instead.
        """
        self.machine.inject(window=self.sink is not None)
        self.clock.new_point()

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
                    if self.sink is not None:
                        # A guest that computes without exiting logs nothing: the
                        # deadline kick is where its buffered events reach the file.
                        self.sink.maybe_flush(self.position)
                        self._kicked()
                    continue
                if isinstance(exit, IrqWindowOpen):
                    if self.sink is None:
                        raise EngineError("interrupt window exit during replay (replay never asks for one)")
                    self._landmark(window=True)
                    continue
                self.position += 1
                m.exits += 1
                m.recent_exits.append(exit)
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


    def _kicked(self) -> None:
        """Recording: the vCPU was kicked; make a landmark if anything is due."""
        m = self.machine
        if self.end_host_ns is not None and host_monotonic_ns() >= self.end_host_ns:
            raise GuestTimeout("timeout")
        due = (self._time_due() or self.marker_requested
               or self.host_virtual_ns() >= self.next_marker_ns
               or m.input_waiting())
        if not due:
            return
        self._landmark(window=False)

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
        m = self.machine
        vcpu = m.vcpu
        want = self._want
        for name, value in zip(REG_NAMES, p.landmark):
            setattr(want, name, value)
        recorded_ns = max(0, p.time_ns - self.clock.peek_ns()) if p.time_ns is not None else 0
        budget_ns = max(LANDMARK_BUDGET_MIN_NS, LANDMARK_BUDGET_FACTOR * recorded_ns)
        give_up = host_monotonic_ns() + budget_ns
        hits_before = self.breakpoint_hits[0]
        step_over = 0
        while True:
            r = lib.rr_run_to_regs(vcpu.fd, vcpu._run, want, step_over, give_up, self.breakpoint_hits,
                                   self._last_hit, vcpu._exit)
            _check(r, "KVM_RUN (landmark search)")
            if r == lib.RR_LANDMARK_MATCH:
                self._sync_vcpu_flags()
                self.markers.tracker.collect()
                if self.markers.tracker.digest(m.mem) == p.landmark_digest:
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

    def _landmark_lost(self, p: ev.Point, budget_ns: int, hits: int) -> None:
        """The landmark search ran out of its budget: report what differs, as a divergence."""
        rip = p.landmark[REG_NAMES.index("rip")]
        if hits:
            differs = [f"{n} recorded {want:#x}, replay {getattr(self._last_hit, n):#x}"
                       for n, want in zip(REG_NAMES, p.landmark) if getattr(self._last_hit, n) != want]
            seen = (f"the guest reached rip {rip:#x} {hits} times, never with the recorded registers "
                    f"(at the last: {'; '.join(differs[:8]) or 'all equal, but not the pages written'})")
        else:
            seen = f"the guest never reached rip {rip:#x}"
        self._diverged(
            f"replay did not find the landmark at {place(self.unit, p.pos)} within {budget_ns / 1e9:.1f} s: "
            f"{seen}. The guest's state depends on something fast mode cannot replay on this host: "
            "at guest CPL0, rdtsc, rdtscp, rdrand, rdseed and cpuid run on the host CPU. "
            "Record such a guest with --mode exact, which emulates them")
