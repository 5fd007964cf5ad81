"""The hypercall port (0x510): a guest asks the VMM for a service.

ABI (also in examples/include/rrstub_machine.h): the guest executes
``out %eax, %dx`` with DX = 0x510 and EAX = function number; arguments are in
RBX, RCX, RSI, RDI; the VMM writes the result to RAX before the guest runs
again.  Because the port write is a deterministic exit, a hypercall costs one
exit and recurs identically on replay.

Functions:
  0  HC_VERSION  -> HC_VERSION_VALUE ("RRST" << 32 | ABI version 1)
  other          -> HC_UNKNOWN (all ones); reserved for replay-only
                    assertions, in-guest recording control and markers.
"""
from __future__ import annotations

from typing import Callable

from vmm.kvm import Regs

HYPERCALL_PORT = 0x510
HC_VERSION = 0
HC_VERSION_VALUE = 0x5252535400000001
HC_UNKNOWN = (1 << 64) - 1


class HypercallPort:
    """Port device; needs the vCPU's registers to read arguments and return a result."""

    def __init__(self, get_regs: Callable[[], Regs], set_regs: Callable[[Regs], None],
                 warn: Callable[[str], None]):
        self._get_regs = get_regs
        self._set_regs = set_regs
        self._warn = warn
        self._warned: set[int] = set()
        self.calls = 0

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0 or size != 4:
            return
        self.calls += 1
        regs = self._get_regs()
        if value == HC_VERSION:
            regs.rax = HC_VERSION_VALUE
        else:
            if value not in self._warned:
                self._warned.add(value)
                self._warn(f"guest made hypercall {value} at rip {regs.rip:#x}: not a function of "
                           "this rrstub (reserved); it returns all ones")
            regs.rax = HC_UNKNOWN
        self._set_regs(regs)
