"""The record and replay engines: drive a Machine so that a run can be repeated exactly.

Two engines record (exact, fast) and three replay (those two, and the fast
log stepped instruction by instruction), under one contract.  The guest's
future is a function of (initial marker, event log); every value from
outside (clock, serial input, random numbers) enters at an engine *point*,
and each point that delivers anything is logged as one ``events.Point``.  Recording and replaying run the same
code; only ``LogSink`` (recording: asks the host, writes the log) and
``LogSource`` (replay: reads the log) differ.

One module per part:

- ``base``: the contract both engines share (``Engine``), the constants,
  ``Outcome``, ``Divergence``, ``EngineError``, exit codes and register digests;
- ``log``: ``LogSink`` and ``LogSource``, the two sides of the log;
- ``exact``: ``ExactEngine``, which single-steps every instruction;
- ``fast``: ``FastEngine``, which runs the guest freely between exits and landmarks;
- ``faststep``: ``FastStepEngine``, which replays a fast recording's log
  instruction by instruction (instruction positions for the debugger).

Every public name is re-exported here (``from rrstub.engines import X``).
Each module imports the constants it reads from ``base`` by name, so a
change to a constant at run time (a test's monkeypatch) must be made on the
module that reads it, e.g. ``rrstub.engines.fast.LANDMARK_BUDGET_MIN_NS``.
"""
from __future__ import annotations

from rrstub.engines.base import (CHECK_INTERVAL_NS, DEFAULT_MARKER_EVERY_NS, EVENT_POSITIONS, FLUSH_BYTES,
                                 FLUSH_CHECK_EVERY, FLUSH_INTERVAL_NS, GUEST_ENDS, IDLE_FLUSH_INTERVAL_NS,
                                 LANDMARK_BUDGET_FACTOR, LANDMARK_BUDGET_MIN_NS, NEVER, NOMINAL_PS_PER_INSTR,
                                 RETRY_NS, RFLAGS_IF, SYNC_CHECK_EVERY, SYNC_INTERVAL_NS, Divergence, Engine,
                                 EngineError, Outcome, describe_entry, describe_exit_code, exit_code, place,
                                 regs_digest,
                                 regs_tuple)
from rrstub.engines.exact import ExactEngine
from rrstub.engines.fast import FastEngine
from rrstub.engines.faststep import FastStepEngine
from rrstub.engines.log import LogSink, LogSource

__all__ = [
    "CHECK_INTERVAL_NS", "DEFAULT_MARKER_EVERY_NS", "EVENT_POSITIONS", "FLUSH_BYTES", "FLUSH_CHECK_EVERY",
    "FLUSH_INTERVAL_NS", "GUEST_ENDS", "IDLE_FLUSH_INTERVAL_NS", "LANDMARK_BUDGET_FACTOR",
    "LANDMARK_BUDGET_MIN_NS", "NEVER", "NOMINAL_PS_PER_INSTR", "RETRY_NS", "RFLAGS_IF", "SYNC_CHECK_EVERY",
    "SYNC_INTERVAL_NS",
    "Divergence", "Engine", "EngineError", "Outcome", "describe_entry", "describe_exit_code", "exit_code", "place",
    "regs_digest", "regs_tuple",
    "ExactEngine", "FastEngine", "FastStepEngine", "LogSink", "LogSource",
]
