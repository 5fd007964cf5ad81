"""Finishing the syscalls this host's KVM leaves half done (kvm_pvm).

On kvm_pvm a ``syscall`` from guest user mode sets RIP to LSTAR (and RCX,
R11, RFLAGS as it should) but leaves CS and SS at the user's selectors
(`rrstub doctor`: "syscall CPL3").  The kernel's syscall entry then runs
at CPL3, its first fetch page-faults on a supervisor page, and the kernel
kills the process.  ``SyscallRepair`` undoes that fault and completes the
transition the CPU should have made:

* DR0 is armed at the guest's page-fault entry, read from IDT vector 14
  (``refresh``, re-read as the guest may move its IDT).  A hardware
  execution breakpoint works at CPL0 here; nothing is written into guest
  memory.
* At a hit, the exception frame on the kernel stack says whether this is
  the broken syscall: a user-mode instruction fetch at exactly LSTAR from
  CS with RPL 3.  Then the frame is discarded: RIP = LSTAR, RSP and RFLAGS
  from the frame (the user's, as syscall leaves them; RFLAGS masked by
  FMASK), CS = STAR[47:32]
  with the kernel code segment the gate loaded, SS = CS + 8 as a flat
  data segment.  That is the state a correct syscall produces.
* Any other page fault continues untouched: ``step_over`` runs the
  handler's first instruction with the breakpoint cleared (this host
  ignores RF) and re-arms it.

Only the live run loop uses it, and only where the probe found the bug:
the exact engine cannot step user code on this host at all, and a fast
recording of Linux does not replay anyway (it reads the TSC).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from vmm.kvm import Debug, Segment, Vcpu
from vmm.memory import GuestMemory
from vmm.paging import PageFault, read_virtual
from vmm._native import lib

MSR_STAR, MSR_LSTAR, MSR_FMASK = 0xC0000081, 0xC0000082, 0xC0000084
RFLAGS_RF = 1 << 16
PAGE_FAULT = 14
GATE_BYTES = 16                 # a long-mode IDT gate
FRAME_WITH_CODE = 6 * 8         # error code, RIP, CS, RFLAGS, RSP, SS
PF_USER, PF_FETCH = 1 << 2, 1 << 4
DR7_L0 = 1 << 0
EFER_LMA = 1 << 10
KERNEL_SS = Segment(base=0, limit=0xFFFFFFFF, selector=0, type=3, present=1, dpl=0, db=1, s=1, l=0, g=1)


class SyscallRepair:
    def __init__(self, vcpu: Vcpu, mem: GuestMemory) -> None:
        self.vcpu = vcpu
        self.mem = mem
        self.armed_at: Optional[int] = None
        self.repairs = 0

    def _arm(self) -> None:
        if self.armed_at is None:
            self.vcpu.set_guest_debug(0)
        else:
            self.vcpu.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_USE_HW_BP,
                                      [self.armed_at, 0, 0, 0, 0, 0, 0, DR7_L0])

    def refresh(self) -> None:
        """Arm at the page-fault entry of the IDT the guest uses now (none before long mode)."""
        sregs = self.vcpu.get_sregs()
        entry = None
        if sregs.efer & EFER_LMA and sregs.idt_limit >= PAGE_FAULT * GATE_BYTES + GATE_BYTES - 1:
            try:
                gate = read_virtual(self.mem, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer,
                                    sregs.idt_base + PAGE_FAULT * GATE_BYTES, GATE_BYTES)
            except PageFault:
                gate = None
            if gate is not None and gate[5] & 0x80:        # present
                entry = (int.from_bytes(gate[0:2], "little") | int.from_bytes(gate[6:8], "little") << 16
                         | int.from_bytes(gate[8:12], "little") << 32)
        if entry != self.armed_at:
            self.armed_at = entry
            self._arm()

    def is_hit(self, exit) -> bool:
        return isinstance(exit, Debug) and self.armed_at is not None and exit.pc == self.armed_at

    def repair(self) -> bool:
        """At the page-fault entry: finish a broken syscall; False for any other fault."""
        regs, sregs = self.vcpu.get_regs(), self.vcpu.get_sregs()
        try:
            raw = read_virtual(self.mem, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, regs.rsp, FRAME_WITH_CODE)
        except PageFault:
            return False
        code, rip, cs, rflags, rsp, _ss = (int.from_bytes(raw[i:i + 8], "little") for i in range(0, 48, 8))
        if cs & 3 != 3 or code & (PF_USER | PF_FETCH) != PF_USER | PF_FETCH:
            return False
        msrs = self.vcpu.get_msrs([MSR_STAR, MSR_LSTAR, MSR_FMASK])
        if rip != msrs[MSR_LSTAR]:
            return False
        kernel_cs = (msrs[MSR_STAR] >> 32) & 0xFFFC
        # RFLAGS as syscall leaves it: masked by FMASK (again, if the host did), RF clear.
        rflags &= ~(msrs[MSR_FMASK] | RFLAGS_RF)
        self.vcpu.set_regs(replace(regs, rip=rip, rsp=rsp, rflags=rflags | 2))
        self.vcpu.set_sregs(replace(sregs, cs=replace(sregs.cs, selector=kernel_cs),
                                    ss=replace(KERNEL_SS, selector=kernel_cs + 8)))
        self.repairs += 1
        return True

    def single_step_flags(self) -> None:
        """Clear the breakpoint and step one instruction (the handler's first)."""
        self.vcpu.set_guest_debug(lib.KVM_GUESTDBG_ENABLE | lib.KVM_GUESTDBG_SINGLESTEP)

    def rearm(self) -> None:
        self._arm()
