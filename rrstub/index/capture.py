"""The C side of indexing: what ``rr_step`` records of every step, drained into Arrow tables.

``StepRecorder`` owns a ``struct rr_trace`` (native/rrnative.h) and its
buffers.  Attached to an exact or fast-stepping engine it makes ``rr_step``
record, for every step: the stores the instruction makes (position, rip,
virtual and physical address, size, old and new bytes; capstone's C
library decodes the operands, native/rrtrace.c), the frames interrupt and
exception deliveries push, the events themselves, a count per rip, and
the position of every step whose rip is a function's entry.  When a buffer
is nearly full ``rr_step`` stops before the next step and the engine calls
``drain`` (``ExactEngine.on_trace_full``); port I/O is added from the
engine's ``on_io_done`` hook.  Python does no per-instruction work.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from vmm._native import ffi, lib

WRITES = 1 << 16
BYTES = 1 << 22
EVENTS = 1 << 14
CALLS = 1 << 16
HIST_SLOTS = 1 << 16

_WRITE = np.dtype([("pos", "<u8"), ("rip", "<u8"), ("va", "<u8"), ("pa", "<u8"), ("size", "<u4"),
                   ("kind", "u1"), ("has_old", "u1"), ("vector", "<u2")])
_EVENT = np.dtype([("pos", "<u8"), ("rip", "<u8"), ("handler", "<u8"), ("vector", "<u4"), ("kind", "<u4")])
_CALL = np.dtype([("pos", "<u8"), ("rip", "<u8")])
EVENT_KINDS = {lib.RR_EVENT_INTERRUPT: "interrupt", lib.RR_EVENT_EXCEPTION: "exception",
               lib.RR_EVENT_SOFTWARE: "software"}
WRITE_KINDS = {lib.RR_WRITE_INSN: "store", lib.RR_WRITE_FRAME: "frame"}


class CaptureError(Exception):
    pass


def capstone_library() -> str:
    """The C library the capstone Python package ships (loaded by rrtrace.c at run time)."""
    import capstone
    folder = Path(capstone.__file__).resolve().parent / "lib"
    found = sorted(folder.glob("libcapstone.so*"))
    if not found:
        raise CaptureError(f"the capstone package has no C library in {folder} (libcapstone.so): "
                           "reinstall it with `.venv/bin/pip install --force-reinstall 'capstone>=5,<6'`")
    return str(found[0])


def _load() -> None:
    if lib.rr_trace_load(capstone_library().encode()) != 0:
        raise CaptureError(ffi.string(lib.rr_trace_error()).decode())


class StepRecorder:
    """Records every step of one engine run into columns (``tables``)."""

    def __init__(self, entries: list[int]):
        _load()
        assert ffi.sizeof("struct rr_write") == _WRITE.itemsize
        assert ffi.sizeof("struct rr_event") == _EVENT.itemsize
        self.t = t = ffi.new("struct rr_trace *")
        self._keep = [
            ffi.new("struct rr_write[]", WRITES), ffi.new("uint8_t[]", BYTES), ffi.new("uint8_t[]", BYTES),
            ffi.new("struct rr_event[]", EVENTS), ffi.new("struct rr_call[]", CALLS),
            ffi.new("uint64_t[]", sorted(set(entries)) or [0]),
            ffi.new("uint64_t[]", HIST_SLOTS), ffi.new("uint64_t[]", HIST_SLOTS)]
        (t.writes, t.old_bytes, t.new_bytes, t.events, t.calls, t.entries,
         t.hist_rip, t.hist_count) = self._keep
        t.max_writes, t.max_bytes, t.max_events, t.max_calls = WRITES, BYTES, EVENTS, CALLS
        t.nentries = len(set(entries))
        t.hist_slots = HIST_SLOTS
        self._writes: list[np.ndarray] = []
        self._old: list[bytes] = []
        self._new: list[bytes] = []
        self._events: list[np.ndarray] = []
        self._calls: list[np.ndarray] = []
        self._hist: dict[int, int] = {}
        self.io: list[tuple[int, int, int, int, Optional[int], int]] = []   # pos, rip, port, size, value, out
        self._engine = None

    # -- attaching ----------------------------------------------------------------
    def attach(self, engine) -> None:
        self._engine = engine
        engine.ctl.trace = self.t
        engine.on_trace_full = self.drain
        self._previous_io = engine.on_io_done
        engine.on_io_done = self._io_done
        regs = engine.machine.vcpu.get_sregs()
        self.t.fs_base, self.t.gs_base = regs.fs.base, regs.gs.base

    def detach(self) -> None:
        e = self._engine
        if e is None:
            return
        self.drain()
        e.ctl.trace = ffi.NULL
        e.on_trace_full = e._no_trace
        e.on_io_done = self._previous_io
        self._engine = None

    def _io_done(self, exit) -> None:
        """An in/out instruction completed: its port, size and value (the position is the one it ran at)."""
        from vmm.kvm import IoOut
        e = self._engine
        pos = e.ctl.icount - 1
        out = isinstance(exit, IoOut)
        value = None
        if exit.count == 1 and out:
            value = int.from_bytes(exit.data, "little")
        elif exit.count == 1:       # what the completed `in` put in al/ax/eax
            value = e.machine.vcpu.get_regs().rax & ((1 << (8 * exit.size)) - 1)
        self.io.append((pos, self.t.step_rip, exit.port, exit.size, value, int(out)))
        if self._previous_io is not None:
            self._previous_io(exit)

    # -- draining -----------------------------------------------------------------
    def drain(self) -> None:
        t = self.t
        if t.nwrites:
            self._writes.append(np.frombuffer(ffi.buffer(t.writes, t.nwrites * _WRITE.itemsize), _WRITE).copy())
            self._old.append(bytes(ffi.buffer(t.old_bytes, t.nold)))
            self._new.append(bytes(ffi.buffer(t.new_bytes, t.nnew)))
        if t.nevents:
            self._events.append(np.frombuffer(ffi.buffer(t.events, t.nevents * _EVENT.itemsize), _EVENT).copy())
        if t.ncalls:
            self._calls.append(np.frombuffer(ffi.buffer(t.calls, t.ncalls * _CALL.itemsize), _CALL).copy())
        if t.hist_used:
            keys = np.frombuffer(ffi.buffer(t.hist_rip, HIST_SLOTS * 8), "<u8")
            counts = np.frombuffer(ffi.buffer(t.hist_count, HIST_SLOTS * 8), "<u8")
            used = keys != 0
            hist = self._hist
            for k, n in zip((keys[used] - 1).tolist(), counts[used].tolist()):
                hist[k] = hist.get(k, 0) + n
            ffi.memmove(t.hist_rip, bytes(HIST_SLOTS * 8), HIST_SLOTS * 8)
            ffi.memmove(t.hist_count, bytes(HIST_SLOTS * 8), HIST_SLOTS * 8)
            t.hist_used = 0
        t.nwrites = t.nold = t.nnew = t.nevents = t.ncalls = 0

    @property
    def steps(self) -> int:
        return self.t.steps

    @property
    def undecoded(self) -> int:
        return self.t.undecoded

    @property
    def dropped(self) -> int:
        return self.t.dropped

    # -- tables -------------------------------------------------------------------
    def tables(self, names: dict[int, str]) -> dict[str, pa.Table]:
        """The columns recorded so far; ``names``: function names by entry address."""
        self.drain()
        return {"writes": self._write_table(), "events": self._event_table(), "io": self._io_table(),
                "calls": self._call_table(names), "hot": self._hot_table()}

    def _write_table(self) -> pa.Table:
        w = np.concatenate(self._writes) if self._writes else np.zeros(0, _WRITE)
        sizes = w["size"].astype("<i8")
        new_off = np.zeros(len(w) + 1, "<i8")
        np.cumsum(sizes, out=new_off[1:])
        has_old = w["has_old"].astype(bool)
        old_off = np.zeros(len(w) + 1, "<i8")
        np.cumsum(np.where(has_old, sizes, 0), out=old_off[1:])
        new = pa.Array.from_buffers(pa.large_binary(), len(w),
                                    [None, pa.py_buffer(new_off), pa.py_buffer(b"".join(self._new))])
        validity = pa.py_buffer(np.packbits(has_old, bitorder="little").tobytes())
        old = pa.Array.from_buffers(pa.large_binary(), len(w),
                                    [validity, pa.py_buffer(old_off), pa.py_buffer(b"".join(self._old))],
                                    null_count=int(len(w) - has_old.sum()))
        frame = w["kind"] == lib.RR_WRITE_FRAME
        return pa.table({
            "pos": pa.array(w["pos"], pa.uint64()), "rip": pa.array(w["rip"], pa.uint64()),
            "vaddr": pa.array(w["va"], pa.uint64()), "paddr": pa.array(w["pa"], pa.uint64()),
            "size": pa.array(w["size"], pa.uint32()),
            "old": old.cast(pa.binary()), "new": new.cast(pa.binary()),
            "kind": pa.array(np.where(frame, "frame", "store")).dictionary_encode(),
            "vector": pa.array(w["vector"].astype("<u2"), pa.uint16(), mask=~frame)})

    def _event_table(self) -> pa.Table:
        e = np.concatenate(self._events) if self._events else np.zeros(0, _EVENT)
        return pa.table({
            "pos": pa.array(e["pos"], pa.uint64()), "vector": pa.array(e["vector"], pa.uint16()),
            "rip": pa.array(e["rip"], pa.uint64()), "handler": pa.array(e["handler"], pa.uint64()),
            "kind": pa.array([EVENT_KINDS.get(k, str(k)) for k in e["kind"].tolist()], pa.string())})

    def _io_table(self) -> pa.Table:
        rows = self.io
        return pa.table({
            "pos": pa.array([r[0] for r in rows], pa.uint64()), "rip": pa.array([r[1] for r in rows], pa.uint64()),
            "port": pa.array([r[2] for r in rows], pa.uint16()), "size": pa.array([r[3] for r in rows], pa.uint8()),
            "value": pa.array([r[4] for r in rows], pa.uint64()),
            "direction": pa.array(["out" if r[5] else "in" for r in rows], pa.string())})

    def _call_table(self, names: dict[int, str]) -> pa.Table:
        c = np.concatenate(self._calls) if self._calls else np.zeros(0, _CALL)
        rips = c["rip"].tolist()
        return pa.table({"pos": pa.array(c["pos"], pa.uint64()), "rip": pa.array(c["rip"], pa.uint64()),
                         "function": pa.array([names.get(r, "") for r in rips], pa.string())})

    def _hot_table(self) -> pa.Table:
        items = sorted(self._hist.items())
        return pa.table({"rip": pa.array([k for k, _ in items], pa.uint64()),
                         "count": pa.array([n for _, n in items], pa.uint64())})
