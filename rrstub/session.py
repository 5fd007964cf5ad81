"""Recording and replaying a whole run: the engines wired to a Machine and a recording file.

``record()`` boots a kernel under an engine and writes a recording;
``replay()`` rebuilds the machine from a recording and runs it again.  Both
turn every way a run can end (the guest's exit, a crash, a hang, --timeout,
Ctrl-C, a divergence) into an ``Outcome`` or one exception with a message
for the user.

Invariants: a recording is always finished (END, index, trailer) when the
recorder ends in any way but being killed; a killed recorder leaves every
chunk written so far readable.
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
from rrstub.engines import (DEFAULT_MARKER_EVERY_NS, NOMINAL_PS_PER_INSTR, Divergence, Engine,
                            ExactEngine, FastEngine, LogSink, LogSource, Outcome, place)
from rrstub.markers import MarkerError, decode_marker
from rrstub.recording import Recording, RecordingWriter
from vmm import boot
from vmm.kvm import host_monotonic_ns
from vmm.machine import (EXIT_CRASH, EXIT_HUNG, EXIT_TIMEOUT, GuestCrashed, GuestHung, GuestTimeout,
                         Machine, MachineError)

EXIT_INTERRUPTED = 130
EXIT_INCOMPLETE = 65   # replay reached the end of an incomplete recording
EXIT_DIVERGED = 66     # replay no longer matched the recording
EXIT_QUOTA = 75        # recording stopped at --quota

ENGINES = {"exact": ExactEngine, "fast": FastEngine}
_REASON_OF = {GuestCrashed: "crash", GuestHung: "hung", GuestTimeout: "timeout"}


def exit_status(outcome: Outcome) -> int:
    """The `rrstub record`/`replay` exit status for how a run ended."""
    return {"exit": outcome.status, "reset": 0, "crash": EXIT_CRASH, "hung": EXIT_HUNG,
            "timeout": EXIT_TIMEOUT, "interrupted": EXIT_INTERRUPTED, "until": 0,
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
            self._rebase(target)

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

    def _rebase_target(self, meta: dict) -> Optional[int]:
        """The index of the marker to rebase onto now, if any."""
        if len(self.markers) < 2:
            return None
        choice = None
        if self.rolling_ns is not None:
            now = meta.get("guest_ns", 0)
            if now - self.markers[0].get("guest_ns", 0) >= self.rolling_ns * ROLLING_SLACK:
                fits = [i for i, m in enumerate(self.markers) if m.get("guest_ns", 0) <= now - self.rolling_ns]
                if fits and fits[-1] > 0:
                    choice = fits[-1]
        if self.quota is not None and self.rolling:
            written = self.writer.bytes_written
            if written + self._tail_estimate() >= self.quota * QUOTA_HIGH:
                full = self.markers[0].get("stored", 0) or 0
                keep = [i for i, m in enumerate(self.markers)
                        if i > 0 and written - m["offset"] + full <= self.quota * QUOTA_KEEP]
                pick = keep[0] if keep else len(self.markers) - 1
                choice = pick if choice is None else max(choice, pick)
        return choice

    def _rebase(self, index: int) -> None:
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
        offsets = [c.offset for c in kept if c.kind.name == "MARKER"]
        self.markers = [dict(m, index=m["index"] - index, offset=o)
                        for m, o in zip(self.markers[index:], offsets)]
        self.markers[0]["stored"] = next(c.stored_size for c in kept if c.kind.name == "MARKER")
        self.first_meta = self.markers[0]
        self.out.keep_from(target["position"])
        self.dropped_bytes += max(0, before - writer.bytes_written)
        why = (f"it covered more than {ROLLING_SLACK:g} x the {self.rolling_ns / 1e9:g} s window"
               if self.rolling_ns is not None and writer.bytes_written < (self.quota or 1 << 62) * QUOTA_KEEP
               else f"it neared --quota {self.quota} bytes")
        self.warn(f"rolling: dropped guest time {old_first.get('guest_ns', 0) / 1e9:.3f}.."
                  f"{target.get('guest_ns', 0) / 1e9:.3f} s ({why}); {self.path} now starts at "
                  f"{place(self.engine.unit, target['position'])} and is {writer.bytes_written} bytes")
        if self.quota is not None and writer.bytes_written + self._tail_estimate() >= self.quota:
            self.stopped = True
            raise QuotaReached()

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
    image = boot.load_kernel_file(kernel_path)
    kernel_bytes = Path(kernel_path).read_bytes()
    epoch = time.time_ns()
    config = new_config(mode, mode_reason, mem_size, cmdline, epoch, nominal_ps, marker_every_ns,
                        serial_in is not None)
    writer = RecordingWriter(out_path, config, os.path.basename(kernel_path), kernel_bytes)
    sink = LogSink(writer)
    kw = {"ps_per_instr": nominal_ps} if mode == "exact" else {"cpl3_landmarks": cpl3_landmarks}
    engine = ENGINES[mode](sink=sink, marker_every_ns=marker_every_ns, **kw)
    out = SerialHashes(serial_out if serial_out is not None else sys.stdout.buffer)
    started = host_monotonic_ns()
    machine = None
    message = ""
    output = RecordingOutput(writer, engine, sink, out, quota=quota, rolling_ns=rolling_ns, warn=warn)
    try:
        machine = Machine(image, mem_size, cmdline, serial_in=serial_in, serial_out=out, warn=warn,
                          clock=engine.clock, rtc_epoch_ns=epoch, dirty_log=True)
        engine.attach(machine)
        install_marker_hypercall(machine, engine)
        engine.marker_sink = output.on_marker
        output.start(*engine.initial_marker())
        if timeout is not None:
            engine.end_host_ns = host_monotonic_ns() + int(timeout * 1e9)
        previous_usr1 = _on_marker_signal(engine)
        key_reader = _marker_keys(keys, engine, warn)
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
        except KeyboardInterrupt:
            outcome = Outcome("interrupted", EXIT_INTERRUPTED, engine.position, engine.guest_now(),
                              "the recording was stopped with Ctrl-C")
        finally:
            signal.signal(signal.SIGUSR1, previous_usr1)
            if key_reader is not None:
                key_reader.close()
        output.stopped = True
        writer = output.writer
        sink.emit(ev.End(outcome.position, outcome.reason, outcome.status, outcome.detail[:4000]))
        sink.flush(outcome.position)
        summary = {
            "reason": outcome.reason, "status": outcome.status, "end_position": outcome.position,
            "guest_ns": outcome.guest_ns, "unit": engine.unit, "markers": engine.markers.count,
            "exits": machine.exits, "events": dict(sink.counts),
            "host_seconds": (host_monotonic_ns() - started) / 1e9,
            "landmarks": getattr(engine, "landmarks", 0),
            "delayed_deliveries": getattr(engine, "delayed", 0),
        }
        summary.update(output.summary_extra())
        writer.finish(summary)
        return RecordResult(outcome, mode, out_path, engine.markers.count,
                            summary["host_seconds"], writer.bytes_written, writer.raw_bytes,
                            dict(sink.counts), message, summary.get("rolling"))
    finally:
        output.writer.close()
        if machine is not None:
            machine.close()


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


def open_kernel(rec: Recording, kernel_check: Optional[str]) -> boot.KernelImage:
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
        return boot.parse_elf(data, rec.kernel_name)
    except boot.BootError as e:
        raise ReplayError(f"{rec.path}: the kernel inside the recording is unusable: {e}") from None


def replay(path: str, *, until: Optional[int] = None, speed: Optional[float] = None,
           serial_out: Optional[BinaryIO] = None, kernel_check: Optional[str] = None,
           warn: Callable[[str], None] = lambda m: None, vassert=None) -> ReplayResult:
    """Replay a recording; raises RecordingError, ReplayError or Divergence.

    ``vassert``: a ``rrstub.vassert.VAssertChecker`` that evaluates the guest's
    VASSERTs on the way (its report fills in as the replay runs).
    """
    rec = Recording.open(path)
    try:
        if rec.recovered:
            warn(rec.recovery_note)
        rec.verify()   # a damaged chunk is an error up front, even one replay would not read
        config = rec.config
        mode = config.get("mode")
        if mode not in ENGINES:
            raise ReplayError(f"{path}: unknown recording mode {mode!r} (this rrstub knows exact and fast)")
        image = open_kernel(rec, kernel_check)
        source = LogSource(rec)
        kw = {"ps_per_instr": config["ps_per_instr"]} if mode == "exact" else {}
        engine = ENGINES[mode](source=source, marker_every_ns=config["marker_every_ns"], until=until,
                               speed=speed, **kw)
        out = HashingStream(serial_out if serial_out is not None else sys.stdout.buffer)
        started = host_monotonic_ns()
        machine = Machine(image, config["mem_size"], config["cmdline"], serial_out=out, warn=warn,
                          clock=engine.clock, rtc_epoch_ns=config["rtc_epoch_ns"], dirty_log=True)
        try:
            engine.attach(machine)
            if vassert is not None:
                vassert.install(engine)
            try:
                initial = decode_marker(rec.payload(rec.markers[0]))
            except MarkerError as e:
                raise ReplayError(f"{path}: the initial marker at byte offset {rec.markers[0].offset} "
                                  f"is unusable: {e}") from None
            engine.restore(initial)
            engine.resume(rec.markers[0].meta.get("resume"))
            end = source.end
            try:
                outcome = engine.run()
            except MachineError as e:
                reason = _REASON_OF.get(type(e), "crash")
                outcome = Outcome(reason, e.exit_code, engine.position, engine.guest_now(), str(e))
            except KeyboardInterrupt:
                outcome = Outcome("interrupted", EXIT_INTERRUPTED, engine.position, engine.guest_now(),
                                  "replay stopped with Ctrl-C")
                return ReplayResult(outcome, rec, out.count, out.hash.hexdigest(), False,
                                    (host_monotonic_ns() - started) / 1e9, engine)
            finally:
                machine.serial_out.flush()
            end = source.end
            verified = False
            if outcome.reason not in ("until", "incomplete", "interrupted") and end is not None:
                if (outcome.reason, outcome.position) != (end.reason, end.pos) or (
                        outcome.reason == "exit" and outcome.status != end.status):
                    raise Divergence(outcome.position,
                                     f"the run ended with {outcome.reason} (status {outcome.status}) at "
                                     f"{place(engine.unit, outcome.position)}; the recording ended with "
                                     f"{end.reason} (status {end.status}) at {place(engine.unit, end.pos)}",
                                     engine.last_match, engine.unit)
                summary = rec.summary or {}
                if summary.get("serial_sha256") and summary["serial_sha256"] != out.hash.hexdigest():
                    raise Divergence(outcome.position,
                                     f"the guest's serial output differs from the recording "
                                     f"({out.count} bytes replayed, {summary.get('serial_bytes')} recorded)",
                                     engine.last_match, engine.unit)
                verified = True
            return ReplayResult(outcome, rec, out.count, out.hash.hexdigest(), verified,
                                (host_monotonic_ns() - started) / 1e9, engine)
        finally:
            machine.close()
    finally:
        rec.close()
