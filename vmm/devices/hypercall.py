"""The hypercall port (0x510): a guest asks the VMM for a service.

ABI (also in examples/include/rrstub_machine.h): the guest executes
``out %eax, %dx`` with DX = 0x510 and EAX = function number; arguments are in
RBX, RCX, RSI, RDI; the VMM writes the result to RAX before the guest runs
again.  Because the port write is a deterministic exit, a hypercall costs one
exit and recurs identically on replay.

A result must be the same while recording and while replaying (the guest's
path depends on it), so every function's result is a constant of the run's
kind, never of host state.

Functions:
  0  HC_VERSION       -> HC_VERSION_VALUE ("RRST" << 32 | ABI version 1)
  1  HC_MARKER        RBX = address of a NUL-terminated name (or 0): while
                      recording, a marker with that name is taken right after
                      the call; -> 0 always
  2  HC_RECORD_START  start recording (only under `rrstub run
                      --allow-guest-record`); -> 0 when recording is on
                      afterwards, HC_DENIED when the run does not allow it
  3  HC_RECORD_STOP   stop recording; -> 0 (HC_DENIED as for START)
  4  HC_VASSERT       RBX = address of a struct rrstub_vassert_site:
                      -> 0 (skip the check) except during `rrstub replay
                      --vassert`, which answers HC_VASSERT_CHECK
  5  HC_VASSERT_DONE  RBX = site, RCX = 1 if the condition held: the end of
                      a check (only reached during --vassert)
  other              -> HC_UNKNOWN (all ones)

Whoever runs the machine installs the functions it serves in ``handlers``:
each takes the registers at the call and returns RAX.
"""
from __future__ import annotations

from typing import Callable

from vmm.kvm import Regs

HYPERCALL_PORT = 0x510
HC_VERSION = 0
HC_MARKER = 1
HC_RECORD_START = 2
HC_RECORD_STOP = 3
HC_VASSERT = 4
HC_VASSERT_DONE = 5
HC_VERSION_VALUE = 0x5252535400000001
HC_UNKNOWN = (1 << 64) - 1
HC_DENIED = (1 << 64) - 2
HC_VASSERT_CHECK = 1

NAMES = {HC_VERSION: "version", HC_MARKER: "marker", HC_RECORD_START: "record-start",
         HC_RECORD_STOP: "record-stop", HC_VASSERT: "vassert", HC_VASSERT_DONE: "vassert-done"}

Handler = Callable[[Regs], int]


class HypercallPort:
    """Port device; needs the vCPU's registers to read arguments and return a result."""

    def __init__(self, get_regs: Callable[[], Regs], set_regs: Callable[[Regs], None],
                 warn: Callable[[str], None]):
        self._get_regs = get_regs
        self._set_regs = set_regs
        self._warn = warn
        self._warned: set[int] = set()
        self.calls = 0
        self.handlers: dict[int, Handler] = {
            HC_VERSION: lambda regs: HC_VERSION_VALUE,
            HC_MARKER: lambda regs: 0,
            HC_RECORD_START: self._denied,
            HC_RECORD_STOP: self._denied,
            HC_VASSERT: lambda regs: 0,
        }

    def _denied(self, regs: Regs) -> int:
        fn = regs.rax & 0xFFFFFFFF
        if fn not in self._warned:
            self._warned.add(fn)
            self._warn(f"guest asked to {NAMES[fn].replace('-', ' ')} at rip {regs.rip:#x}: only "
                       "`rrstub run --allow-guest-record -o REC` lets a guest control recording; "
                       "the call returns HC_DENIED")
        return HC_DENIED

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or size != 4:
            return
        self.calls += 1
        regs = self._get_regs()
        handler = self.handlers.get(value)
        if handler is not None:
            result = handler(regs)
        else:
            if value not in self._warned:
                self._warned.add(value)
                self._warn(f"guest made hypercall {value} at rip {regs.rip:#x}: not a function of "
                           "this rrstub (reserved); it returns all ones")
            result = HC_UNKNOWN
        regs.rax = result & 0xFFFFFFFFFFFFFFFF
        self._set_regs(regs)
