"""One open recording as the page sees it: states at positions, answered without blocking anyone long.

A ``RecordingView`` owns a ``Timeline`` and serialises its use with a
lock.  Every request names the position it wants, so two tabs on one
recording never see each other's position: the timeline is moved to the
asked position before anything is read.

* ``state(pos, client, quick)``: the state at ``pos``.  A seek replays in
  slices of ``SLICE`` instructions, taking the lock for each, so requests of
  other tabs run between slices; a newer request of the same client
  supersedes the older one (``Superseded``).  With ``quick``, a position
  further than ``QUICK_RANGE`` instructions from where replay could start
  is answered at once with the state of the nearest checkpoint before it,
  flagged ``exact: false`` and naming its own position (a state the guest
  had, at that position, never a made-up one); the page then asks again
  without ``quick`` to refine.
* ``prefetch()``: run by a background thread while no request waits, it
  replays the recording from its start in slices.  That leaves a
  checkpoint every ``CHECKPOINT_EVERY`` instructions everywhere (so every
  later preview is close to one), reads the whole console
  (``ConsoleIndex``), and learns a fast recording's end and marker
  positions.
"""
from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import threading
import time
from typing import Callable, Optional

from rrstub.recording import RecordingError
from rrstub.replay.timeline import CHECKPOINT_EVERY, PastTheEnd, Timeline, TimelineError
from rrstub.ui.console import ConsoleIndex
from vmm import paging

QUICK_RANGE = CHECKPOINT_EVERY    # instructions a quick preview replays at most before answering
SLICE = 4096            # instructions one seek slice replays while holding the lock (tens of ms)
READ_SLICE = 2048       # the same for the background read, which yields to any waiting request
DISASM_BEFORE = 6
DISASM_AFTER = 10
BACKTRACE_MAX = 24
MAX_INSTRUCTION = 15
GENERAL = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12",
           "r13", "r14", "r15", "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs", "fs_base", "gs_base",
           "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer")
FLAG_BITS = ((0, "CF"), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"), (10, "DF"), (11, "OF"))
EFER_LMA = 1 << 10


class Superseded(Exception):
    """A newer request of the same client replaced this one."""


class ViewError(Exception):
    """A request the recording cannot answer; the text is for the page."""


class Symbols:
    """Function+offset for addresses, from the kernel's symbol table (text symbols)."""

    def __init__(self, symbols):
        text = sorted({(s.address, s.name) for s in symbols if s.kind in "TtWw" and s.address})
        self._addresses = [a for a, _ in text]
        self._names = [n for _, n in text]

    def containing(self, address: int) -> Optional[tuple[int, str]]:
        i = bisect.bisect_right(self._addresses, address) - 1
        if i < 0:
            return None
        start = self._addresses[i]
        # Past the last symbol only within a plausible function's length.
        if i + 1 == len(self._addresses) and address - start > 1 << 16:
            return None
        return start, self._names[i]

    def name(self, address: int) -> Optional[str]:
        hit = self.containing(address)
        if hit is None:
            return None
        start, name = hit
        return f"{name}+{address - start:#x}" if address != start else name


class RecordingView:
    def __init__(self, rid: str, path: str, warn: Callable[[str], None] = lambda m: None):
        self.id = rid
        self.path = os.path.abspath(path)
        self.name = os.path.basename(path)
        self.error: Optional[str] = None
        self.timeline: Optional[Timeline] = None
        self.lock = threading.Lock()
        self.waiting = 0                   # requests waiting for the lock (prefetch yields to them)
        self._count = threading.Lock()
        self._tickets = itertools.count(1)
        self._latest: dict[str, int] = {}
        self.progress: dict[str, dict] = {}
        self.prefetched_to = 0
        self.prefetch_done = False
        self.closed = False
        try:
            self.timeline = t = Timeline(path, warn=warn)
        except OSError as e:
            self.error = f"rrstub: cannot open {e.filename}: {e.strerror}"
            return
        except (RecordingError, TimelineError) as e:
            self.error = f"rrstub: {e}"
            return
        self.console = ConsoleIndex(t.first)
        t.on_serial = self.console.wrote
        t.on_ran = self.console.ran
        self.prefetched_to = t.first
        self.symbols = Symbols(t.machine.kernel.symbols())

    def close(self) -> None:
        self.closed = True
        with self.lock:
            if self.timeline is not None:
                self.timeline.close()
                self.timeline = None

    # -- locking -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        """The timeline, held for this request (``waiting`` counts requests queued for it)."""
        with self._count:
            self.waiting += 1
        self.lock.acquire()
        with self._count:
            self.waiting -= 1
        try:
            if self.timeline is None:
                raise ViewError(self.error or f"{self.path} is closed")
            yield self.timeline
        finally:
            self.lock.release()

    def _ticket(self, client: str) -> int:
        with self._count:
            n = next(self._tickets)
            self._latest[client] = n
            return n

    def _check_current(self, client: str, ticket: int) -> None:
        if self._latest.get(client) != ticket:
            raise Superseded()

    # -- positions -------------------------------------------------------------------
    def _replay_start(self, t: Timeline, target: int) -> int:
        """Where a seek to ``target`` replays from: the timeline's position, or the checkpoint before."""
        cp = t.checkpoint_before(target)
        if cp.position <= t.position <= target and not t.at_end:
            return t.position
        return cp.position

    def check_position(self, pos: int) -> None:
        t = self.timeline
        if t is None:
            raise ViewError(self.error)
        if pos < t.first or (t.last is not None and pos > t.last):
            raise ViewError(f"instruction {pos} is outside the recording ({t.first}..{t.last_words()})")

    def resolve(self, text: str, client: str) -> int:
        """A marker or label name as an instruction count (a fast recording's marker: replay finds it)."""
        from rrstub.session import resolve_position
        ticket = self._ticket(client)
        with self._locked() as t:
            self._check_current(client, ticket)
            try:
                target = resolve_position(t.rec, text, "marker")
            except ValueError as e:
                raise ViewError(str(e)) from None
            self.progress[client] = {"busy": True, "what": f"finding {text}", "at": t.position, "target": None}
            try:
                return t.resolve(target)
            except TimelineError as e:
                raise ViewError(str(e)) from None
            finally:
                self.progress.pop(client, None)

    # -- the state at a position ---------------------------------------------------------
    def state(self, pos: int, client: str, quick: bool = False) -> dict:
        self.check_position(pos)
        ticket = self._ticket(client)
        try:
            while True:
                with self._locked() as t:
                    self._check_current(client, ticket)
                    start = self._replay_start(t, pos)
                    if quick and pos - start > QUICK_RANGE:
                        cp = t.checkpoint_before(pos)
                        self._goto(t, cp.position)
                        return self._read(t, pos)
                    step_to = min(pos, start + SLICE)
                    self._goto(t, step_to)
                    if t.position >= pos or t.at_end:
                        return self._read(t, pos)
                    self.progress[client] = {"busy": True, "what": "seeking", "at": t.position, "target": pos}
                self._let_others_in()
        finally:
            self.progress.pop(client, None)

    def _let_others_in(self) -> None:
        """Between two slices of a long seek: a request waiting for the timeline takes it first.

        Python's locks are not fair: the seeking thread would take the lock again
        before a waiting one wakes.  ``waiting`` drops once the waiter holds it.
        """
        deadline = time.monotonic() + 0.05
        while self.waiting and time.monotonic() < deadline:
            time.sleep(0.001)

    def _goto(self, t: Timeline, position: int) -> None:
        try:
            t.goto(position)
        except PastTheEnd:
            pass            # t.last is now known; the state read says where replay is
        except TimelineError as e:
            raise ViewError(str(e)) from None

    def _read(self, t: Timeline, requested: int) -> dict:
        pos = t.position
        text, complete = self.console.before(pos)
        regs = t.registers()
        rip = regs["rip"]
        end_text = None
        if t.at_end or (t.last is not None and pos == t.last):
            end_text = t.end_detail() if t.at_end else f"the last instruction of the recording ({pos})"
        return {
            "requested": requested, "position": pos, "exact": pos == requested,
            "guest_ns": t.engine.guest_now(), "at_end": t.at_end or (t.last is not None and pos >= t.last),
            "end_text": end_text, "last": t.last,
            "console": {"text": text.decode("utf-8", "replace"), "complete": complete,
                        "known_to": self.console.covered},
            "registers": _register_rows(regs),
            "symbol": self.symbols.name(rip),
            "disassembly": self._disassembly(t, rip),
            "backtrace": self._backtrace(t, regs),
        }

    # -- code and stack -------------------------------------------------------------------
    def _mode_bits(self, t: Timeline) -> int:
        s = t.machine.vcpu.get_sregs()
        return 64 if s.efer & EFER_LMA and s.cs.l else 32 if s.cs.db else 16

    def _code(self, t: Timeline, address: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``address``, fewer before an unmapped page."""
        out = b""
        while length > 0:
            n = min(length, 4096 - (address & 4095))
            try:
                out += t.read_memory(address, n)
            except paging.PageFault:
                break
            address += n
            length -= n
        return out

    def _disassembly(self, t: Timeline, rip: int) -> list[dict]:
        from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_32, CS_MODE_64, Cs
        bits = self._mode_bits(t)
        md = Cs(CS_ARCH_X86, {64: CS_MODE_64, 32: CS_MODE_32, 16: CS_MODE_16}[bits])
        if bits != 64:
            rip &= 0xFFFFFFFF
        before: list = []
        hit = self.symbols.containing(rip)
        if hit is not None and 0 < rip - hit[0] <= 4096:
            # Decoding backwards is ambiguous on x86: decode forward from the function's start
            # and keep what ends exactly at rip (nothing, when data sits in between).
            code = self._code(t, hit[0], rip - hit[0])
            decoded = list(md.disasm_lite(code, hit[0]))
            if decoded and decoded[-1][0] + decoded[-1][1] == rip:
                before = [(a, code[a - hit[0]:a - hit[0] + n], f"{m} {o}".rstrip())
                          for a, n, m, o in decoded[-DISASM_BEFORE:]]
        code = self._code(t, rip, MAX_INSTRUCTION * DISASM_AFTER)
        after = [(a, code[a - rip:a - rip + n], f"{m} {o}".rstrip())
                 for a, n, m, o in itertools.islice(md.disasm_lite(code, rip), DISASM_AFTER)]
        if not after:
            after = [(rip, code[:1], "(not mapped)" if not code else "(cannot be decoded)")]
        return [{"address": f"{a:#x}", "symbol": self.symbols.name(a), "bytes": b.hex(" "), "text": text,
                 "current": a == rip} for a, b, text in before + after]

    def _backtrace(self, t: Timeline, regs: dict) -> list[dict]:
        """rip, then the return addresses a frame-pointer chain gives (rbp -> saved rbp, return)."""
        frames = [regs["rip"]]
        if self._mode_bits(t) == 64:
            rbp = regs["rbp"]
            rsp = regs["rsp"]
            for _ in range(BACKTRACE_MAX):
                if rbp < rsp or rbp & 7 or rbp - rsp > 1 << 20:
                    break
                try:
                    frame = t.read_memory(rbp, 16)
                except paging.PageFault:
                    break
                saved, ret = int.from_bytes(frame[:8], "little"), int.from_bytes(frame[8:], "little")
                if ret == 0 or self.symbols.containing(ret) is None:
                    break
                frames.append(ret)
                if saved <= rbp:
                    break
                rsp, rbp = rbp + 16, saved
        return [{"address": f"{a:#x}", "symbol": self.symbols.name(a)} for a in frames]

    # -- background reading ----------------------------------------------------------------
    def prefetch_slice(self) -> bool:
        """Replay the next slice of the recording from where the console is known; False when done."""
        if self.timeline is None or self.prefetch_done or self.closed:
            return False
        if self.waiting:
            return True
        with self._locked() as t:
            start = self.console.covered
            if t.last is not None and start >= t.last:
                self.prefetch_done = True
                return False
            self._goto(t, start)
            if t.position != start:          # never reached: the end was before it
                self.prefetch_done = True
                return False
            try:
                t.forward(start + READ_SLICE if t.last is None else min(t.last, start + READ_SLICE))
            except TimelineError as e:
                raise ViewError(str(e)) from None
            self.prefetched_to = self.console.covered
            if t.at_end:
                self.prefetch_done = True
            return not self.prefetch_done

    def prefetch(self, pause: Callable[[], None] = lambda: time.sleep(0.005)) -> None:
        """Read the whole recording in the background (a thread), yielding to every request."""
        try:
            while self.prefetch_slice():
                if self.waiting:
                    pause()
        except (ViewError, Superseded):
            self.prefetch_done = True

    def info(self) -> dict:
        from rrstub.info import describe
        if self.error is not None:
            raise ViewError(self.error)
        try:
            i = describe(self.path)
        except RecordingError as e:
            raise ViewError(f"rrstub: {e}") from None
        t = self.timeline
        markers = []
        for m in i["markers"]:
            position = m["position"] if i["mode"] == "exact" else t.recorded_at.get(m["index"])
            markers.append({"index": m["index"], "position": position, "guest_s": m["guest_s"],
                            "name": m["name"], "origin": m["origin"]})
        end = i["end"]
        last = t.last
        rate = None
        if end is not None and last is not None and end["guest_s"] > 0:
            rate = (last - t.first) / end["guest_s"]
        return {"id": self.id, "path": self.path, "name": self.name, "mode": i["mode"], "first": t.first,
                "last": last, "end": end and {"reason": end["reason"], "status": end["status"],
                                              "guest_s": end["guest_s"]},
                "markers": markers, "labels": i["labels"], "kernel": i["kernel"]["name"],
                "recording_id": i["id"], "parent": i["parent"],
                "instructions_per_guest_s": rate,
                "prefetch": {"to": self.prefetched_to, "done": self.prefetch_done},
                "error": None}

    # -- markers ---------------------------------------------------------------------------
    def add_marker(self, name: str, pos: int, client: str) -> dict:
        """Name ``pos`` for this session and, as a label, in the recording file (as ``monitor marker add``)."""
        from rrstub.edit import EditError, add_label, check_label_name, recording_id
        self.check_position(pos)
        self.state(pos, client)                 # there, exactly (in slices)
        with self._locked() as t:
            try:
                check_label_name(t.rec, name)
            except EditError as e:
                raise ViewError(str(e)) from None
            self._goto(t, pos)
            try:
                cp = t.add_marker(name)
            except TimelineError as e:
                raise ViewError(str(e)) from None
            try:
                add_label(self.path, name, cp.position, expect_id=recording_id(t.rec))
            except (EditError, RecordingError, OSError) as e:
                return {"name": name, "position": cp.position, "saved": False,
                        "message": f"marker {name} at instruction {cp.position}: kept for this page only: {e}"}
        return {"name": name, "position": cp.position, "saved": True,
                "message": f"marker {name} at instruction {cp.position}: saved in {self.path}"}


def _register_rows(regs: dict) -> list[list[str]]:
    rows = []
    for name in GENERAL:
        value = regs[name]
        text = f"{value:#018x}" if name not in ("cs", "ss", "ds", "es", "fs", "gs", "eflags") else f"{value:#x}"
        if name == "eflags":
            text += " [" + " ".join(f for bit, f in FLAG_BITS if value >> bit & 1) + "]"
        rows.append([name, text])
    return rows
