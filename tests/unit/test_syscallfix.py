"""vmm.syscallfix: finding the page-fault entry and finishing a syscall kvm_pvm left at CPL3.

A fake vCPU over real guest memory (paging off, so addresses are physical)
holds what the host leaves after the broken syscall and the #PF delivery
that follows it; the repair must produce what a correct syscall does.
"""
from dataclasses import replace

import pytest

from vmm.kvm import Regs, Segment, Sregs
from vmm.memory import GuestMemory
from vmm.syscallfix import (FRAME_WITH_CODE, MSR_FMASK, MSR_LSTAR, MSR_STAR, PF_FETCH, PF_USER, SyscallRepair)

IDT = 0x1000
PF_ENTRY = 0x0000_7FFF_FFFF_1234     # any canonical address: only its bits matter here
LSTAR = 0x40_2000
STAR = 0x0023_0010 << 32             # user base 0x23 (sysret), kernel CS 0x10 / SS 0x18
FMASK = 0x47700                      # what Linux masks: TF DF IF IOPL AC NT
KSTACK = 0x8000
USER_RSP, USER_RFLAGS = 0x7FFE_0000_1000, 0x246 & ~0x200   # IF already masked, as the host did
EFER_LONG = 0xD01                    # SCE, LME, LMA, NXE


def seg(selector, dpl, code):
    return Segment(base=0, limit=0xFFFFFFFF, selector=selector, type=11 if code else 3, present=1, dpl=dpl,
                   db=0 if code else 1, s=1, l=1 if code else 0, g=1)


class FakeVcpu:
    def __init__(self, regs, sregs, msrs):
        self.regs, self.sregs, self.msrs = regs, sregs, msrs
        self.debug = []

    def get_regs(self):
        return self.regs

    def set_regs(self, regs):
        self.regs = regs

    def get_sregs(self):
        return self.sregs

    def set_sregs(self, sregs):
        self.sregs = sregs

    def get_msrs(self, indices):
        return {i: self.msrs[i] for i in indices}

    def set_guest_debug(self, flags, debugregs=None):
        self.debug.append((flags, debugregs))


@pytest.fixture
def mem():
    m = GuestMemory(2 << 20)
    yield m
    m.close()


def gate(offset, present=True):
    g = bytearray(16)
    g[0:2] = (offset & 0xFFFF).to_bytes(2, "little")
    g[2:4] = (0x10).to_bytes(2, "little")
    g[5] = (0x80 if present else 0) | 0x0E
    g[6:8] = (offset >> 16 & 0xFFFF).to_bytes(2, "little")
    g[8:12] = (offset >> 32).to_bytes(4, "little")
    return bytes(g)


def after_broken_syscall(mem, code=PF_USER | PF_FETCH | 1, rip=LSTAR, cs=0x33):
    """The vCPU at the page-fault entry, with the frame the fetch at LSTAR from CPL3 pushed."""
    frame = [code, rip, cs, USER_RFLAGS | 0x10000, USER_RSP, 0x2B]
    rsp = KSTACK - FRAME_WITH_CODE
    mem.write(rsp, b"".join(v.to_bytes(8, "little") for v in frame))
    regs = Regs(rip=PF_ENTRY, rsp=rsp, rflags=0x2, rcx=0x40_1002, r11=0x246)
    null = Segment(unusable=1)
    sregs = Sregs(cs=seg(0x10, 0, True), ds=null, es=null, fs=null, gs=null, ss=null, tr=null, ldt=null,
                  gdt_base=0, gdt_limit=0, idt_base=IDT, idt_limit=0xFFF, cr0=0x11, cr2=LSTAR, cr3=0,
                  cr4=0, cr8=0, efer=EFER_LONG, apic_base=0, interrupt_bitmap=(0, 0, 0, 0))
    return FakeVcpu(regs, sregs, {MSR_STAR: STAR, MSR_LSTAR: LSTAR, MSR_FMASK: FMASK})


def test_refresh_arms_dr0_at_the_idt_page_fault_entry_and_follows_it(mem):
    mem.write(IDT + 14 * 16, gate(PF_ENTRY))
    vcpu = after_broken_syscall(mem)
    repair = SyscallRepair(vcpu, mem)
    repair.refresh()
    assert repair.armed_at == PF_ENTRY
    assert vcpu.debug[-1][1][0] == PF_ENTRY and vcpu.debug[-1][1][7] & 1
    calls = len(vcpu.debug)
    repair.refresh()                              # unchanged: no ioctl
    assert len(vcpu.debug) == calls
    mem.write(IDT + 14 * 16, gate(PF_ENTRY, present=False))
    repair.refresh()
    assert repair.armed_at is None and vcpu.debug[-1] == (0, None)


def test_no_breakpoint_before_long_mode(mem):
    mem.write(IDT + 14 * 16, gate(PF_ENTRY))
    vcpu = after_broken_syscall(mem)
    vcpu.sregs = replace(vcpu.sregs, efer=0)
    repair = SyscallRepair(vcpu, mem)
    repair.refresh()
    assert repair.armed_at is None


def test_a_broken_syscall_becomes_the_state_a_correct_one_leaves(mem):
    vcpu = after_broken_syscall(mem)
    repair = SyscallRepair(vcpu, mem)
    assert repair.repair()
    r, s = vcpu.regs, vcpu.sregs
    assert (r.rip, r.rsp) == (LSTAR, USER_RSP)
    assert r.rflags == (USER_RFLAGS & ~FMASK) | 2       # FMASK applied, RF cleared
    assert (r.rcx, r.r11) == (0x40_1002, 0x246)          # what syscall saved, untouched
    assert (s.cs.selector, s.cs.dpl, s.cs.l) == (0x10, 0, 1)
    assert (s.ss.selector, s.ss.dpl, s.ss.type, s.ss.present) == (0x18, 0, 3, 1)
    assert repair.repairs == 1


@pytest.mark.parametrize("what", ["kernel fault", "data fault", "other address", "not user"])
def test_every_other_page_fault_is_left_alone(mem, what):
    kw = {"kernel fault": dict(cs=0x10, code=PF_FETCH | 1), "data fault": dict(code=PF_USER | 1),
          "other address": dict(rip=LSTAR + 4), "not user": dict(code=PF_FETCH | 1)}[what]
    vcpu = after_broken_syscall(mem, **kw)
    before = (vcpu.regs, vcpu.sregs)
    repair = SyscallRepair(vcpu, mem)
    assert not repair.repair()
    assert (vcpu.regs, vcpu.sregs) == before and repair.repairs == 0
