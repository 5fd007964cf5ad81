"""The two sides of the event log: ``LogSink`` and ``LogSource``.

Recording and replaying run the same engine code; only these differ.
``LogSink`` (recording: asks the host, writes the log) encodes entries and
writes them in chunks that survive a crash; ``LogSource`` (replay: reads the
log) gives the recording's entries in order, with one entry of look-ahead.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

from rrstub import events as ev
from rrstub.engines.base import FLUSH_BYTES, FLUSH_INTERVAL_NS, GUEST_ENDS, IDLE_FLUSH_INTERVAL_NS, NEVER
from rrstub.recording import Recording, RecordingWriter
from vmm.kvm import host_monotonic_ns


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
        """Write what is buffered as one chunk covering the log up to ``position``.

        Ctrl-C and SIGTERM wait until the chunk is written: their handlers
        raise in this thread, and one that came between taking the entries
        and writing them would lose them (a finished recording whose log
        begins at its End).
        """
        with signals_held():
            first, count, payload = self.encoder.take()
            self.writer.add_events(position if first is None else first, position, count, payload)
        self.last_flush = host_monotonic_ns()


_HELD = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM arrive after the block, not inside it (main thread; elsewhere they never run)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


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
