"""The event log: what a recording holds besides snapshots, and its byte encoding.

A recording's event stream is everything the guest could not compute by
itself, each tagged with the *position* where it reached the guest:

* exact engine: the position is the instruction count (icount);
* fast engine: the position counts deterministic exits and landmarks
  ("points": each KVM exit that recurs identically on replay, plus each
  place where the recorder kicked the vCPU to deliver something).

Entries:

``Point``      one visit of the engine to a position where it delivered
               something: a new clock value (fast) or clock sync (exact),
               serial input bytes, a marker, and (fast only) the landmark
               that identifies the position, or a state check.  Replay
               applies a ``Point`` as one unit, in the same order as the
               recorder did.
``ClockRead``  a device read the clock while handling an exit (fast engine).
``Random``     the value an emulated rdrand/rdseed returned (exact engine).
``Check``      a cheap state hash at a deterministic exit, for divergence
               detection.
``End``        how the recording ended (the guest's exit status, or why the
               recorder stopped).

Invariants: positions never decrease along the stream; one chunk's payload
decodes on its own (delta state restarts at every chunk); every decoding
failure is a ``LogError``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

KIND_POINT = 1
KIND_CLOCK_READ = 2
KIND_RANDOM = 3
KIND_CHECK = 4
KIND_END = 5

# Point flags: which parts are present.
P_TIME = 0x01
P_INPUT = 0x02
P_MARKER = 0x04
P_LANDMARK = 0x08
P_CHECK = 0x10
P_RATE = 0x20

REG_COUNT = 18          # rax..r15, rip, rflags: struct kvm_regs
_REGS = struct.Struct(f"<{REG_COUNT}Q")
_U64 = struct.Struct("<Q")
_U64X2 = struct.Struct("<QQ")


class LogError(Exception):
    """The event stream cannot be decoded."""


@dataclass(frozen=True, slots=True)
class Point:
    pos: int
    time_ns: Optional[int] = None          # fast: the clock value; exact: sync base at pos
    ps_per_instr: Optional[int] = None     # exact: picoseconds per instruction from here on
    input: bytes = b""                     # serial bytes delivered to the UART
    marker: Optional[int] = None           # index of the marker taken here
    marker_digest: bytes = b""
    landmark: Optional[tuple[int, ...]] = None  # fast: the 18 general registers at the kick
    landmark_digest: int = 0               # fast: hash of the pages dirtied since the last marker
    check: Optional[tuple[int, int]] = None     # (rip, register digest)


@dataclass(frozen=True, slots=True)
class ClockRead:
    pos: int
    time_ns: int


@dataclass(frozen=True, slots=True)
class Random:
    pos: int
    value: int


@dataclass(frozen=True, slots=True)
class Check:
    pos: int
    what: int        # exit code: (kind << 16) | port, see engines.exit_code
    rip: int
    digest: int


@dataclass(frozen=True, slots=True)
class End:
    pos: int
    reason: str      # exit, reset, crash, hung, timeout, interrupted, stopped
    status: int
    detail: str = ""


Entry = Union[Point, ClockRead, Random, Check, End]


def count(counts: dict, e: Entry) -> None:
    """Tally ``e`` into ``counts`` by kind, and a Point also by each part it carries."""
    name = type(e).__name__
    counts[name] = counts.get(name, 0) + 1
    if isinstance(e, Point):
        for part, present in (("input", e.input), ("marker", e.marker is not None),
                              ("landmark", e.landmark is not None), ("time", e.time_ns is not None)):
            if present:
                counts[f"Point.{part}"] = counts.get(f"Point.{part}", 0) + 1


# ---------------------------------------------------------------------------
# varints


def _put_varint(out: bytearray, n: int) -> None:
    if n < 0:
        raise ValueError(f"negative value {n} in the event log")
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


class _Cursor:
    __slots__ = ("data", "at")

    def __init__(self, data: bytes):
        self.data = data
        self.at = 0

    def varint(self) -> int:
        n = shift = 0
        data = self.data
        while True:
            if self.at >= len(data):
                raise LogError(f"event log ends inside a number at byte {self.at}")
            b = data[self.at]
            self.at += 1
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
            if shift > 70:
                raise LogError(f"number too long in the event log at byte {self.at}")

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise LogError(f"event log ends inside an entry at byte {self.at} (needs {n} more bytes)")
        b = self.data[self.at:self.at + n]
        self.at += n
        return b

    def byte(self) -> int:
        return self.take(1)[0]

    @property
    def done(self) -> bool:
        return self.at >= len(self.data)


# ---------------------------------------------------------------------------
# encoder / decoder


@dataclass
class EventEncoder:
    """Appends entries to one chunk's payload; ``take()`` returns it and starts the next chunk."""

    buf: bytearray = field(default_factory=bytearray)
    count: int = 0
    first: Optional[int] = None
    _pos: int = 0
    _time: int = 0

    def add(self, e: Entry) -> None:
        out = self.buf
        if self.first is None:
            self.first = e.pos
            self._pos = e.pos
            _put_varint(out, e.pos)
        else:
            if e.pos < self._pos:
                raise ValueError(f"event position went backwards: {e.pos} after {self._pos}")
            _put_varint(out, e.pos - self._pos)
            self._pos = e.pos
        self.count += 1
        if isinstance(e, Point):
            flags = ((P_TIME if e.time_ns is not None else 0) | (P_INPUT if e.input else 0)
                     | (P_MARKER if e.marker is not None else 0)
                     | (P_LANDMARK if e.landmark is not None else 0)
                     | (P_CHECK if e.check is not None else 0)
                     | (P_RATE if e.ps_per_instr is not None else 0))
            out.append(KIND_POINT)
            out.append(flags)
            if e.time_ns is not None:
                self._put_time(e.time_ns)
            if e.ps_per_instr is not None:
                _put_varint(out, e.ps_per_instr)
            if e.input:
                _put_varint(out, len(e.input))
                out += e.input
            if e.marker is not None:
                _put_varint(out, e.marker)
                _put_varint(out, len(e.marker_digest))
                out += e.marker_digest
            if e.landmark is not None:
                out += _REGS.pack(*e.landmark)
                out += _U64.pack(e.landmark_digest)
            if e.check is not None:
                out += _U64X2.pack(*e.check)
        elif isinstance(e, ClockRead):
            out.append(KIND_CLOCK_READ)
            self._put_time(e.time_ns)
        elif isinstance(e, Random):
            out.append(KIND_RANDOM)
            out += _U64.pack(e.value)
        elif isinstance(e, Check):
            out.append(KIND_CHECK)
            _put_varint(out, e.what)
            out += _U64X2.pack(e.rip, e.digest)
        elif isinstance(e, End):
            out.append(KIND_END)
            reason = e.reason.encode()
            detail = e.detail.encode()
            _put_varint(out, len(reason))
            out += reason
            _put_varint(out, e.status & 0xFFFFFFFF)
            _put_varint(out, len(detail))
            out += detail
        else:
            raise TypeError(f"not an event: {e!r}")

    def _put_time(self, ns: int) -> None:
        # Times are mostly increasing: store the zigzag delta from the last one.
        d = ns - self._time
        self._time = ns
        _put_varint(self.buf, (d << 1) if d >= 0 else ((-d << 1) - 1))

    def take(self) -> tuple[Optional[int], int, bytes]:
        """(first position, entry count, payload) of the chunk so far; resets the encoder."""
        result = (self.first, self.count, bytes(self.buf))
        self.buf = bytearray()
        self.count = 0
        self.first = None
        self._time = 0
        return result


def decode_events(payload: bytes) -> Iterator[Entry]:
    """Entries of one chunk payload, in order; raises LogError on malformed input."""
    c = _Cursor(payload)
    pos = None
    time = 0

    def get_time() -> int:
        nonlocal time
        z = c.varint()
        time += (z >> 1) if not z & 1 else -((z + 1) >> 1)
        return time

    while not c.done:
        start = c.at
        delta = c.varint()
        pos = delta if pos is None else pos + delta
        kind = c.byte()
        if kind == KIND_POINT:
            flags = c.byte()
            if flags & ~(P_TIME | P_INPUT | P_MARKER | P_LANDMARK | P_CHECK | P_RATE):
                raise LogError(f"unknown point flags {flags:#x} at byte {start}")
            kw = {}
            if flags & P_TIME:
                kw["time_ns"] = get_time()
            if flags & P_RATE:
                kw["ps_per_instr"] = c.varint()
            if flags & P_INPUT:
                kw["input"] = c.take(c.varint())
            if flags & P_MARKER:
                kw["marker"] = c.varint()
                kw["marker_digest"] = c.take(c.varint())
            if flags & P_LANDMARK:
                kw["landmark"] = _REGS.unpack(c.take(_REGS.size))
                kw["landmark_digest"] = _U64.unpack(c.take(8))[0]
            if flags & P_CHECK:
                kw["check"] = _U64X2.unpack(c.take(16))
            yield Point(pos, **kw)
        elif kind == KIND_CLOCK_READ:
            yield ClockRead(pos, get_time())
        elif kind == KIND_RANDOM:
            yield Random(pos, _U64.unpack(c.take(8))[0])
        elif kind == KIND_CHECK:
            what = c.varint()
            rip, digest = _U64X2.unpack(c.take(16))
            yield Check(pos, what, rip, digest)
        elif kind == KIND_END:
            reason = c.take(c.varint()).decode("utf-8", "replace")
            status = c.varint()
            detail = c.take(c.varint()).decode("utf-8", "replace")
            yield End(pos, reason, status, detail)
        else:
            raise LogError(f"unknown event kind {kind} at byte {start}")
