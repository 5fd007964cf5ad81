"""Decode and emulate the instructions through which a guest could see the host.

On this host rdtsc and rdrand return host values and ``cpuid`` answers the
host's bits at CPL0 (PLATFORM.md), so the exact engine looks at every
instruction before stepping it.  A C filter spots candidate opcodes; this
module decides precisely what the bytes are (``decode``) and, for the ones
that read time, randomness or CPU identity, performs them on the register
file (``emulate``) from values the engine supplies and the recording logs.

Decoding follows the SDM:
* Legacy prefixes (F0 F2 F3 2E 36 3E 26 64 65 66 67) in any order and number,
  then in 64-bit code one REX (40-4F).  A REX counts only immediately before
  the opcode: a legacy prefix after it cancels it, and of several REX bytes
  in a row the last one counts.
* LOCK (F0) makes every instruction here raise #UD, so a LOCK-prefixed one
  decodes to None and the CPU faults as it should.  (AMD reads LOCK MOV CR0
  as MOV CR8, which changes no paging register.)
* Of F2 and F3 the last one counts.  RDRAND and RDSEED are "NFx": with F2 or
  F3 they are other instructions (F3 0F C7 /6 is SENDUIPI, F3 0F C7 /7 is
  RDPID), so only RDPID is recognised with a repeat prefix.
* An instruction longer than 15 bytes raises #GP, and a truncated one is
  not an instruction: both decode to None, and the engine steps them so the
  CPU raises what it raises.
* ``long_mode`` means a 64-bit code segment (EFER.LMA and CS.L): only there
  are 40-4F prefixes.  Otherwise the code segment is taken as 32-bit;
  rrstub boots in long mode and has no 16-bit code to step.

``emulate`` assumes the instruction would not fault: the exact engine steps
CPL0 code, where none of these can fail a privilege check, and RDMSR of an
index it cannot answer is left to the CPU.  RDRAND and RDSEED always
succeed.  RF and other exception-related state are the engine's business.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Optional

from vmm.cpuid import lookup
from vmm.kvm import Regs

MAX_INSTRUCTION_LENGTH = 15
LEGACY_PREFIXES = frozenset(b"\xF0\xF2\xF3\x2E\x36\x3E\x26\x64\x65\x66\x67")
LOCK, REPNE, REP, OPSIZE = 0xF0, 0xF2, 0xF3, 0x66
REX_W, REX_B = 0x8, 0x1

IA32_TSC = 0x10

RFLAGS_CF, RFLAGS_PF, RFLAGS_AF = 1 << 0, 1 << 2, 1 << 4
RFLAGS_ZF, RFLAGS_SF, RFLAGS_OF = 1 << 6, 1 << 7, 1 << 11
_RDRAND_CLEARED = RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF

# Register numbers as encoded in ModRM.rm + REX.B.
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

_M16, _M32, _M64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1


class Kind(enum.Enum):
    RDTSC = enum.auto()
    RDTSCP = enum.auto()
    RDRAND = enum.auto()
    RDSEED = enum.auto()
    RDPID = enum.auto()
    CPUID = enum.auto()
    RDMSR = enum.auto()
    HLT = enum.auto()
    CR_WRITE = enum.auto()   # mov to CR0-CR15: paging registers may change
    WRMSR = enum.auto()      # EFER may change


@dataclass(frozen=True, slots=True)
class Special:
    kind: Kind
    length: int      # whole instruction, prefixes included
    opsize: int = 0  # destination width in bits for RDRAND/RDSEED/RDPID, else 0
    reg: int = -1    # destination register number (see GPR_NAMES) for those three, else -1


# Second opcode byte after 0F -> kind, for the instructions without ModRM.
_TWO_BYTE = {0x30: Kind.WRMSR, 0x31: Kind.RDTSC, 0x32: Kind.RDMSR, 0xA2: Kind.CPUID}
_RDTSCP_MODRM = 0xF9  # 0F 01 /7, rm=1


def decode(code: bytes, long_mode: bool = True) -> Optional[Special]:
    """The special instruction at the start of ``code``, or None if it is not one."""
    code = code[:MAX_INSTRUCTION_LENGTH]
    lock = opsize16 = False
    rep = rex = 0
    at = 0
    while at < len(code):
        byte = code[at]
        if byte in LEGACY_PREFIXES:
            lock |= byte == LOCK
            opsize16 |= byte == OPSIZE
            if byte in (REP, REPNE):
                rep = byte
            rex = 0
        elif long_mode and 0x40 <= byte <= 0x4F:
            rex = byte
        else:
            break
        at += 1
    opcode = code[at:at + 3]
    if lock or not opcode:
        return None
    if opcode[0] == 0xF4:
        return Special(Kind.HLT, at + 1)
    if opcode[0] != 0x0F or len(opcode) < 2:
        return None
    if opcode[1] in _TWO_BYTE:
        return Special(_TWO_BYTE[opcode[1]], at + 2)
    if len(opcode) < 3:
        return None
    modrm = opcode[2]
    if opcode[1] == 0x22:
        return Special(Kind.CR_WRITE, at + 3)
    if opcode[1] == 0x01:
        return Special(Kind.RDTSCP, at + 3) if modrm == _RDTSCP_MODRM else None
    if opcode[1] != 0xC7 or modrm >> 6 != 3:
        return None
    group = (modrm >> 3) & 7
    reg = (modrm & 7) | (8 if rex & REX_B else 0)
    if group == 7 and rep == REP:
        return Special(Kind.RDPID, at + 3, 64 if long_mode else 32, reg)
    if group in (6, 7) and not rep:
        opsize = 64 if rex & REX_W else 16 if opsize16 else 32
        return Special(Kind.RDRAND if group == 6 else Kind.RDSEED, at + 3, opsize, reg)
    return None


def _no_msr(index: int) -> Optional[int]:
    return None


@dataclass
class EmulationContext:
    tsc: int                                 # virtual TSC value to return
    random64: Callable[[], int]              # RDRAND/RDSEED: fresh when recording, logged values in replay
    tsc_aux: int = 0                         # IA32_TSC_AUX, for RDTSCP and RDPID (32 bits)
    msr_read: Callable[[int], Optional[int]] = _no_msr  # RDMSR of anything but IA32_TSC; None: let the CPU


def _set_edx_eax(regs: Regs, value: int) -> None:
    regs.rax = value & _M32
    regs.rdx = (value >> 32) & _M32


def _write_gpr(regs: Regs, reg: int, opsize: int, value: int) -> None:
    """A register write as the CPU does it: 32-bit results zero-extend, 16-bit ones merge."""
    name = GPR_NAMES[reg]
    if opsize == 16:
        value = (getattr(regs, name) & ~_M16 & _M64) | (value & _M16)
    setattr(regs, name, value & (_M32 if opsize == 32 else _M64))


def emulate(sp: Special, regs: Regs, ctx: EmulationContext) -> bool:
    """Perform ``sp`` on ``regs`` and step past it; False (regs untouched) if the CPU must run it."""
    match sp.kind:
        case Kind.RDTSC:
            _set_edx_eax(regs, ctx.tsc)
        case Kind.RDTSCP:
            _set_edx_eax(regs, ctx.tsc)
            regs.rcx = ctx.tsc_aux & _M32
        case Kind.RDRAND | Kind.RDSEED:
            _write_gpr(regs, sp.reg, sp.opsize, ctx.random64())
            regs.rflags = (regs.rflags & ~_RDRAND_CLEARED) | RFLAGS_CF
        case Kind.RDPID:
            _write_gpr(regs, sp.reg, sp.opsize, ctx.tsc_aux & _M32)
        case Kind.CPUID:
            regs.rax, regs.rbx, regs.rcx, regs.rdx = lookup(regs.rax & _M32, regs.rcx & _M32)
        case Kind.RDMSR:
            index = regs.rcx & _M32
            value = ctx.tsc if index == IA32_TSC else ctx.msr_read(index)
            if value is None:
                return False
            _set_edx_eax(regs, value)
        case _:
            return False
    regs.rip = (regs.rip + sp.length) & _M64
    return True
