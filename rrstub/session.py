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

ENGINES = {"exact": ExactEngine, "fast": FastEngine}
_REASON_OF = {GuestCrashed: "crash", GuestHung: "hung", GuestTimeout: "timeout"}


def exit_status(outcome: Outcome) -> int:
    """The `rrstub record`/`replay` exit status for how a run ended."""
    return {"exit": outcome.status, "reset": 0, "crash": EXIT_CRASH, "hung": EXIT_HUNG,
            "timeout": EXIT_TIMEOUT, "interrupted": EXIT_INTERRUPTED, "until": 0,
            "incomplete": EXIT_INCOMPLETE}.get(outcome.reason, 1)


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


def record(kernel_path: str, out_path: str, mode: str, *, mem_size: int, cmdline: str = "",
           serial_in: Optional[BinaryIO] = None, serial_out: Optional[BinaryIO] = None,
           timeout: Optional[float] = None, marker_every_ns: int = DEFAULT_MARKER_EVERY_NS,
           mode_reason: str = "", nominal_ps: int = NOMINAL_PS_PER_INSTR, cpl3_landmarks: bool = False,
           warn: Callable[[str], None] = lambda m: None) -> RecordResult:
    """Record one run of ``kernel_path`` into ``out_path``; raises BootError for a bad kernel."""
    image = boot.load_kernel_file(kernel_path)
    kernel_bytes = Path(kernel_path).read_bytes()
    epoch = time.time_ns()
    config = {
        "mode": mode, "mode_reason": mode_reason, "mem_size": mem_size, "cmdline": cmdline,
        "rtc_epoch_ns": epoch, "ps_per_instr": nominal_ps,
        "marker_every_ns": marker_every_ns, "rrstub": __version__,
        "host": {"name": platform.node(), "kernel": platform.release(), "machine": platform.machine()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "serial_input": serial_in is not None,
    }
    writer = RecordingWriter(out_path, config, os.path.basename(kernel_path), kernel_bytes)
    sink = LogSink(writer)
    kw = {"ps_per_instr": nominal_ps} if mode == "exact" else {"cpl3_landmarks": cpl3_landmarks}
    engine = ENGINES[mode](sink=sink, marker_every_ns=marker_every_ns, **kw)
    out = HashingStream(serial_out if serial_out is not None else sys.stdout.buffer)
    started = host_monotonic_ns()
    machine = None
    message = ""
    try:
        machine = Machine(image, mem_size, cmdline, serial_in=serial_in, serial_out=out, warn=warn,
                          clock=engine.clock, rtc_epoch_ns=epoch, dirty_log=True)
        engine.attach(machine)
        engine.marker_sink = lambda blob, meta: writer.add_marker(meta, blob)
        blob, meta = engine.initial_marker()
        writer.add_marker(meta, blob)
        if timeout is not None:
            engine.end_host_ns = host_monotonic_ns() + int(timeout * 1e9)
        previous_usr1 = _on_marker_signal(engine)
        try:
            outcome = engine.run()
        except MachineError as e:
            reason = _REASON_OF.get(type(e), "crash")
            message = str(e) if reason != "timeout" else _timeout_message(machine, engine, timeout)
            outcome = Outcome(reason, e.exit_code, engine.position, engine.guest_now(), message)
        except KeyboardInterrupt:
            outcome = Outcome("interrupted", EXIT_INTERRUPTED, engine.position, engine.guest_now(),
                              "the recording was stopped with Ctrl-C")
        finally:
            signal.signal(signal.SIGUSR1, previous_usr1)
        sink.emit(ev.End(outcome.position, outcome.reason, outcome.status, outcome.detail[:4000]))
        sink.flush(outcome.position)
        summary = {
            "reason": outcome.reason, "status": outcome.status, "end_position": outcome.position,
            "guest_ns": outcome.guest_ns, "unit": engine.unit, "markers": engine.markers.count,
            "exits": machine.exits, "events": dict(sink.counts), "serial_bytes": out.count,
            "serial_sha256": out.hash.hexdigest(),
            "host_seconds": (host_monotonic_ns() - started) / 1e9,
            "landmarks": getattr(engine, "landmarks", 0),
            "delayed_deliveries": getattr(engine, "delayed", 0),
        }
        writer.finish(summary)
        return RecordResult(outcome, mode, out_path, engine.markers.count,
                            summary["host_seconds"], writer.bytes_written, writer.raw_bytes,
                            dict(sink.counts), message)
    finally:
        writer.close()
        if machine is not None:
            machine.close()


def _timeout_message(machine: Machine, engine: Engine, timeout) -> str:
    return machine._report(f"the guest was still running after --timeout {timeout:g} s "
                           f"({place(engine.unit, engine.position)}); the recording ends there")


def _on_marker_signal(engine: Engine):
    """SIGUSR1 while recording asks for a marker at the next point."""
    def handler(signum, frame):
        engine.marker_requested = True
        if engine.machine is not None:
            engine.machine._wake.set()
            engine.machine.vcpu.kick()
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
           warn: Callable[[str], None] = lambda m: None) -> ReplayResult:
    """Replay a recording; raises RecordingError, ReplayError or Divergence."""
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
