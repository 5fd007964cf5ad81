"""The virtual clock: the single source of time for every timed device.

Every device that needs time (PIT counters, RTC date and periodic interrupt)
reads ``now_ns()`` and arms ``Timer`` objects here; no device reads the host
clock itself.  That makes this module the one place where the recorder logs
clock values and the replayer supplies them.

Invariants:
* ``now_ns()`` never goes backwards.
* A timer fires at most once per ``arm()``; ``run_due()`` fires timers in
  deadline order (ties in arming order), each with the clock already at or
  past its deadline.
* Callbacks may arm or cancel any timer, including their own.
"""
from __future__ import annotations

import heapq
import itertools
import time
from typing import Callable, Optional


class Timer:
    """A one-shot deadline owned by a device; re-arm it for periodic use."""

    __slots__ = ("_clock", "callback", "deadline_ns", "_seq", "name")

    def __init__(self, clock: "Clock", callback: Callable[[], None], name: str = ""):
        self._clock = clock
        self.callback = callback
        self.deadline_ns: Optional[int] = None
        self._seq = 0
        self.name = name

    @property
    def armed(self) -> bool:
        return self.deadline_ns is not None

    def arm(self, deadline_ns: int) -> None:
        self._clock._arm(self, int(deadline_ns))

    def cancel(self) -> None:
        self.deadline_ns = None  # heap entries with a stale sequence are skipped


class Clock:
    """Base clock: timer bookkeeping; subclasses decide what ``now_ns`` is."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Timer]] = []
        self._seq = itertools.count(1)
        # While a callback runs: the deadline it was armed for, so a callback
        # (or whoever it calls) can tell how late it fires.
        self.firing_deadline_ns: Optional[int] = None

    def now_ns(self) -> int:
        raise NotImplementedError

    def timer(self, callback: Callable[[], None], name: str = "") -> Timer:
        return Timer(self, callback, name)

    def _arm(self, timer: Timer, deadline_ns: int) -> None:
        timer.deadline_ns = deadline_ns
        timer._seq = next(self._seq)
        heapq.heappush(self._heap, (deadline_ns, timer._seq, timer))

    def _prune(self) -> None:
        heap = self._heap
        while heap and heap[0][2]._seq != heap[0][1]:
            heapq.heappop(heap)
        while heap and heap[0][2].deadline_ns is None:
            heapq.heappop(heap)
            while heap and heap[0][2]._seq != heap[0][1]:
                heapq.heappop(heap)

    def next_deadline(self) -> Optional[int]:
        """The earliest armed deadline, or None when no timer is armed."""
        self._prune()
        return self._heap[0][0] if self._heap else None

    def run_due(self, now_ns: Optional[int] = None) -> int:
        """Fire every timer whose deadline is at or before ``now_ns``.

        Returns the number of callbacks run.
        """
        if now_ns is None:
            now_ns = self.now_ns()
        fired = 0
        while True:
            self._prune()
            if not self._heap or self._heap[0][0] > now_ns:
                return fired
            deadline, _, timer = heapq.heappop(self._heap)
            timer.deadline_ns = None
            self.firing_deadline_ns = deadline
            try:
                timer.callback()
            finally:
                self.firing_deadline_ns = None
            fired += 1


class HostClock(Clock):
    """Live time: nanoseconds of host CLOCK_MONOTONIC since the machine started."""

    def __init__(self, rate: float = 1.0) -> None:
        """``rate``: guest nanoseconds per host nanosecond (``--clock-rate``)."""
        super().__init__()
        if not rate > 0:
            raise ValueError(f"clock rate {rate} must be positive")
        self._origin = time.monotonic_ns()
        self.rate = rate

    def now_ns(self) -> int:
        if self.rate == 1.0:
            return time.monotonic_ns() - self._origin
        return int((time.monotonic_ns() - self._origin) * self.rate)

    def to_host_ns(self, ns: int) -> int:
        """The host CLOCK_MONOTONIC time at which this clock reads ``ns``."""
        return self._origin + (ns if self.rate == 1.0 else int(ns / self.rate))


class ManualClock(Clock):
    """A clock that moves only when told: for device tests and replay."""

    def __init__(self, start_ns: int = 0) -> None:
        super().__init__()
        self._now = start_ns

    def now_ns(self) -> int:
        return self._now

    def advance(self, delta_ns: int) -> int:
        """Move time forward, firing due timers in order at their own deadlines."""
        if delta_ns < 0:
            raise ValueError("the clock cannot go backwards")
        target = self._now + delta_ns
        fired = 0
        while True:
            deadline = self.next_deadline()
            if deadline is None or deadline > target:
                break
            self._now = max(self._now, deadline)
            fired += self.run_due(self._now)
        self._now = target
        return fired


class IcountClock(Clock):
    """Exact engine time: a function of the guest's instruction count.

    ``now_ns = base_ns + (icount - base_icount) * ps_per_instr / 1000``,
    re-based only at sync points (``sync``), which the recorder logs.  Between
    sync points every clock read and timer deadline is a pure function of the
    instruction count, so none of them needs a log entry.
    """

    def __init__(self, icount: Callable[[], int], ps_per_instr: int, base_ns: int = 0) -> None:
        super().__init__()
        self._icount = icount
        self.base_ns = base_ns
        self.base_icount = icount()
        self.ps_per_instr = ps_per_instr

    def now_ns(self) -> int:
        return self.base_ns + (self._icount() - self.base_icount) * self.ps_per_instr // 1000

    def sync(self, ns: int, ps_per_instr: int) -> None:
        """Re-base at the current instruction: time becomes max(now, ns), then runs at the new rate."""
        if ps_per_instr <= 0:
            raise ValueError(f"instruction time must be positive, not {ps_per_instr} ps")
        self.base_ns = max(self.now_ns(), ns)
        self.base_icount = self._icount()
        self.ps_per_instr = ps_per_instr

    def icount_at(self, ns: int) -> int:
        """The first instruction count at which ``now_ns() >= ns``."""
        icount = self._icount()
        if ns <= self.now_ns():
            return icount
        need = (ns - self.base_ns) * 1000
        return self.base_icount + -(-need // self.ps_per_instr)


class SampledClock(Clock):
    """Fast engine time: moves only when sampled, at most once per engine point.

    ``now_ns()`` asks ``sample()`` for a value the first time it is called at
    a point (the recorder reads the host and logs it; the replayer takes it
    from the log), and returns that value until ``new_point()``.
    """

    def __init__(self, sample: Callable[[], int]) -> None:
        super().__init__()
        self._sample = sample
        self._now = 0
        self.fresh = False

    def now_ns(self) -> int:
        if not self.fresh:
            self.set(self._sample())
        return self._now

    def set(self, ns: int) -> None:
        self._now = max(self._now, ns)
        self.fresh = True

    def peek_ns(self) -> int:
        """The last value, without sampling."""
        return self._now

    def sampled_by(self, sample: Callable[[], int]) -> None:
        """From now on, values come from ``sample`` (another engine took the machine over)."""
        self._sample = sample

    def rewind(self, ns: int) -> None:
        """Restoring an earlier state: the clock reads ``ns`` again, sampled anew at the next point."""
        self._now = ns
        self.fresh = False

    def new_point(self) -> None:
        self.fresh = False
