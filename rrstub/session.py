"""Recording and replaying a whole run: the engines wired to a Machine and a recording file.

``record()`` boots a kernel under an engine and writes a recording;
``replay()`` rebuilds the machine from a recording and runs it again.  Both
turn every way a run can end (the guest's exit, a crash, a hang, --timeout,
Ctrl-C, a divergence) into an ``Outcome`` or one exception with a message
for the user.

Invariants: a recording is always finished (END, index, trailer) when the
recorder ends in any way but being killed or the disk filling up (Ctrl-C
and SIGTERM included: ``Terminated``); a killed recorder leaves every chunk
written so far readable, and its events reach the file at least every
``engines.FLUSH_INTERVAL_NS`` of host time.
"""
from __future__ import annotations

import hashlib
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from rrstub import __version__
from rrstub import events as ev
from rrstub.engines import (DEFAULT_MARKER_EVERY_NS, EVENT_POSITIONS, FLUSH_CHECK_EVERY, GUEST_ENDS,
                            NOMINAL_PS_PER_INSTR,
                            Divergence, Engine, ExactEngine, FastEngine, FastStepEngine, LogSink, LogSource, Outcome,
                            describe_entry, place)
from rrstub.markers import MarkerError, decode_marker
from rrstub.recording import ChunkKind, Recording, RecordingWriter
from vmm import boot
from vmm.boot.kernel import Kernel, open_kernel as open_kernel_bytes, open_kernel_file
from vmm.kvm import host_monotonic_ns
from vmm.machine import (EXIT_CRASH, EXIT_HUNG, EXIT_TIMEOUT, GuestCrashed, GuestHung, GuestTimeout,
                         Machine, MachineError)

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # SIGTERM (128 + 15): stopped like Ctrl-C, the recording finished
EXIT_INCOMPLETE = 65   # replay reached the end of an incomplete recording
EXIT_DIVERGED = 66     # replay no longer matched the recording
EXIT_QUOTA = 75        # recording stopped at --quota

ENGINES = {"exact": ExactEngine, "fast": FastEngine}
_REASON_OF = {GuestCrashed: "crash", GuestHung: "hung", GuestTimeout: "timeout"}


def exit_status(outcome: Outcome) -> int:
    """The `rrstub record`/`replay` exit status for how a run ended."""
    return {"exit": outcome.status, "reset": 0, "poweroff": 0, "crash": EXIT_CRASH, "hung": EXIT_HUNG,
            "timeout": EXIT_TIMEOUT, "interrupted": outcome.status or EXIT_INTERRUPTED, "until": 0,
            "incomplete": EXIT_INCOMPLETE, "cropped": 0, "quota": EXIT_QUOTA,
            "stopped": 0}.get(outcome.reason, 1)


class HashingStream:
    """A byte stream that also hashes and counts what passes through it."""

    def __init__(self, stream: Optional[BinaryIO]):
        self.stream = stream
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.count += len(data)
        if self.stream is not None:
            self.stream.write(data)
        return len(data)

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()

    def fileno(self) -> int:
        if self.stream is None:
            raise OSError("no stream")
        return self.stream.fileno()


@dataclass
class RecordResult:
    outcome: Outcome
    mode: str
    path: str
    markers: int
    host_seconds: float
    file_bytes: int
    raw_bytes: int
    counts: dict = field(default_factory=dict)
    message: str = ""        # the crash/hang/timeout report, if any
    rolling: Optional[dict] = None   # what rolling/quota recording dropped


class QuotaReached(Exception):
    """The recording reached --quota and cannot drop anything: recording stops."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, systemd and CI send): stop the way Ctrl-C does.

    A KeyboardInterrupt, so that every place that ends a run cleanly on
    Ctrl-C (finishing a recording, closing a server) does so here too.
    """

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)

    @staticmethod
    def handler(signum, frame):
        raise Terminated(signum)


def interruption(e: KeyboardInterrupt) -> tuple[int, str, str]:
    """(exit status, what stopped the run, the word for it) of a Ctrl-C or a SIGTERM."""
    if isinstance(e, Terminated):
        return EXIT_TERMINATED, "SIGTERM", "terminated (SIGTERM)"
    return EXIT_INTERRUPTED, "Ctrl-C", "interrupted"


class SerialHashes(HashingStream):
    """Serial output hashed as a whole and from each marker of the recording on.

    A rolling recording keeps only the run after some marker; its summary
    must hash the output replay of that part produces.
    """

    def __init__(self, stream: Optional[BinaryIO]):
        super().__init__(stream)
        self.since: dict[int, list] = {}

    def write(self, data: bytes) -> int:
        for h in self.since.values():
            h[0].update(data)
            h[1] += len(data)
        return super().write(data)

    def mark(self, position: int) -> None:
        self.since.setdefault(position, [hashlib.sha256(), 0])

    def keep_from(self, position: int) -> None:
        self.since = {p: h for p, h in self.since.items() if p >= position}

    def from_position(self, position: int) -> tuple[int, str]:
        h = self.since.get(position)
        return (self.count, self.hash.hexdigest()) if h is None else (h[1], h[0].hexdigest())


ROLLING_SLACK = 1.5      # rebase when the file covers this many windows
QUOTA_HIGH = 0.75        # rolling quota: make room when the file reaches this share of --quota
QUOTA_KEEP = 0.5         # ... keeping at most this share


class RecordingOutput:
    """The file a recorder writes, with --quota and --rolling applied to it.

    Markers pass through ``on_marker`` (the engine's marker sink); every
    chunk through ``on_chunk``.  Without rolling, reaching the quota stops
    the recording (``QuotaReached``).  With rolling, the recording is
    rebased onto a later marker (``edit.rebase``) when it covers more than
    the window, or when it nears the quota; the file is always a complete
    recording up to its last chunk.
    """

    def __init__(self, writer: RecordingWriter, engine: Engine, sink: LogSink, out: SerialHashes, *,
                 quota: Optional[int] = None, rolling_ns: Optional[int] = None,
                 warn: Callable[[str], None] = lambda m: None):
        self.writer = writer
        self.path = writer.path
        self.engine = engine
        self.sink = sink
        self.out = out
        self.quota = quota
        self.rolling_ns = rolling_ns
        self.warn = warn
        self.stopped = False
        self.markers: list[dict] = []        # metas of the markers in the file, with "offset"
        self.rebases = 0
        self.dropped_bytes = 0
        self.first_meta: Optional[dict] = None
        writer.after_chunk = self.on_chunk

    @property
    def rolling(self) -> bool:
        return self.rolling_ns is not None

    def start(self, blob: bytes, meta: dict) -> None:
        """The recording's first marker."""
        info = self.writer.add_marker(meta, blob)
        self.first_meta = meta
        self.markers = [dict(meta, offset=info.offset, stored=info.stored_size)]
        self.out.mark(meta["position"])

    def on_marker(self, blob: bytes, meta: dict) -> None:
        info = self.writer.add_marker(meta, blob)
        self.markers.append(dict(meta, offset=info.offset))
        self.out.mark(meta["position"])
        if self.stopped:
            return
        target = self._rebase_target(meta)
        if target is not None:
            self._rebase(*target)

    def on_chunk(self, info) -> None:
        if self.stopped or self.quota is None:
            return
        size = self.writer.bytes_written + self._tail_estimate()
        if not self.rolling:
            if size >= self.quota:
                self.stopped = True
                raise QuotaReached()
        elif size >= self.quota * QUOTA_HIGH and not self.engine.marker_requested:
            self.engine.request_marker("quota", "quota")    # rebase there (on_marker)

    def _tail_estimate(self) -> int:
        """What finishing adds: END, INDEX, trailer."""
        return 1024 + 64 * len(self.writer.chunks)

    def _rebase_target(self, meta: dict) -> Optional[tuple[int, str]]:
        """The index of the marker to rebase onto now and why, if the recording should be rebased."""
        if len(self.markers) < 2 or self.rolling_ns is None:
            return None
        choice = None
        now = meta.get("guest_ns", 0)
        if now - self.markers[0].get("guest_ns", 0) >= self.rolling_ns * ROLLING_SLACK:
            fits = [i for i, m in enumerate(self.markers) if m.get("guest_ns", 0) <= now - self.rolling_ns]
            if fits and fits[-1] > 0:
                choice = (fits[-1], f"it covered more than {ROLLING_SLACK:g} x the "
                                    f"{self.rolling_ns / 1e9:g} s window")
        if self.quota is not None:
            written = self.writer.bytes_written
            if written + self._tail_estimate() >= self.quota * QUOTA_HIGH:
                full = self.markers[0].get("stored", 0) or 0
                keep = [i for i, m in enumerate(self.markers)
                        if i > 0 and written - m["offset"] + full <= self.quota * QUOTA_KEEP]
                pick = keep[0] if keep else len(self.markers) - 1
                if choice is None or pick > choice[0]:
                    choice = (pick, f"it neared --quota {self.quota} bytes")
        return choice

    def _rebase(self, index: int, why: str) -> None:
        from rrstub import edit
        old_first = self.markers[0]
        target = self.markers[index]
        before = self.writer.bytes_written
        last = index == len(self.markers) - 1
        resume = ("after_landmark" if self.engine.point_landmark else "after_point") if last else None
        self.rebases += 1
        extra = {"rolling": {
            "window_s": None if self.rolling_ns is None else self.rolling_ns / 1e9,
            "quota": self.quota, "rebases": self.rebases,
            "dropped_to_position": target["position"], "dropped_guest_ns": target.get("guest_ns", 0)}}
        writer, copied = edit.rebase(self.path, self.writer, index, extra, resume=resume)
        writer.after_chunk = self.on_chunk
        self.writer = writer
        self.sink.writer = writer
        self.sink.counts = dict(copied.counts)
        self.engine.markers.count -= index
        kept = writer.chunks
        offsets = [c.offset for c in kept if c.kind is ChunkKind.MARKER]
        self.markers = [dict(m, index=m["index"] - index, offset=o)
                        for m, o in zip(self.markers[index:], offsets)]
        self.markers[0]["stored"] = next(c.stored_size for c in kept if c.kind is ChunkKind.MARKER)
        self.first_meta = self.markers[0]
        self.out.keep_from(target["position"])
        self.dropped_bytes += max(0, before - writer.bytes_written)
        self.warn(f"rolling: dropped guest time {old_first.get('guest_ns', 0) / 1e9:.3f}.."
                  f"{target.get('guest_ns', 0) / 1e9:.3f} s ({why}); {self.path} now starts at "
                  f"{place(self.engine.unit, target['position'])} and is {writer.bytes_written} bytes")
        if self.quota is not None and writer.bytes_written + self._tail_estimate() >= self.quota:
            self.stopped = True
            raise QuotaReached()

    def finish(self, outcome: Outcome, started: int, machine: Machine, extra: Optional[dict] = None) -> dict:
        """End the recording here: END event, summary, index; returns the summary."""
        self.stopped = True
        engine, sink = self.engine, self.sink
        sink.emit(ev.End(outcome.position, outcome.reason, outcome.status, outcome.detail[:4000]))
        sink.flush(outcome.position)
        summary = {
            "reason": outcome.reason, "status": outcome.status, "end_position": outcome.position,
            "guest_ns": outcome.guest_ns, "unit": engine.unit, "markers": engine.markers.count,
            "exits": machine.exits, "events": dict(sink.counts),
            "host_seconds": (host_monotonic_ns() - started) / 1e9,
            "landmarks": getattr(engine, "landmarks", 0),
            "relocated_landmarks": getattr(engine, "relocated", 0),
            "delayed_deliveries": getattr(engine, "delayed", 0),
        }
        summary.update(self.summary_extra())
        summary.update(extra or {})
        self.writer.finish(summary)
        return summary

    def summary_extra(self) -> dict:
        first = self.first_meta or {"position": 0, "guest_ns": 0}
        serial_bytes, serial_sha = self.out.from_position(first["position"])
        extra = {"serial_bytes": serial_bytes, "serial_sha256": serial_sha,
                 "first_position": first["position"], "first_guest_ns": first.get("guest_ns", 0)}
        if self.rebases or self.quota is not None or self.rolling:
            extra["rolling"] = {"window_s": None if self.rolling_ns is None else self.rolling_ns / 1e9,
                                "quota": self.quota, "rebases": self.rebases,
                                "dropped_bytes": self.dropped_bytes,
                                "kept_from_position": first["position"],
                                "kept_from_guest_ns": first.get("guest_ns", 0)}
        return extra


def _guest_string(machine: Machine, vaddr: int, limit: int = 64) -> str:
    """A NUL-terminated string the guest passed by virtual address ('' if unreadable)."""
    from vmm import paging
    if not vaddr:
        return ""
    s = machine.vcpu.get_sregs()
    out = b""
    try:
        while len(out) < limit:
            chunk = paging.read_virtual(machine.mem, s.cr0, s.cr3, s.cr4, s.efer, vaddr + len(out), 16)
            out += chunk
            if b"\0" in chunk:
                break
    except Exception:       # an unmapped address: no name
        return ""
    text = out.split(b"\0", 1)[0][:limit].decode("utf-8", "replace")
    return "".join(c if c.isprintable() and not c.isspace() else "_" for c in text)


def install_replay_hypercalls(machine: Machine, rec: Recording) -> None:
    """Replay: hypercalls answer what they answered while recording."""
    from vmm.devices.hypercall import HC_RECORD_START, HC_RECORD_STOP
    if rec.config.get("guest_controlled"):
        machine.hypercalls.handlers[HC_RECORD_START] = lambda regs: 0
        machine.hypercalls.handlers[HC_RECORD_STOP] = lambda regs: 0


def install_marker_hypercall(machine: Machine, engine: Engine) -> None:
    """HC_MARKER while recording: a marker named by the guest at the next point."""
    from vmm.devices.hypercall import HC_MARKER
    count = [0]

    def marker(regs) -> int:
        count[0] += 1
        name = _guest_string(machine, regs.rbx) or f"hypercall-{count[0]}"
        engine.request_marker(name, "hypercall")
        return 0
    machine.hypercalls.handlers[HC_MARKER] = marker


def new_config(mode: str, mode_reason: str, mem_size: int, cmdline: str, epoch: int, nominal_ps: int,
               marker_every_ns: int, serial_input: bool) -> dict:
    from rrstub.edit import new_id
    return {
        "mode": mode, "mode_reason": mode_reason, "mem_size": mem_size, "cmdline": cmdline,
        "rtc_epoch_ns": epoch, "ps_per_instr": nominal_ps,
        "marker_every_ns": marker_every_ns, "rrstub": __version__, "id": new_id(),
        "host": {"name": platform.node(), "kernel": platform.release(), "machine": platform.machine()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "serial_input": serial_input,
        "positions": EVENT_POSITIONS,
    }


def record(kernel_path: str, out_path: str, mode: str, *, mem_size: int, cmdline: str = "",
           serial_in: Optional[BinaryIO] = None, serial_out: Optional[BinaryIO] = None,
           timeout: Optional[float] = None, marker_every_ns: int = DEFAULT_MARKER_EVERY_NS,
           mode_reason: str = "", nominal_ps: int = NOMINAL_PS_PER_INSTR, cpl3_landmarks: bool = False,
           quota: Optional[int] = None, rolling_ns: Optional[int] = None,
           keys: Optional[BinaryIO] = None,
           warn: Callable[[str], None] = lambda m: None) -> RecordResult:
    """Record one run of ``kernel_path`` into ``out_path``; raises BootError for a bad kernel.

    ``keys``: a terminal to read marker keys from (``m``), or None.
    """
    r = _Recorder(kernel_path, out_path, mode, mem_size=mem_size, cmdline=cmdline, serial_in=serial_in,
                  serial_out=serial_out, marker_every_ns=marker_every_ns, mode_reason=mode_reason,
                  nominal_ps=nominal_ps, cpl3_landmarks=cpl3_landmarks)
    started = host_monotonic_ns()
    output = RecordingOutput(r.writer, r.engine, r.sink, r.out, quota=quota, rolling_ns=rolling_ns, warn=warn)
    machine = None
    try:
        machine = r.boot(output, serial_in, warn)
        return _run_recording(r.engine, machine, lambda: output, started, timeout=timeout, quota=quota,
                              keys=keys, warn=warn)
    finally:
        output.writer.close()
        if machine is not None:
            machine.close()


class _Recorder:
    """What a recorder needs before the machine exists: the kernel, its config, log, engine, output."""

    def __init__(self, kernel_path: str, path: str, mode: str, *, mem_size: int, cmdline: str,
                 serial_in: Optional[BinaryIO], serial_out: Optional[BinaryIO], marker_every_ns: int,
                 mode_reason: str, nominal_ps: int, cpl3_landmarks: bool, config_extra: Optional[dict] = None):
        kernel = kernel_path if isinstance(kernel_path, Kernel) else open_kernel_file(kernel_path)
        self.image = kernel
        self.kernel_name = kernel.name
        self.kernel_bytes = kernel.data
        self.epoch = time.time_ns()
        self.config = new_config(mode, mode_reason, mem_size, cmdline, self.epoch, nominal_ps, marker_every_ns,
                                 serial_in is not None)
        if kernel.linux:
            self.config["boot"] = kernel.protocol
        self.config.update(config_extra or {})
        self.kernel_args = {"kernel_name": kernel.name, "kernel_bytes": kernel.data,
                            "initrd": kernel.initrd, "initrd_name": kernel.initrd_name}
        self.writer = RecordingWriter(path, self.config, **self.kernel_args)
        self.sink = LogSink(self.writer)
        kw = {"ps_per_instr": nominal_ps} if mode == "exact" else {"cpl3_landmarks": cpl3_landmarks}
        self.engine = ENGINES[mode](sink=self.sink, marker_every_ns=marker_every_ns, **kw)
        self.out = SerialHashes(serial_out if serial_out is not None else sys.stdout.buffer)

    def boot(self, output: "RecordingOutput", serial_in: Optional[BinaryIO],
             warn: Callable[[str], None]) -> Machine:
        """The machine, booted and attached, with ``output`` holding the initial marker."""
        c = self.config
        machine = Machine(self.image, c["mem_size"], c["cmdline"], serial_in=serial_in, serial_out=self.out,
                          warn=warn, clock=self.engine.clock, rtc_epoch_ns=self.epoch, dirty_log=True)
        try:
            self.engine.attach(machine)
            install_marker_hypercall(machine, self.engine)
            self.engine.marker_sink = output.on_marker
            output.start(*self.engine.initial_marker())
        except BaseException:
            machine.close()
            raise
        return machine


def _run_recording(engine: Engine, machine: Machine, output_of: Callable[[], "RecordingOutput"],
                   started: int, *, timeout: Optional[float], quota: Optional[int],
                   keys: Optional[BinaryIO], warn: Callable[[str], None],
                   kept: Optional[Callable[[], Optional[str]]] = None) -> RecordResult:
    """Run a recording engine to the end of the run and finish the file it records to then.

    ``kept``: the path of the recording the user keeps, if one is being
    written now (default: the output's file); None when the output is a
    scratch file (the message for a stop by signal names only what is kept).
    """
    message = ""
    if timeout is not None:
        engine.end_host_ns = host_monotonic_ns() + int(timeout * 1e9)
    previous_usr1 = _on_marker_signal(engine)
    key_reader = _marker_keys(keys, engine, warn)
    _flush_while_stepping(engine)
    stopped_by = None
    try:
        outcome = engine.run()
    except MachineError as e:
        reason = _REASON_OF.get(type(e), "crash")
        message = str(e) if reason != "timeout" else _timeout_message(machine, engine, timeout)
        outcome = Outcome(reason, e.exit_code, engine.position, engine.guest_now(), message)
    except QuotaReached:
        message = (f"the recording reached --quota {quota} bytes at "
                   f"{place(engine.unit, engine.position)} and stopped there (use --rolling to "
                   "keep the latest part instead)")
        outcome = Outcome("quota", EXIT_QUOTA, engine.position, engine.guest_now(), message)
    except KeyboardInterrupt as e:
        status, stopped_by, _ = interruption(e)
        outcome = Outcome("interrupted", status, engine.position, engine.guest_now(),
                          f"the recording was stopped with {stopped_by}")
    finally:
        signal.signal(signal.SIGUSR1, previous_usr1)
        if key_reader is not None:
            key_reader.close()
    output = output_of()
    summary = output.finish(outcome, started, machine)
    writer = output.writer
    if stopped_by is not None:
        path = writer.path if kept is None else kept()
        message = (f"{stopped_by} stopped the run at {place(engine.unit, engine.position)}" if path is None
                   else f"{stopped_by} stopped the recording at {place(engine.unit, engine.position)}: "
                        f"{path} is finished and replays up to there")
    return RecordResult(outcome, engine.mode, writer.path, engine.markers.count,
                        summary["host_seconds"], writer.bytes_written, writer.raw_bytes,
                        dict(output.sink.counts), message, summary.get("rolling"))


def _flush_while_stepping(engine: Engine) -> None:
    """Exact recording: look at the log's flush clock every FLUSH_CHECK_EVERY instructions.

    Its points can be sparse in host time (a guest that takes no interrupt
    and does no I/O logs only a sync each millisecond of guest time, which
    stepping may stretch far), and a killed recorder keeps only what reached
    the file.  The engine's boundary hook reads ``engine.sink`` when it
    runs, so a guest-controlled recording that switches logs is covered.
    """
    if not isinstance(engine, ExactEngine):
        return

    def boundary() -> None:
        engine.sink.maybe_flush(engine.position)
        engine.boundary_at = engine.icount + FLUSH_CHECK_EVERY
    engine.boundary_at = engine.icount + FLUSH_CHECK_EVERY
    engine.on_boundary = boundary


@dataclass(frozen=True)
class RecordedMarker:
    """A fast recording's marker as a target: its instruction count is known once replay reaches it."""
    index: int

    def __str__(self) -> str:
        return f"m{self.index}"


def seek(engine: Engine, rec: Recording, source: LogSource, position) -> int:
    """Replay: restore the last recorded marker at or before ``position``; returns its index.

    Memory comes from the page sets of markers 0..k, the rest of the state
    from marker k; the log resumes after the point that carries marker k.
    A fast recording replayed instruction by instruction starts from its
    first marker: the instruction counts of the later ones are not known.
    """
    if isinstance(engine, FastStepEngine):
        return 0
    k = 0
    for i, m in enumerate(rec.markers):
        if m.meta["position"] <= position:
            k = i
    if k == 0:
        return 0
    try:
        states = [decode_marker(rec.payload(rec.markers[i])) for i in range(k + 1)]
    except MarkerError as e:
        raise ReplayError(f"{rec.path}: a marker before position {position} is unusable: {e}") from None
    engine.restore(states[k], [st.pages for st in states[:k]])
    while True:
        e = source.peek()
        if e is None:
            raise ReplayError(f"{rec.path}: marker m{k} has no point in the log after it")
        source.pop()
        if isinstance(e, ev.Point) and e.marker == k:
            engine.resume("after_landmark" if e.landmark is not None else "after_point")
            return k


def resolve_position(rec: Recording, text: str, what: str = "--until"):
    """A position the user named for option ``what``: a number, mN, or a marker's or label's name.

    Positions are instruction counts; a fast recording's markers are logged
    at exit numbers, so one of them resolves to a ``RecordedMarker`` that
    the replay finds.  Raises ValueError with the message for the user,
    also for a number outside the recording (``Recording.position_range``;
    a fast recording's end is not known in instructions before a replay).
    """
    t = text.strip()
    fast = rec.config.get("mode") == "fast"
    if t[:1] in "mM" and t[1:].isdigit():
        index = int(t[1:])
        if index >= len(rec.markers):
            raise ValueError(f"{what} {text}: the recording has markers m0..m{len(rec.markers) - 1}")
        if fast:
            return RecordedMarker(index) if index else 0
        return rec.markers[index].meta["position"]
    named = [(RecordedMarker(i) if i else 0) if fast else m.meta["position"]
             for i, m in enumerate(rec.markers) if m.meta.get("name") == t]
    named += [x["position"] for x in rec.labels if x["name"] == t]
    if named:
        return named[0]
    try:
        value = int(t, 0)
    except ValueError:
        raise ValueError(f"{what} {text!r}: give a position (a number), a marker (m0, m1, ...) or a "
                         "marker or label name (`rrstub info` lists them)") from None
    if fast:
        if value < 0:
            raise ValueError(f"{what} {text}: positions are instruction counts from 0")
        return value
    first, last = rec.position_range()
    if not first <= value <= last:
        units = ENGINES[rec.config["mode"]].unit + "s" if rec.config.get("mode") in ENGINES else "positions"
        where = (f"it ends before reaching {value}" if value > last
                 else f"it starts at {first}" + (" (a crop, a branch or a rolling recording)" if first else ""))
        raise ValueError(f"{what} {text}: the recording has {units} {first}..{last}; {where}")
    return value


def go_live(path: str, at: str, *, out_path: Optional[str] = None, serial_in: Optional[BinaryIO] = None,
            serial_out: Optional[BinaryIO] = None, timeout: Optional[float] = None,
            kernel_check: Optional[str] = None, keys: Optional[BinaryIO] = None,
            warn: Callable[[str], None] = lambda m: None) -> RecordResult:
    """Replay ``path`` to ``at``, then run on live from that exact state.

    With ``out_path`` the live run is recorded as a branch: a recording that
    starts with a full marker of the state at the branch point and names
    ``path`` as its parent.  Without it, the run is recorded to a scratch
    file that is deleted at the end (the recorder is what runs the guest).
    """
    import tempfile
    from rrstub.edit import recording_id, unlink_quietly
    rec = Recording.open(path)
    machine = None
    scratch = None
    try:
        try:
            position = resolve_position(rec, at, "--go-live")
        except ValueError as e:
            raise ReplayError(str(e)) from None
        config = rec.config
        mode = config.get("mode")
        out = SerialHashes(serial_out if serial_out is not None else sys.stdout.buffer)
        engine, machine, source = _replay_machine(rec, kernel_check, out, warn, until=position, stepping=True)
        seek(engine, rec, source, position)
        try:
            outcome = engine.run()
        except MachineError as e:      # the recording ends there: a hung or crashed guest
            outcome = Outcome(_REASON_OF.get(type(e), "crash"), e.exit_code, engine.position, engine.guest_now())
        if outcome.reason != "until":
            known = (f"{path} has {engine.unit}s {'..'.join(map(str, rec.position_range()))}"
                     if mode == "exact" else f"{path} ends at {place(engine.unit, outcome.position)}")
            if isinstance(position, int) and outcome.position >= position:
                raise ReplayError(f"--go-live {at}: the recording ends there ({outcome.reason}): the guest "
                                  "cannot go on from its last position; go live from an earlier one "
                                  f"({known})")
            raise ReplayError(f"--go-live {at}: the replay ended ({outcome.reason}) at "
                              f"{place(engine.unit, outcome.position)}, before reaching {position}; {known}")
        position = engine.position
        if isinstance(engine, FastStepEngine):
            engine = engine.live()      # the live part runs freely, recorded by the fast engine
        warn(f"live from {place('instruction', position)} ({engine.guest_now() / 1e9:.6f} s of guest time): "
             + (f"recording the branch to {out_path}" if out_path else "not recorded (give -o to keep it)"))
        if out_path is None:
            fd, scratch = tempfile.mkstemp(prefix="rrstub-live-", suffix=".rrr")
            os.close(fd)
        branch_config = dict(config)
        branch_config.update(new_config(mode, f"branch of {os.path.basename(path)}", config["mem_size"],
                                        config["cmdline"], config["rtc_epoch_ns"], config["ps_per_instr"],
                                        config["marker_every_ns"], serial_in is not None))
        branch_config["parent"] = {"id": recording_id(rec), "file": os.path.abspath(path),
                                   "position": position, "unit": "instruction", "at": at,
                                   "guest_ns": engine.guest_now()}
        writer = RecordingWriter(out_path or scratch, branch_config, **rec.kernel_args())
        sink = LogSink(writer)
        output = RecordingOutput(writer, engine, sink, out, warn=warn)
        if serial_in is not None:
            machine.attach_serial_in(serial_in)
        engine.start_recording(sink, output.on_marker)
        install_marker_hypercall(machine, engine)
        out.since.clear()
        output.start(*engine.initial_marker(origin="branch"))
        try:
            return _run_recording(engine, machine, lambda: output, host_monotonic_ns(), timeout=timeout,
                                  quota=None, keys=keys, warn=warn, kept=lambda: out_path)
        finally:
            output.writer.close()
    finally:
        if machine is not None:
            machine.close()
        rec.close()
        if scratch is not None:
            unlink_quietly(scratch)


class GuestControl:
    """`rrstub run --allow-guest-record -o REC`: the guest starts and stops recording.

    The run goes under a recording engine from the start (so that it can
    record from any point), writing to a scratch file until the guest calls
    HC_RECORD_START.  Then, at the next point, after that point's deliveries
    and before its interrupt injection, REC starts with a full marker of the
    machine; HC_RECORD_STOP ends it the same way, at its next point.  One
    recording per run: later starts are refused (HC_DENIED) with a warning.
    """

    def __init__(self, engine: Engine, machine: Machine, out: SerialHashes, path: str, config: dict,
                 kernel_args: dict, scratch: "RecordingOutput",
                 warn: Callable[[str], None]):
        from vmm.devices.hypercall import HC_RECORD_START, HC_RECORD_STOP
        self.engine, self.machine, self.out = engine, machine, out
        self.path, self.config = path, config
        self.kernel_args = kernel_args
        self.output = scratch
        self.scratch = scratch
        self.warn = warn
        self.state = "waiting"        # waiting -> starting -> recording -> stopping -> done
        self.summary: Optional[dict] = None
        self.started = host_monotonic_ns()
        machine.hypercalls.handlers[HC_RECORD_START] = self._start
        machine.hypercalls.handlers[HC_RECORD_STOP] = self._stop
        engine.before_injection = self._switch

    def _start(self, regs) -> int:
        from vmm.devices.hypercall import HC_DENIED
        if self.state in ("starting", "recording"):
            return 0
        if self.state != "waiting":
            self.warn("the guest asked to record again: one recording per run; refused (HC_DENIED)")
            return HC_DENIED
        self.state = "starting"
        return 0

    def _stop(self, regs) -> int:
        if self.state == "starting":
            self.state = "waiting"
        elif self.state == "recording":
            self.state = "stopping"
        return 0

    def _switch(self, landmark: bool) -> None:
        e = self.engine
        if self.state == "starting":
            writer = RecordingWriter(self.path, self.config, **self.kernel_args)
            sink = LogSink(writer)
            self.output = RecordingOutput(writer, e, sink, self.out, warn=self.warn)
            e.sink = sink
            e.marker_sink = self.output.on_marker
            self.out.since.clear()
            self.output.start(*e.initial_marker("guest-start", "after_landmark" if landmark else "after_point"))
            self.started = host_monotonic_ns()
            self.state = "recording"
            self.warn(f"the guest started recording at {place(e.unit, e.position)}: {self.path}")
        elif self.state == "stopping":
            outcome = Outcome("stopped", 0, e.position, e.guest_now(), "the guest stopped recording")
            self.summary = self.output.finish(outcome, self.started, self.machine)
            self.warn(f"the guest stopped recording at {place(e.unit, e.position)}: {self.path} "
                      f"({self.output.writer.bytes_written} bytes)")
            e.sink = self.scratch.sink
            e.marker_sink = self.scratch.on_marker
            self.output = self.scratch
            self.state = "done"


def run_guest_controlled(kernel_path: str, out_path: str, mode: str, *, mem_size: int, cmdline: str = "",
                         serial_in: Optional[BinaryIO] = None, serial_out: Optional[BinaryIO] = None,
                         timeout: Optional[float] = None, marker_every_ns: int = DEFAULT_MARKER_EVERY_NS,
                         mode_reason: str = "", nominal_ps: int = NOMINAL_PS_PER_INSTR,
                         cpl3_landmarks: bool = False,
                         warn: Callable[[str], None] = lambda m: None) -> tuple[Outcome, Optional[dict]]:
    """Run a kernel live; the guest decides what part of the run ``out_path`` records.

    Returns how the run ended and the recording's summary (None if the guest
    never started recording; a recording still on at the end is finished
    with the run's end).
    """
    import tempfile
    from rrstub.edit import unlink_quietly
    fd, scratch_path = tempfile.mkstemp(prefix="rrstub-run-", suffix=".rrr")
    os.close(fd)
    try:
        r = _Recorder(kernel_path, scratch_path, mode, mem_size=mem_size, cmdline=cmdline, serial_in=serial_in,
                      serial_out=serial_out, marker_every_ns=marker_every_ns, mode_reason=mode_reason,
                      nominal_ps=nominal_ps, cpl3_landmarks=cpl3_landmarks,
                      config_extra={"guest_controlled": True})
    except BaseException:
        unlink_quietly(scratch_path)
        raise
    machine = None
    scratch = RecordingOutput(r.writer, r.engine, r.sink, r.out, warn=lambda m: None)
    control = None
    try:
        machine = r.boot(scratch, serial_in, warn)
        control = GuestControl(r.engine, machine, r.out, out_path, r.config, r.kernel_args,
                               scratch, warn)
        result = _run_recording(r.engine, machine, lambda: control.output, control.started, timeout=timeout,
                                kept=lambda: None if control.output is scratch else out_path,
                                quota=None, keys=None, warn=warn)
        if control.output is not scratch:       # still recording when the run ended
            control.summary = _summary_of(control.output.writer.path)
        return result.outcome, control.summary
    finally:
        if control is not None and control.output is not scratch:
            control.output.writer.close()
        scratch.writer.close()
        if machine is not None:
            machine.close()
        unlink_quietly(scratch_path)


def _summary_of(path: str) -> Optional[dict]:
    with Recording.open(path) as rec:
        return rec.summary


def set_until(engine: Engine, target) -> None:
    """Where ``engine.run`` stops: an instruction count (or exit number), a ``RecordedMarker``, or None."""
    if isinstance(target, RecordedMarker):
        if not isinstance(engine, FastStepEngine):
            raise ReplayError(f"{target} is a fast recording's marker: replay it instruction by instruction")
        engine.until, engine.until_marker = None, target.index
        return
    engine.until = target
    if isinstance(engine, FastStepEngine):
        engine.until_marker = None


def _start_at(engine: Engine, rec: Recording, source: LogSource, out: HashingStream, start,
              until) -> None:
    """--from: restore the marker at or before ``start``, replay silently to ``start``."""
    if isinstance(until, int) and isinstance(start, int) and until < start:
        raise ReplayError(f"--until {until} is before --from {start}")
    seek(engine, rec, source, start)
    if isinstance(start, RecordedMarker) or engine.position < start:
        stream, out.stream = out.stream, None
        set_until(engine, start)
        try:
            outcome = engine.run()
        finally:
            out.stream = stream
            set_until(engine, until)
        if outcome.reason != "until":
            raise ReplayError(f"--from {start}: the recording ends at {place(engine.unit, outcome.position)}")
    if isinstance(until, int) and until < engine.position:
        raise ReplayError(f"--until {until} is before --from {start} (instruction {engine.position})")
    if isinstance(until, RecordedMarker) and until.index <= getattr(engine, "last_marker", 0):
        raise ReplayError(f"--until {until} is not after --from {start} (instruction {engine.position}, "
                          f"after marker m{engine.last_marker})")


PACE_EVERY = 4096     # exact replay: look at the pace and the pause key this often (instructions)


def _pace_exact(engine: Engine) -> None:
    """Exact replay has few points: pace it (and let it pause) every PACE_EVERY instructions too."""
    if not isinstance(engine, ExactEngine) or (engine.speed is None and engine.running is None):
        return

    def boundary() -> None:
        engine.pace()
        engine.boundary_at = engine.icount + PACE_EVERY
    engine.boundary_at = engine.icount + PACE_EVERY
    engine.on_boundary = boundary


def _pause_keys(keys: Optional[BinaryIO], engine: Engine, warn: Callable[[str], None]):
    """Space (or p) on the terminal pauses and resumes a replay; returns the reader, or None."""
    if keys is None:
        return None
    import threading
    from rrstub.terminal import KeyReader
    engine.running = threading.Event()
    engine.running.set()

    def on_key(key: bytes) -> None:
        if key not in (b" ", b"p", b"P"):
            return
        if engine.running.is_set():
            engine.running.clear()
            warn(f"paused near {place(engine.unit, engine.position)} "
                 f"({engine.guest_now() / 1e9:.3f} s of guest time); space resumes")
        else:
            warn("resumed")
            engine.running.set()
    reader = KeyReader(keys, on_key)
    if reader.start():
        warn("replaying: space pauses and resumes")
        return reader
    engine.running = None
    return None


def _marker_keys(keys: Optional[BinaryIO], engine: Engine, warn: Callable[[str], None]):
    """`m` on the terminal while recording asks for a marker; returns the reader to close, or None."""
    if keys is None:
        return None
    from rrstub.terminal import KeyReader
    count = [0]

    def on_key(key: bytes) -> None:
        if key in (b"m", b"M"):
            count[0] += 1
            engine.request_marker(f"key-{count[0]}", "key")
            _wake(engine)
            warn(f"marker key-{count[0]} requested")
    reader = KeyReader(keys, on_key)
    return reader if reader.start() else None


def _wake(engine: Engine) -> None:
    if engine.machine is not None:
        engine.machine._wake.set()
        engine.machine.vcpu.kick()


def _timeout_message(machine: Machine, engine: Engine, timeout) -> str:
    return machine._report(f"the guest was still running after --timeout {timeout:g} s "
                           f"({place(engine.unit, engine.position)}); the recording ends there")


def _on_marker_signal(engine: Engine):
    """SIGUSR1 while recording asks for a marker at the next point."""
    count = [0]

    def handler(signum, frame):
        count[0] += 1
        engine.request_marker(f"signal-{count[0]}", "signal")
        _wake(engine)
    try:
        return signal.signal(signal.SIGUSR1, handler)
    except ValueError:       # not the main thread: no signal-requested markers
        return signal.getsignal(signal.SIGUSR1)


@dataclass
class ReplayResult:
    outcome: Outcome
    recording: Recording
    serial_bytes: int
    serial_sha256: str
    verified_end: bool
    host_seconds: float
    engine: Engine


class ReplayError(Exception):
    """The recording cannot be replayed here (not a divergence): the message says why."""


def open_kernel(rec: Recording, kernel_check: Optional[str]) -> Kernel:
    data = rec.kernel_bytes()
    if kernel_check is not None:
        try:
            given = Path(kernel_check).read_bytes()
        except OSError as e:
            raise ReplayError(f"cannot read --kernel {kernel_check}: {e.strerror}") from None
        digest = hashlib.sha256(given).hexdigest()
        if digest != rec.kernel_sha256:
            raise ReplayError(
                f"{kernel_check} is not the kernel this recording was made with: the recording holds "
                f"{rec.kernel_name} (sha256 {rec.kernel_sha256[:16]}...), {kernel_check} has sha256 "
                f"{digest[:16]}.... Use the kernel that was recorded (rebuilding it rarely gives the "
                "same bytes), or drop --kernel: the recording carries its own copy.")
    try:
        boot_as = {"pvh": "pvh", "bzimage": "bzimage"}.get(rec.config.get("boot"), "auto")
        if rec.config.get("boot") is None:
            return Kernel.from_image(boot.parse_elf(data, rec.kernel_name), data)
        return open_kernel_bytes(data, rec.kernel_name, rec.initrd_bytes(), rec.initrd_name, boot_as)
    except boot.BootError as e:
        raise ReplayError(f"{rec.path}: the kernel inside the recording is unusable: {e}") from None


def _replay_machine(rec: Recording, kernel_check: Optional[str], out: HashingStream,
                    warn: Callable[[str], None], *, until: Optional[int] = None,
                    speed: Optional[float] = None,
                    before_restore: Optional[Callable[[Engine], None]] = None,
                    stepping: bool = False) -> tuple[Engine, Machine, LogSource]:
    """The recorded machine in the state of the recording's first marker, ready to replay.

    ``stepping``: a fast recording is replayed instruction by instruction
    (``FastStepEngine``: positions are instruction counts), not freely.
    Returns (engine, machine, source); the caller closes the machine.
    """
    if rec.recovered:
        warn(rec.recovery_note)
    rec.verify()   # a damaged chunk is an error up front, even one replay would not read
    config = rec.config
    mode = config.get("mode")
    if mode not in ENGINES:
        raise ReplayError(f"{rec.path}: unknown recording mode {mode!r} (this rrstub knows exact and fast)")
    image = open_kernel(rec, kernel_check)
    source = LogSource(rec)
    kw = {"ps_per_instr": config["ps_per_instr"]} if mode == "exact" else {}
    kind = FastStepEngine if stepping and mode == "fast" else ENGINES[mode]
    engine = kind(source=source, marker_every_ns=config["marker_every_ns"], speed=speed, **kw)
    set_until(engine, until)
    machine = Machine(image, config["mem_size"], config["cmdline"], serial_out=out, warn=warn,
                      clock=engine.clock, rtc_epoch_ns=config["rtc_epoch_ns"], dirty_log=True)
    try:
        engine.attach(machine)
        install_replay_hypercalls(machine, rec)
        if before_restore is not None:
            before_restore(engine)
        try:
            initial = decode_marker(rec.payload(rec.markers[0]))
        except MarkerError as e:
            raise ReplayError(f"{rec.path}: the initial marker at byte offset {rec.markers[0].offset} "
                              f"is unusable: {e}") from None
        engine.restore(initial)
        engine.resume(rec.markers[0].meta.get("resume"))
    except BaseException:
        machine.close()
        raise
    return engine, machine, source


def replay(path: str, *, until: Optional[int] = None, speed: Optional[float] = None,
           serial_out: Optional[BinaryIO] = None, kernel_check: Optional[str] = None,
           warn: Callable[[str], None] = lambda m: None, vassert=None,
           keys: Optional[BinaryIO] = None, start: Optional[int] = None) -> ReplayResult:
    """Replay a recording; raises RecordingError, ReplayError or Divergence.

    ``vassert``: a ``rrstub.vassert.VAssertChecker`` that evaluates the guest's
    VASSERTs on the way (its report fills in as the replay runs).
    """
    rec = Recording.open(path)
    try:
        out = HashingStream(serial_out if serial_out is not None else sys.stdout.buffer)
        started = host_monotonic_ns()
        # A fast recording is replayed instruction by instruction where
        # positions matter (--until, --from, VAssert reports); freely otherwise.
        stepping = until is not None or start is not None or vassert is not None
        engine, machine, source = _replay_machine(
            rec, kernel_check, out, warn, until=until, speed=speed,
            before_restore=None if vassert is None else vassert.install, stepping=stepping)
        try:
            if start is not None:
                _start_at(engine, rec, source, out, start, until)
            key_reader = _pause_keys(keys, engine, warn)
            _pace_exact(engine)
            try:
                outcome = engine.run()
            except MachineError as e:
                reason = _REASON_OF.get(type(e), "crash")
                outcome = Outcome(reason, e.exit_code, engine.position, engine.guest_now(), str(e))
            except KeyboardInterrupt as e:
                status, stopped_by, _ = interruption(e)
                outcome = Outcome("interrupted", status, engine.position, engine.guest_now(),
                                  f"replay stopped with {stopped_by}")
                return ReplayResult(outcome, rec, out.count, out.hash.hexdigest(), False,
                                    (host_monotonic_ns() - started) / 1e9, engine)
            finally:
                if key_reader is not None:
                    key_reader.close()
                machine.serial_out.flush()
            end = source.end
            if outcome.reason in GUEST_ENDS and end is None:
                raise Divergence(outcome.position, engine.divergence_words(
                                 f"the guest's {outcome.reason} (status {outcome.status}) at "
                                 f"{place(engine.unit, outcome.position)} is not where the recording ends "
                                 f"(next recorded: {describe_entry(source.peek())})"),
                                 engine.last_match, engine.unit)
            verified = False
            if outcome.reason not in ("until", "incomplete", "interrupted") and end is not None:
                if (outcome.reason, engine.log_pos) != (end.reason, end.pos) or (
                        outcome.reason == "exit" and outcome.status != end.status):
                    raise Divergence(outcome.position, engine.divergence_words(
                                     f"the run ended with {outcome.reason} (status {outcome.status}) at "
                                     f"{place(engine.unit, outcome.position)}; the recording ended with "
                                     f"{end.reason} (status {end.status}) at {place(engine.log_unit, end.pos)}"),
                                     engine.last_match, engine.unit)
                summary = rec.summary or {}
                if start is None and summary.get("serial_sha256") and summary["serial_sha256"] != out.hash.hexdigest():
                    raise Divergence(outcome.position, engine.divergence_words(
                                     f"the guest's serial output differs from the recording "
                                     f"({out.count} bytes replayed, {summary.get('serial_bytes')} recorded)"),
                                     engine.last_match, engine.unit)
                verified = True
            return ReplayResult(outcome, rec, out.count, out.hash.hexdigest(), verified,
                                (host_monotonic_ns() - started) / 1e9, engine)
        finally:
            machine.close()
    finally:
        rec.close()
