"""One segment of a recording, replayed and recorded: the work a Dask task does.

A segment runs from a recorded marker's full state to the next marker (or
the end), on whatever machine the task lands on: ``run_segment`` gets the
recording's bytes (no shared file system), keeps one copy of them per
worker process, replays the segment once with a ``StepRecorder`` attached,
and returns its tables as Parquet bytes.  An exact recording's segment is
checked where it ends: the engine compares the machine with the next
marker's digest (registers, devices and every page written since the
segment's marker), so a segment that does not follow the recording fails
with the markers it lies between, never with plausible tables.
"""
from __future__ import annotations

import atexit
import hashlib
import io
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional


class SegmentError(Exception):
    pass


@dataclass(frozen=True)
class Segment:
    number: int                  # 0, 1, ... in recording order
    marker: Optional[int]        # the recorded marker it starts at (None: the recording's first position)
    start: int                   # instruction count
    end: Optional[int]           # the next marker's position; None: the end of the recording
    next_marker: Optional[int]

    def words(self) -> str:
        a = f"m{self.marker}" if self.marker is not None else str(self.start)
        b = f"m{self.next_marker}" if self.next_marker is not None else "the end"
        return f"segment {a}..{b}"


_copies: dict[str, str] = {}
_folder: Optional[str] = None


def _local_copy(data: bytes, digest: str) -> str:
    """This process's copy of the recording (written once, removed when the process exits)."""
    global _folder
    path = _copies.get(digest)
    if path is not None and os.path.exists(path):
        return path
    if _folder is None:
        _folder = tempfile.mkdtemp(prefix="rrstub-index-")
        atexit.register(shutil.rmtree, _folder, True)
    if hashlib.sha256(data).hexdigest()[:32] != digest:
        raise SegmentError("the recording's bytes were damaged on their way to the worker")
    path = os.path.join(_folder, digest + ".rrr")
    with open(path + ".part", "wb") as f:
        f.write(data)
    os.rename(path + ".part", path)
    _copies[digest] = path
    return path


PROGRESS_TOPIC = "rrstub-index-progress"
PROGRESS_EVERY = 5.0        # seconds between a running segment's progress reports


def _this_worker():
    """The Dask worker running this task (None outside one); only the task's own thread knows it."""
    try:
        from distributed import get_worker
        return get_worker()
    except (ImportError, ValueError):
        return None


def _report_progress(worker, seg: Segment, ctl, done: threading.Event) -> None:
    """On a Dask worker: how far the segment is, every PROGRESS_EVERY seconds (the client prints it)."""
    if worker is None:
        return
    while not done.wait(PROGRESS_EVERY):
        worker.log_event(PROGRESS_TOPIC, {"segment": seg.number, "done": int(ctl.icount) - seg.start})


def _parquet(table) -> bytes:
    import pyarrow.parquet as pq
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def run_segment(data: bytes, digest: str, seg: Segment) -> dict:
    """Replay ``seg`` of the recording in ``data`` (sha256 prefix ``digest``) and record it.

    Returns {"tables": {name: parquet bytes}, "instructions", "seconds", "undecoded",
    "dropped", "markers": {index: position}, "last"}.
    """
    from rrstub.index.capture import StepRecorder
    from rrstub.recording import RecordingError
    from rrstub.replay.timeline import Timeline, TimelineError

    path = _local_copy(data, digest)
    try:
        t = Timeline(path)
    except (RecordingError, TimelineError) as e:
        raise SegmentError(f"{seg.words()}: {e}") from None
    try:
        t.checkpoint_every = 0
        e = t.engine
        t.goto(seg.start)
        if t.mode == "exact" and seg.marker is not None:
            meta = next(m.meta for m in t.rec.markers if m.meta.get("index") == seg.marker)
            e.markers.last_digest = bytes.fromhex(meta["digest"])
            e.markers.count = seg.marker + 1
            e.markers.tracker.reset()
            e.verify_markers = True
        symbols = [s for s in t.machine.kernel.symbols() if s.kind in "TtWw" and s.address]
        names = {s.address: s.name for s in symbols}
        rec = StepRecorder(list(names))
        rec.attach(e)
        started = time.monotonic()
        done = threading.Event()
        reporter = threading.Thread(target=_report_progress, args=(_this_worker(), seg, e.ctl, done), daemon=True)
        reporter.start()
        try:
            end = seg.end if seg.end is not None else t.last
            stop = t.forward(end) if end is not None else t.cont()
        finally:
            done.set()
            reporter.join()
            rec.detach()
        seconds = time.monotonic() - started
        if seg.end is not None and t.position != seg.end:
            raise SegmentError(f"{seg.words()}: replay ended at instruction {t.position} ({stop.detail}), "
                               f"before the next marker at {seg.end}")
        tables = rec.tables(names)
        return {"tables": {k: _parquet(v) for k, v in tables.items()},
                "instructions": t.position - seg.start, "steps": rec.steps, "seconds": seconds,
                "undecoded": rec.undecoded, "dropped": rec.dropped,
                "markers": dict(t.recorded_at), "last": t.position}
    except TimelineError as err:
        raise SegmentError(f"{seg.words()}: {err}") from None
    finally:
        t.close()
