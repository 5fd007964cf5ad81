"""The serial console by position: the bytes the guest had written before instruction P.

A UART write is made by one instruction; ``rrstub replay --until P`` prints
the bytes of the instructions before P.  ``ConsoleIndex`` learns the writes
from straight replays (``Timeline.on_serial`` / ``on_ran``) and knows the
console exactly over the prefix of the recording that replays have
covered without a gap: a replay that starts past that prefix (a restored
marker further on) teaches nothing, because the bytes before its start are
unknown.
"""
from __future__ import annotations

import bisect


class ConsoleIndex:
    def __init__(self, first: int):
        self.covered = first            # every write of the instructions in [first, covered) is known
        self._positions: list[int] = []   # the position of each known write, in order
        self._ends: list[int] = []        # the console's length after it
        self._data = bytearray()
        self._pending: list[tuple[int, bytes]] = []

    def wrote(self, position: int, data: bytes) -> None:
        self._pending.append((position, data))

    def ran(self, start: int, end: int) -> None:
        """A straight replay from ``start`` to ``end`` made the writes noted since the last call."""
        pending, self._pending = self._pending, []
        if start > self.covered:
            return
        for position, data in pending:
            if position >= self.covered:
                self._data += data
                self._positions.append(position)
                self._ends.append(len(self._data))
        self.covered = max(self.covered, end)

    def before(self, position: int) -> tuple[bytes, bool]:
        """(the bytes written before ``position``, whether that is all of them)."""
        i = bisect.bisect_left(self._positions, position)
        return bytes(self._data[:self._ends[i - 1] if i else 0]), position <= self.covered
