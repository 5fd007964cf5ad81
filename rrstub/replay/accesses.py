"""The guest memory an x86-64 instruction is about to read or write, for read and access watchpoints.

DR7 watchpoints do not work on our KVM (see PLATFORM.md), and the step
loop's write check compares values, which cannot see reads.  So while a
read or access watchpoint is set, the timeline decodes each instruction
before it runs (capstone) and computes its memory operands from the
registers: explicit operands (including string instructions' rsi/rdi
operands) and the implicit stack accesses of push, pop, call, ret, leave,
pushf, popf and iret.

Not seen: accesses made by the CPU itself (page-table walks, descriptor
tables, the frame an interrupt or exception pushes).  A step that delivers
an interrupt runs no instruction (the timeline skips its decoded operands).
"""
from __future__ import annotations

from typing import Optional

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone import x86_const as X

READ, WRITE = 1, 2     # capstone's CS_AC_READ / CS_AC_WRITE

_md = Cs(CS_ARCH_X86, CS_MODE_64)
_md.detail = True

_PUSHES = {X.X86_INS_PUSH: 8, X.X86_INS_PUSHFQ: 8, X.X86_INS_CALL: 8}
_POPS = {X.X86_INS_POP: 8, X.X86_INS_POPFQ: 8, X.X86_INS_RET: 8, X.X86_INS_IRETQ: 40}
_MASK = (1 << 64) - 1


def _register(name: str, regs) -> Optional[int]:
    """A general register's value by capstone name (64-bit, or the 32-bit eax/r8d forms)."""
    if hasattr(regs, name):
        return getattr(regs, name)
    if name.startswith("e") and hasattr(regs, "r" + name[1:]):
        return getattr(regs, "r" + name[1:]) & 0xFFFFFFFF
    if name.endswith("d") and hasattr(regs, name[:-1]):
        return getattr(regs, name[:-1]) & 0xFFFFFFFF
    return None


def memory_accesses(code: bytes, regs, fs_base: int = 0, gs_base: int = 0) -> list[tuple[int, int, int]]:
    """(address, size, READ|WRITE) for the instruction ``code`` at ``regs.rip``; [] if undecodable."""
    insn = next(_md.disasm(code, regs.rip, 1), None)
    if insn is None:
        return []
    out = []
    for op in insn.operands:
        if op.type != X.X86_OP_MEM:
            continue
        if insn.id in (X.X86_INS_LEA, X.X86_INS_NOP):   # an address, not an access
            continue
        m = op.mem
        addr = m.disp
        if m.base:
            name = insn.reg_name(m.base)
            addr += insn.address + insn.size if name == "rip" else (_register(name, regs) or 0)
        if m.index:
            addr += (_register(insn.reg_name(m.index), regs) or 0) * m.scale
        if m.segment == X.X86_REG_FS:
            addr += fs_base
        elif m.segment == X.X86_REG_GS:
            addr += gs_base
        access = op.access or READ
        out.append((addr & _MASK, op.size, access))
    if insn.id in _PUSHES:
        out.append(((regs.rsp - _PUSHES[insn.id]) & _MASK, _PUSHES[insn.id], WRITE))
    elif insn.id in _POPS:
        out.append((regs.rsp, _POPS[insn.id], READ))
    elif insn.id == X.X86_INS_LEAVE:
        out.append((regs.rbp, 8, READ))
    return out
