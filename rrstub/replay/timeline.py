"""The replay timeline: a recording as a history one can move through in both directions.

A ``Timeline`` replays a recording on one machine, instruction by
instruction (positions are instruction counts: ``ExactEngine`` for exact
recordings, ``FastStepEngine`` for fast ones), and can be moved to any
position of it: forward by replaying, backward by restoring a checkpoint
before the target and replaying forward from there.  This is what the GDB
server serves.

A fast recording's markers and end are logged at exit numbers; their
instruction counts become known as replay passes them (``recorded_at``,
``last`` is None until the end was reached), so only its first marker is
a checkpoint from the start.

Checkpoints are complete machine states kept in memory: the recording's
own markers, one every ``CHECKPOINT_EVERY`` instructions wherever replay
passes (so a reverse step never replays more than that), and the ones the
user names.  Their memory lives in a ``PageHistory``: a checkpoint stores
only the pages the guest dirtied since the checkpoint that replay started
from, and restoring rewrites only the pages that can differ.

Reverse continue scans forward from the checkpoint before the current
position, notes every breakpoint and watchpoint hit up to the current
position, and goes to the last one; with none, it tries the checkpoint
before that, down to the start of the recording.  Each checkpoint keeps a
summary of the rips replay looked at since the previous one (a 4096-bit
hash set filled by ``rr_step``): an interval whose summary lacks every
breakpoint's bit has no hit, so with breakpoints alone reverse continue
skips it without replaying it, and continue jumps over it by restoring the
checkpoint at its end.

Invariants:
* every checkpoint at position t was captured by a replay that started at
  a checkpoint s < t with the dirty log reset there, and stores the pages
  dirtied in (s, t]; so a page that changed between two checkpoint
  positions a < b has an entry in (a, b] (``PageHistory``);
* the engine's state at a position does not depend on how replay got
  there, so a checkpoint is valid for every later path through it;
* breakpoints and watchpoints are armed only while the timeline scans or
  continues; seeking (reverse step, goto) ignores them.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable, Optional

from rrstub import events as ev
from rrstub.engines import (GUEST_ENDS, NEVER, Divergence, ExactEngine, FastStepEngine, LogSource, Outcome,
                            place)
from rrstub.markers import MarkerError, decode_marker
from rrstub.recording import Recording
from rrstub.session import EXIT_TERMINATED
from rrstub.replay.accesses import READ, memory_accesses
from vmm import paging, snapshot
from vmm.kvm import VcpuState, _check
from vmm.machine import Machine, MachineError
from vmm._native import ffi, lib

CHECKPOINT_EVERY = 4096        # instructions: the longest replay a reverse step needs
POLL_EVERY = 4096              # instructions between looks at the client (Ctrl-C)
PAGE = snapshot.PAGE_SIZE
MSR_KERNEL_GS_BASE = 0xC0000102


class TimelineError(Exception):
    """The timeline cannot do what was asked; the message says why and what to do."""


class PastTheEnd(TimelineError):
    """A position after the recording's end (a fast recording's end is found by replaying to it)."""


# ---------------------------------------------------------------------------
# Memory history


class PageHistory:
    """Guest page contents at checkpoint positions.

    ``value_at(p, t)`` is the newest entry for page ``p`` at or before
    position ``t``, zeros if there is none (RAM starts zeroed; the initial
    marker holds every page the loader wrote).
    """

    def __init__(self):
        self._positions: dict[int, list[int]] = {}
        self._contents: dict[int, list[bytes]] = {}
        self.stored_bytes = 0

    def add(self, position: int, pages: Iterable[tuple[int, bytes]]) -> None:
        for p, data in pages:
            positions = self._positions.setdefault(p, [])
            contents = self._contents.setdefault(p, [])
            i = bisect.bisect_right(positions, position)
            if i and positions[i - 1] == position:
                contents[i - 1] = data
                continue
            positions.insert(i, position)
            contents.insert(i, data)
            self.stored_bytes += len(data)

    def value_at(self, page: int, position: int) -> bytes:
        positions = self._positions.get(page)
        if positions:
            i = bisect.bisect_right(positions, position)
            if i:
                return self._contents[page][i - 1]
        return snapshot.ZERO_PAGE


@dataclass
class Checkpoint:
    position: int
    vcpu: VcpuState
    devices: dict
    engine: dict
    cursor: int                 # index of the next log entry
    pages: tuple[int, ...]      # pages stored in the PageHistory at this position
    inject_pending: bool        # an interrupt was injected here and is delivered by the next step
    marker_point: bool = False  # a recorded marker: the point's injection is still to come
    names: list[str] = field(default_factory=list)
    recorded: Optional[int] = None
    # The rips looked at in [visited_from, position) (``rr_visited_bit``), when a replay ran it straight.
    visited: Optional[bytes] = None
    visited_from: int = -1


# ---------------------------------------------------------------------------
# The log, seekable


class SeekableSource(LogSource):
    """The whole event log in memory, with a cursor that restores can move."""

    def __init__(self, recording: Recording):
        self.recording = recording
        self.entries: list = []
        covered = 0
        for info, payload in recording.iter_event_payloads():
            covered = max(covered, info.meta["last"])
            self.entries.extend(ev.decode_events(payload))
        self.covered = covered
        self.end = next((e for e in self.entries if isinstance(e, ev.End)), None)
        self._exhausted = True
        self.cursor = 0

    def _fill(self) -> None:
        pass

    @property
    def _next(self):
        return self.entries[self.cursor] if self.cursor < len(self.entries) else None

    def peek(self):
        return self._next

    def pop(self):
        e = self._next
        if e is not None:
            self.cursor += 1
        return e

    def marker_cursor(self, index: int) -> Optional[int]:
        """The cursor just after the point that carries recorded marker ``index``."""
        for i, e in enumerate(self.entries):
            if isinstance(e, ev.Point) and e.marker == index:
                return i + 1
        return None


# ---------------------------------------------------------------------------
# Stops and watchpoints


@dataclass(frozen=True)
class Stop:
    """Why the timeline stopped moving."""
    kind: str                   # step, break, watch, begin, end, interrupted
    position: int
    address: int = 0            # break: the pc; watch: the watched address
    watch_kind: str = ""        # watch, rwatch, awatch
    detail: str = ""


@dataclass
class Watch:
    kind: str                   # write, read, access
    address: int
    length: int


class _ArmedWatches:
    """The write-watched ranges as rr_step compares them: guest-physical, one page at most each."""

    def __init__(self):
        self.array = ffi.new("struct rr_watch[]", 0)
        self.owners: list[Watch] = []
        self.keep: list = []

    def arm(self, watches: list[Watch], translate: Callable[[int], int], view) -> None:
        segments = []
        for w in watches:
            addr, left = w.address, w.length
            while left > 0:
                chunk = min(left, PAGE - (addr & (PAGE - 1)))
                try:
                    gpa = translate(addr)
                except paging.PageFault:
                    gpa = None    # not mapped now: cannot be written now either
                if gpa is not None:
                    segments.append((w, gpa, chunk))
                addr += chunk
                left -= chunk
        self.array = ffi.new("struct rr_watch[]", max(1, len(segments)))
        self.keep = []
        self.owners = []
        for i, (w, gpa, n) in enumerate(segments):
            shadow = ffi.new("uint8_t[]", bytes(view[gpa:gpa + n]))
            self.keep.append(shadow)
            self.array[i].gpa, self.array[i].len, self.array[i].shadow = gpa, n, shadow
            self.owners.append(w)

    def changed(self, view) -> Optional[int]:
        for i in range(len(self.owners)):
            s = self.array[i]
            if bytes(view[s.gpa:s.gpa + s.len]) != bytes(ffi.buffer(s.shadow, s.len)):
                return i
        return None

    def refresh(self, i: int, view) -> None:
        s = self.array[i]
        ffi.memmove(s.shadow, bytes(view[s.gpa:s.gpa + s.len]), s.len)


class _MuteBelow:
    """Serial output passes only the first time replay runs past a position."""

    def __init__(self, stream: Optional[BinaryIO], timeline: "Timeline"):
        self.stream = stream
        self.timeline = timeline

    def write(self, data: bytes) -> int:
        t = self.timeline
        if t.on_serial is not None:
            t.on_serial(t.engine.ctl.icount, bytes(data))
        if self.stream is not None and t.engine.ctl.icount >= t.frontier:
            self.stream.write(data)
            self.stream.flush()
        return len(data)

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()


# ---------------------------------------------------------------------------
# The timeline


class Timeline:
    """One recording, replayed on one machine, movable to any of its positions."""

    def __init__(self, path: str, *, kernel_check: Optional[str] = None,
                 serial_out: Optional[BinaryIO] = None, warn: Callable[[str], None] = lambda m: None):
        from rrstub.session import ReplayError, install_replay_hypercalls, open_kernel
        self.rec = rec = Recording.open(path)
        self.machine: Optional[Machine] = None
        # Observers: every UART write, with the position of the instruction that made it
        # (``replay --until P`` prints those before P), and every straight replay [start, end).
        self.on_serial: Optional[Callable[[int, bytes], None]] = None
        self.on_ran: Optional[Callable[[int, int], None]] = None
        try:
            if rec.recovered:
                warn(rec.recovery_note)
            rec.verify()
            config = rec.config
            self.mode = config.get("mode")
            if self.mode not in ("exact", "fast"):
                raise TimelineError(f"{path}: unknown recording mode {self.mode!r} (this rrstub knows "
                                    "exact and fast)")
            try:
                image = open_kernel(rec, kernel_check)
            except ReplayError as e:
                raise TimelineError(str(e)) from None
            self.source = SeekableSource(rec)
            kind = FastStepEngine if self.mode == "fast" else ExactEngine
            self.engine = kind(source=self.source, marker_every_ns=config["marker_every_ns"],
                               ps_per_instr=config["ps_per_instr"])
            # Recorded marker digests chain the pages dirtied since the previous
            # recorded marker, and the timeline resets the dirty log at its own
            # checkpoints: they are not verified here (register checks still are).
            self.engine.verify_markers = False
            self.recorded_at: dict[int, int] = {}     # recorded marker index -> instruction
            if self.mode == "fast":
                self.engine.on_recorded_marker = self._recorded_marker
            self.frontier = 0
            self.machine = Machine(image, config["mem_size"], config["cmdline"],
                                   serial_out=_MuteBelow(serial_out, self), warn=warn,
                                   clock=self.engine.clock, rtc_epoch_ns=config["rtc_epoch_ns"], dirty_log=True)
            self.engine.attach(self.machine)
            install_replay_hypercalls(self.machine, rec)
            self.engine.on_boundary = self._boundary
            self.tracker = self.engine.markers.tracker
            self.pages = PageHistory()
            self.checkpoints: dict[int, Checkpoint] = {}
            self._positions: list[int] = []
            self._visited = ffi.new("uint64_t[]", lib.RR_VISITED_WORDS)
            self._visited_from = 0
            self.engine.ctl.visited = self._visited
            self._load_recorded_markers()
            self.first = self._positions[0]     # 0, or where a crop or branch starts
            self._restore(self.checkpoints[self.first], initial=True)
        except BaseException:
            self.close()
            raise
        self.summaries = True     # use the visited summaries (off: always replay; tests compare both)
        # The recording's index (rrstub.index.query.Index), when it has a fresh one: reverse-continue
        # to write watchpoints answers from it (``index_answers`` counts those answers).
        self.index = None
        self.index_answers = 0
        # A checkpoint every this many instructions of replay (0: none; the index's one-way runs)
        self.checkpoint_every = CHECKPOINT_EVERY
        self.breakpoints: set[int] = set()
        self.watches: list[Watch] = []
        self._breaks = ffi.new("uint64_t[]", 1)
        self._armed = _ArmedWatches()
        self._poll: Callable[[], bool] = lambda: False
        self._interrupted = False
        self._access_watches: list[Watch] = []    # read/access watchpoints armed for this run
        self._next_accesses: list = []            # what the next instruction reads and writes
        self._access_hits: list[tuple[int, Watch]] = []   # (position before the access, watchpoint)
        self._stop_on_access = False
        end = self.source.end
        self.guest_end = end if end is not None and end.reason in GUEST_ENDS else None
        # The last position; a fast recording's is known once replay got there.
        self.last: Optional[int] = None
        if self.mode == "exact":
            self.last = end.pos if end is not None else self.source.covered
        self.at_end = False

    def close(self) -> None:
        if getattr(self, "index", None) is not None:
            self.index.close()
            self.index = None
        if self.machine is not None:
            self.machine.close()
            self.machine = None
        self.rec.close()

    def __enter__(self) -> "Timeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- positions -------------------------------------------------------------
    @property
    def position(self) -> int:
        return self.engine.ctl.icount

    def _load_recorded_markers(self) -> None:
        npages = self.machine.mem.size // PAGE
        # A fast recording's later markers are at exit numbers: their instruction
        # counts are learnt when replay passes them (``_recorded_marker``).
        for info in self.rec.markers if self.mode == "exact" else self.rec.markers[:1]:
            try:
                state = decode_marker(self.rec.payload(info))
                pages = snapshot.decode_pages(state.pages, npages)
            except (MarkerError, snapshot.SnapshotError) as e:
                if info is self.rec.markers[0]:
                    raise TimelineError(f"{self.rec.path}: the initial marker at byte offset {info.offset} "
                                        f"is unusable: {e}") from None
                continue   # a later marker only saves time; replay from an earlier one instead
            cursor = 0 if state.index == 0 else self.source.marker_cursor(state.index)
            if cursor is None:
                continue
            position = state.position if self.mode == "exact" else 0
            self.recorded_at[state.index] = position
            self.pages.add(position, pages)
            self._add(Checkpoint(position, state.vcpu, state.devices, state.engine, cursor,
                                 tuple(p for p, _ in pages), False,
                                 marker_point=state.index > 0 or info.meta.get("resume") in ("after_point",
                                                                                              "after_landmark"),
                                 recorded=state.index))

    def _recorded_marker(self, index: int, position: int) -> None:
        """Fast recordings: replay passed recorded marker ``index`` (its point: the state it has)."""
        self.recorded_at[index] = position
        cp = self.checkpoints.get(position)
        if cp is None:
            cp = self._capture()
            cp.marker_point = True      # taken before the point's injection, as a recorded marker is
        cp.recorded = index

    def _add(self, cp: Checkpoint) -> None:
        if cp.position not in self.checkpoints:
            bisect.insort(self._positions, cp.position)
        self.checkpoints[cp.position] = cp

    def checkpoint_before(self, position: int, inclusive: bool = True) -> Optional[Checkpoint]:
        i = bisect.bisect_right(self._positions, position) if inclusive else \
            bisect.bisect_left(self._positions, position)
        return self.checkpoints[self._positions[i - 1]] if i else None

    def _capture(self) -> Checkpoint:
        """A checkpoint here (between instructions); starts a new dirty interval."""
        m, e = self.machine, self.engine
        pos = e.ctl.icount
        if pos in self.checkpoints:
            return self._summarize(self.checkpoints[pos])
        self.tracker.collect()
        dirty = self.tracker.pages()
        view = m.mem.view
        self.pages.add(pos, [(p, bytes(view[p * PAGE:(p + 1) * PAGE])) for p in dirty])
        self.tracker.reset()
        self._from = pos
        cp = Checkpoint(pos, m.vcpu.get_state(), m.device_states(), e.engine_state(), self.source.cursor,
                        tuple(dirty), e.inject_pending_at == pos)
        self._add(cp)
        return self._summarize(cp)

    def _summarize(self, cp: Checkpoint) -> Checkpoint:
        """Give ``cp`` the visited summary of the straight run that reached it; start a new one."""
        if cp.visited is None and self._visited_from < cp.position:
            cp.visited, cp.visited_from = bytes(ffi.buffer(self._visited)), self._visited_from
        self._clear_visited(cp.position)
        return cp

    def _clear_visited(self, position: int) -> None:
        ffi.memmove(self._visited, bytes(8 * lib.RR_VISITED_WORDS), 8 * lib.RR_VISITED_WORDS)
        self._visited_from = position

    def _after(self, position: int) -> Optional[Checkpoint]:
        """The first checkpoint after ``position``."""
        i = bisect.bisect_right(self._positions, position)
        return self.checkpoints[self._positions[i]] if i < len(self._positions) else None

    def _unhit(self, lo: int, cp: Optional[Checkpoint]) -> bool:
        """Whether no breakpoint can be hit in [lo, cp) by its summary (watchpoints need a replay)."""
        if not self.summaries or cp is None or self.watches or cp.visited is None or cp.visited_from > lo:
            return False
        words = memoryview(cp.visited).cast("Q")
        for address in self.breakpoints:
            bit = lib.rr_visited_bit(address)
            if words[bit >> 6] >> (bit & 63) & 1:
                return False
        return True

    def _restore(self, cp: Checkpoint, initial: bool = False) -> None:
        m, e = self.machine, self.engine
        view = m.mem.view
        if initial:
            view[:] = bytes(m.mem.size)
            rewrite = set(cp.pages)
        else:
            self.tracker.collect()
            rewrite = set(self.tracker.pages())
            lo, hi = sorted((self._from, cp.position))
            for pos in self._positions[bisect.bisect_right(self._positions, lo):
                                       bisect.bisect_right(self._positions, hi)]:
                rewrite.update(self.checkpoints[pos].pages)
        for p in rewrite:
            view[p * PAGE:(p + 1) * PAGE] = self.pages.value_at(p, cp.position)
        m.vcpu.set_state(cp.vcpu)
        m.restore_devices(cp.devices)
        m._stop = None
        self.tracker.collect()
        self.tracker.reset()
        self._clear_visited(cp.position)
        e.load_engine_state(cp.engine)
        e.position = e.last_match = cp.position
        self.source.cursor = cp.cursor
        vcpu = m.vcpu
        _check(lib.rr_settle(vcpu.fd, vcpu._run, vcpu._exit), "KVM_RUN (settle)")
        e.ctl.flags = 0
        e.inject_pending_at = -1
        if cp.inject_pending:
            e.inject_pending_at = cp.position
            e.ctl.flags |= lib.RR_STEP_SKIP_BREAK
        e.resume_delivery()
        e._sync_vcpu_flags()
        if cp.marker_point:
            e.after_point(False)    # a recorded marker was taken before its point's injection
        self._from = cp.position
        self.at_end = False

    # -- running forward -----------------------------------------------------------
    def _boundary(self) -> None:
        e = self.engine
        pos = e.ctl.icount
        if self._access_watches:
            # A step that delivered an interrupt ran no instruction: the
            # accesses decoded before it belong to the step after the iretq.
            delivered = e.inject_pending_at == pos - 1 and e.landings
            hit = None if delivered else self._accessed(self._next_accesses)
            if hit is not None and pos > self._run_from:
                self._access_hits.append((pos - 1, hit))
                if self._stop_on_access:
                    e.until = pos
            self._next_accesses = self._decode_next()
        if self.checkpoint_every and pos % self.checkpoint_every == 0:
            self._capture()
        if pos % POLL_EVERY == 0 and self._poll():
            self._interrupted = True
            e.until = pos
        e.boundary_at = pos + 1 if self._access_watches else (pos // POLL_EVERY + 1) * POLL_EVERY

    def _decode_next(self) -> list:
        """The memory the instruction at rip is about to read and write (read/access watchpoints)."""
        vcpu = self.machine.vcpu
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        code = b""
        for n in (15, 8, 4, 1):   # the instruction may end just before an unmapped page
            try:
                code = self.read_memory(regs.rip, n)
                break
            except paging.PageFault:
                continue
        return memory_accesses(code, regs, sregs.fs.base, sregs.gs.base) if code else []

    def _accessed(self, accesses: list) -> Optional[Watch]:
        for addr, size, how in accesses:
            for w in self._access_watches:
                if addr < w.address + w.length and w.address < addr + size and (
                        w.kind == "access" or how & READ):
                    return w
        return None

    def _run(self, until: Optional[int], breaks: bool, watches: bool) -> Outcome:
        """Replay forward to ``until`` (or the end), stopping early at armed breakpoints/watchpoints."""
        e = self.engine
        c = e.ctl
        if breaks and self.breakpoints:
            ordered = sorted(self.breakpoints)
            self._breaks = ffi.new("uint64_t[]", ordered)
            c.breaks, c.nbreaks = self._breaks, len(ordered)
        else:
            c.nbreaks = 0
        self._armed.arm([w for w in self.watches if w.kind == "write"] if watches else [],
                        self._translate, self.machine.mem.view)
        c.watches, c.nwatches = self._armed.array, len(self._armed.owners)
        e.until = until
        e.boundary_at = (c.icount // POLL_EVERY + 1) * POLL_EVERY
        self._access_watches = [w for w in self.watches if w.kind in ("read", "access")] if watches else []
        self._access_hits = []
        self._run_from = c.icount
        if self._access_watches:
            self._next_accesses = self._decode_next()
            e.boundary_at = c.icount + 1
        try:
            out = e.run()
            if out.reason in GUEST_ENDS:
                end = self.guest_end
                if end is None or (out.reason, out.status, e.log_pos) != (end.reason, end.status, end.pos):
                    recorded = (f"the recording ends with {end.reason} (status {end.status}) at "
                                f"{place(e.log_unit, end.pos)}" if end is not None else
                                "the recording does not end there")
                    raise TimelineError(f"the replay no longer follows the recording: the guest ended with "
                                        f"{out.reason} (status {out.status}) at instruction {c.icount} "
                                        f"({place(e.log_unit, e.log_pos)}); {recorded}")
            if out.reason not in ("until", "break", "watch"):
                self.last = c.icount     # the end: known from the start for exact recordings
            return out
        except Divergence as d:
            raise TimelineError(f"the replay no longer follows the recording: {d}") from None
        except MachineError as err:
            if self.guest_end is not None and e.log_pos >= self.guest_end.pos:
                self.last = c.icount
                return Outcome(self.guest_end.reason, self.guest_end.status, c.icount, e.guest_now(), str(err))
            raise TimelineError(f"the guest stopped at instruction {c.icount}, where the recording does "
                                f"not end: {err}") from None
        finally:
            c.nbreaks = c.nwatches = 0
            e.until = None
            e.boundary_at = NEVER
            self.frontier = max(self.frontier, c.icount)
            if self.on_ran is not None:
                self.on_ran(self._run_from, c.icount)

    def _seek(self, target: int) -> None:
        """Move to ``target`` (0 <= target <= last) without regard to breakpoints."""
        pos = self.position
        cp = self.checkpoint_before(target)
        if not (cp.position <= pos <= target and not self.at_end):
            self._restore(cp)
        if self.position < target:
            out = self._run(target, breaks=False, watches=False)
            if out.reason != "until":
                self.at_end = True
                if self.position != target:
                    raise PastTheEnd(f"the replay ended ({out.reason}) at instruction {self.position}, "
                                        f"before instruction {target}")

    def _end_stop(self, out: Optional[Outcome] = None) -> Stop:
        """At the end of the recording (``out``: how replay got there, None if it already was)."""
        self.at_end = True
        end = self.source.end
        reason = out.reason if out is not None else end.reason if end is not None else "incomplete"
        status = out.status if out is not None else end.status if end is not None else 0
        what = {"exit": f"the guest exited with status {status}", "reset": "the guest reset itself",
                "poweroff": "the guest powered off (ACPI S5)",
                "crash": "the guest crashed", "hung": "the guest hung: nothing could wake it",
                "timeout": "the recorder's --timeout ended the recording",
                "interrupted": "the recording was stopped by "
                               + ("SIGTERM" if status == EXIT_TERMINATED else "Ctrl-C"),
                "incomplete": "the recording is incomplete: its writer was killed"}.get(reason, reason)
        return Stop("end", self.position, detail=f"end of the recording at instruction {self.position}: {what}")

    def end_detail(self) -> str:
        """How the recording ends, in words (``Stop.detail`` at the end), for a timeline at its end."""
        return self._end_stop().detail

    def last_words(self) -> str:
        """The last position for people: a fast recording's is known once replay has been there."""
        if self.last is not None:
            return str(self.last)
        end = self.source.end
        return (f"? (a fast recording's end, exit #{end.pos if end else self.source.covered}, is counted in "
                "instructions when replay gets there)")

    def log_words(self) -> str:
        """Where the log is, for a fast recording: ' (exit #N)'; '' for an exact one."""
        return f" (exit #{self.engine.exits})" if self.mode == "fast" else ""

    def _past_log(self) -> bool:
        """At the end of a log that stops without the guest's end (Ctrl-C, timeout, killed recorder)."""
        return self.guest_end is None and self.last is not None and self.position >= self.last

    # -- what gdb asks ---------------------------------------------------------------
    def step(self) -> Stop:
        if self.at_end or self._past_log():
            return self._end_stop()
        out = self._run(self.position + 1, breaks=False, watches=True)
        if out.reason != "until":
            return self._end_stop(out)
        if self._access_hits:
            return _watch_stop(self.position, self._access_hits[-1][1])
        hit = self._armed.changed(self.machine.mem.view)
        if hit is not None:
            return _watch_stop(self.position, self._armed.owners[hit])
        return Stop("step", self.position)

    def cont(self, poll: Callable[[], bool] = lambda: False) -> Stop:
        if self.at_end or self._past_log():
            return self._end_stop()
        self._poll, self._interrupted = poll, False
        self._stop_on_access = True
        try:
            out = None
            if not self._skip_unhit():
                self.engine.ctl.flags |= lib.RR_STEP_SKIP_BREAK   # no stop at the breakpoint we start from
                # The interval we stand in shows our own breakpoint: replay it, then skip on.
                ahead = self._after(self.position)
                if ahead is not None and self._unhit(ahead.position, self._after(ahead.position)):
                    out = self._run(ahead.position, breaks=True, watches=True)
                    if out.reason == "until" and not self._interrupted:
                        self._skip_unhit()
                        out = None
            if out is None:
                out = self._run(None, breaks=True, watches=True)
        finally:
            self._poll = lambda: False
            self._stop_on_access = False
        if out.reason == "until" and self._access_hits:
            return _watch_stop(self.position, self._access_hits[-1][1])
        if out.reason == "break":
            return Stop("break", self.position, self._pc())
        if out.reason == "watch":
            return _watch_stop(self.position, self._armed.owners[out.status])
        if out.reason == "until":
            return Stop("interrupted", self.position)
        return self._end_stop(out)

    def reverse_step(self) -> Stop:
        if self.position <= self.first:
            return Stop("begin", self.position, detail="start of the recording")
        self._seek(self.position - 1)
        return Stop("step", self.position)

    def reverse_cont(self, poll: Callable[[], bool] = lambda: False) -> Stop:
        origin = self.position
        answered = self._reverse_by_index(origin)
        if answered is not None:
            return answered
        hi = origin
        self._poll, self._interrupted = poll, False
        try:
            while hi > 0:
                cp = self.checkpoint_before(hi, inclusive=False)
                end = self.checkpoints.get(hi)
                if end is not None and self._unhit(cp.position, end):
                    hi = cp.position
                    continue
                self._restore(cp)
                hits = self._scan(hi)
                if self._interrupted:
                    return Stop("interrupted", self.position)
                if hits:
                    pos, stop = hits[-1]
                    self._seek(pos)
                    return Stop(stop.kind, self.position, stop.address, stop.watch_kind)
                hi = cp.position
        finally:
            self._poll = lambda: False
        self._seek(self.first)
        return Stop("begin", self.first, detail="start of the recording")

    def _reverse_by_index(self, origin: int) -> Optional[Stop]:
        """Reverse-continue with only write watchpoints set, on an indexed recording: straight to the
        last write that changed a watched byte (the stop a scan finds), or None to scan."""
        from rrstub.index.query import last_change
        if self.index is None or self.breakpoints or not self.watches or any(
                w.kind != "write" for w in self.watches):
            return None
        best: Optional[tuple[int, Watch]] = None
        for w in self.watches:
            known, write = last_change(self.index, w.address, w.length, origin, self.first)
            if not known:
                return None
            if write is not None and (best is None or write.pos > best[0]):
                best = (write.pos, w)
        self.index_answers += 1
        if best is None:
            self._seek(self.first)
            return Stop("begin", self.first, detail="start of the recording")
        self._seek(best[0])
        return _watch_stop(best[0], best[1])

    def _skip_unhit(self) -> bool:
        """Continue: restore the furthest checkpoint ahead that replay provably reaches without a hit."""
        to, at = None, self.position
        while True:
            cp = self._after(at)
            if not self._unhit(at, cp):
                break
            to, at = cp, cp.position
        if to is not None:
            self._restore(to)
        return to is not None

    def _scan(self, hi: int) -> list[tuple[int, Stop]]:
        """Replay from here to ``hi``; every breakpoint and watchpoint hit on the way, in order."""
        hits: list[tuple[int, Stop]] = []
        while self.position < hi:
            out = self._run(hi, breaks=True, watches=True)
            hits += [(pos, _watch_stop(pos, w)) for pos, w in self._access_hits]
            if self._interrupted:
                break
            if out.reason == "break":
                hits.append((self.position, Stop("break", self.position, self._pc())))
                self.engine.ctl.flags |= lib.RR_STEP_SKIP_BREAK
            elif out.reason == "watch":
                self._watch_hit(hits, out.status)
            elif out.reason != "until":
                break
        if self.position == hi and not self._interrupted:
            i = self._armed.changed(self.machine.mem.view)
            if i is not None:   # written by the instruction just before hi
                self._watch_hit(hits, i)
        hits.sort(key=lambda h: h[0])
        return hits

    def _watch_hit(self, hits: list, i: int) -> None:
        """Reverse: a write watchpoint stops before the writing instruction."""
        w = self._armed.owners[i]
        self._armed.refresh(i, self.machine.mem.view)
        pos = self.position - 1
        if not hits or hits[-1][0] != pos:
            hits.append((pos, _watch_stop(pos, w)))

    def resolve(self, target) -> int:
        """An instruction count for a position option's value (``session.resolve_position``).

        A fast recording's marker (``RecordedMarker``) is found by replaying
        to it, unless replay has passed it already.
        """
        index = getattr(target, "index", None)
        if index is None:
            return target
        if index not in self.recorded_at:
            e = self.engine
            furthest = self.checkpoints[self._positions[-1]]
            if self.position < furthest.position or self.at_end:
                self._restore(furthest)
            e.until_marker = index
            try:
                out = self._run(None, breaks=False, watches=False)
            finally:
                e.until_marker = None
            if out.reason != "until" or index not in self.recorded_at:
                raise TimelineError(f"replay reached the end of the recording ({out.reason}) without "
                                    f"meeting marker m{index}")
        return self.recorded_at[index]

    def forward(self, target: int) -> Stop:
        """Replay on from the current position to ``target`` without restoring any checkpoint, so one
        straight run covers every instruction in between (``on_ran``); the end stops it earlier."""
        if target < self.position:
            raise TimelineError(f"instruction {target} is behind the current one ({self.position})")
        if self.at_end:
            return self._end_stop()
        out = self._run(target, breaks=False, watches=False)
        if out.reason != "until":
            return self._end_stop(out)
        return Stop("step", self.position)

    def goto(self, position: int) -> Stop:
        if position < self.first or self.last is not None and position > self.last:
            raise TimelineError(f"instruction {position} is outside the recording "
                                f"({self.first}..{self.last})")
        self._seek(position)
        return Stop("step", self.position)

    # -- breakpoints and watchpoints --------------------------------------------------
    def add_breakpoint(self, address: int) -> None:
        self.breakpoints.add(address)

    def remove_breakpoint(self, address: int) -> None:
        self.breakpoints.discard(address)

    def add_watch(self, kind: str, address: int, length: int) -> None:
        if not 0 < length <= 1 << 20:
            raise TimelineError(f"a watchpoint of {length} bytes: use 1 byte to 1 MiB")
        self.watches.append(Watch(kind, address, length))

    def remove_watch(self, kind: str, address: int, length: int) -> None:
        for w in self.watches:
            if (w.kind, w.address, w.length) == (kind, address, length):
                self.watches.remove(w)
                return

    # -- markers --------------------------------------------------------------------
    def add_marker(self, name: str) -> Checkpoint:
        if self.at_end:
            raise TimelineError("a marker cannot be placed at the end of the recording; step back first")
        cp = self._capture()
        if name not in cp.names:
            cp.names.append(name)
        return cp

    def named(self, name: str) -> Optional[Checkpoint]:
        for cp in self.checkpoints.values():
            if name in cp.names or (cp.recorded is not None and name == f"m{cp.recorded}"):
                return cp
        return None

    def markers(self) -> list[Checkpoint]:
        return [self.checkpoints[p] for p in self._positions
                if self.checkpoints[p].names or self.checkpoints[p].recorded is not None]

    # -- state ----------------------------------------------------------------------
    def _pc(self) -> int:
        return self.machine.vcpu.get_regs().rip

    def _translate(self, vaddr: int) -> int:
        s = self.machine.vcpu.get_sregs()
        return paging.virt_to_phys(self.machine.mem, s.cr0, s.cr3, s.cr4, s.efer, vaddr)

    def read_memory(self, vaddr: int, length: int) -> bytes:
        """Guest memory at a virtual address of the current address space; PageFault if unmapped."""
        s = self.machine.vcpu.get_sregs()
        return paging.read_virtual(self.machine.mem, s.cr0, s.cr3, s.cr4, s.efer, vaddr, length)

    def registers(self) -> dict:
        """Every register of the target description, by name."""
        vcpu = self.machine.vcpu
        regs, s = vcpu.get_regs(), vcpu.get_sregs()
        values: dict = {n: getattr(regs, n) for n in
                        ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")}
        values["eflags"] = regs.rflags & 0xFFFFFFFF
        for name in ("cs", "ss", "ds", "es", "fs", "gs"):
            values[name] = getattr(s, name).selector
        values["fs_base"], values["gs_base"] = s.fs.base, s.gs.base
        values["k_gs_base"] = vcpu.get_msrs([MSR_KERNEL_GS_BASE]).get(MSR_KERNEL_GS_BASE, 0)
        for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
            values[name] = getattr(s, name)
        x = vcpu.get_xsave()
        u16 = lambda off: int.from_bytes(x[off:off + 2], "little")
        values["fctrl"], values["fstat"] = u16(0), u16(2)
        values["ftag"] = _full_tag(x[4])
        values["fop"] = u16(6)
        values["fioff"] = int.from_bytes(x[8:12], "little")
        values["fiseg"] = u16(12)
        values["fooff"] = int.from_bytes(x[16:20], "little")
        values["foseg"] = u16(20)
        values["mxcsr"] = int.from_bytes(x[24:28], "little")
        for i in range(8):
            values[f"st{i}"] = x[32 + 16 * i:42 + 16 * i]
        for i in range(16):
            values[f"xmm{i}"] = x[160 + 16 * i:176 + 16 * i]
        return values


_WATCH_REPORT = {"write": "watch", "read": "rwatch", "access": "awatch"}


def _watch_stop(position: int, w: Watch) -> Stop:
    return Stop("watch", position, w.address, _WATCH_REPORT[w.kind])


def _full_tag(abridged: int) -> int:
    """FXSAVE's abridged tag byte as the x87 tag word gdb shows: 11 (empty) or 00 (valid)."""
    tag = 0
    for i in range(8):
        if not abridged >> i & 1:
            tag |= 3 << (2 * i)
    return tag
