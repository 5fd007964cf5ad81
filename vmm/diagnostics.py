"""Human-readable descriptions of vCPU state, exits and instructions.

Used for crash reports (triple fault, emulation failure, timeout) and by the
debugger later; the one place that formats a register dump or disassembles
guest bytes.
"""
from __future__ import annotations

from typing import Iterable

import capstone

from vmm.kvm import Debug, InternalError, IoIn, IoOut, MmioRead, MmioWrite, Regs, Sregs

_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def format_registers(regs: Regs, sregs: Sregs | None = None) -> str:
    lines = []
    for i in range(0, len(_GPRS), 4):
        lines.append("  " + "  ".join(f"{n:>3}={getattr(regs, n):016x}" for n in _GPRS[i:i + 4]))
    lines.append(f"  rip={regs.rip:016x}  rflags={regs.rflags:08x}")
    if sregs is not None:
        lines.append(f"  cs={sregs.cs.selector:04x} (dpl {sregs.cs.dpl}, l={sregs.cs.l})  "
                     f"ss={sregs.ss.selector:04x}  ds={sregs.ds.selector:04x}  CPL{sregs.cpl}")
        lines.append(f"  cr0={sregs.cr0:08x} cr2={sregs.cr2:016x} cr3={sregs.cr3:016x} "
                     f"cr4={sregs.cr4:08x} efer={sregs.efer:x}")
        lines.append(f"  gdt={sregs.gdt_base:x}/{sregs.gdt_limit:x} idt={sregs.idt_base:x}/{sregs.idt_limit:x}")
    return "\n".join(lines)


_MD64 = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


def disassemble_one(code: bytes, address: int) -> tuple[str, int]:
    """('mnemonic operands', length) of the first instruction, or ('(bad)', 0)."""
    for insn in _MD64.disasm(code, address, 1):
        return f"{insn.mnemonic} {insn.op_str}".strip(), insn.size
    return "(bad)", 0


def describe_exit(exit) -> str:
    if isinstance(exit, IoOut):
        width = exit.size * 2
        items = [int.from_bytes(exit.data[i:i + exit.size], "little") for i in range(0, len(exit.data), exit.size)]
        vals = ",".join(f"{v:0{width}x}" for v in items[:4]) + ("..." if len(items) > 4 else "")
        return f"out port {exit.port:#x} size {exit.size} value {vals}"
    if isinstance(exit, IoIn):
        return f"in  port {exit.port:#x} size {exit.size}" + (f" x{exit.count}" if exit.count > 1 else "")
    if isinstance(exit, MmioRead):
        return f"mmio read {exit.addr:#x} len {exit.length}"
    if isinstance(exit, MmioWrite):
        return f"mmio write {exit.addr:#x} data {exit.data.hex()}"
    if isinstance(exit, InternalError):
        return f"KVM internal error, suberror {exit.suberror}"
    if isinstance(exit, Debug):
        return f"debug exit at {exit.pc:#x} (exception {exit.exception})"
    return _EXIT_NAMES.get(type(exit).__name__, type(exit).__name__)


_EXIT_NAMES = {"Hlt": "hlt", "Shutdown": "shutdown (triple fault)", "Interrupted": "kick (timer or input)",
               "IrqWindowOpen": "interrupt window open"}


def format_exits(exits: Iterable) -> str:
    return "\n".join(f"  {describe_exit(e)}" for e in exits) or "  (none)"
