"""Emulate the guest-kernel instructions this host's KVM emulator cannot run.

On kvm_pvm the guest's CPL0 code is executed by KVM's instruction emulator,
which answers KVM_EXIT_INTERNAL_ERROR (emulation failure) for some
instructions Linux uses: ``lock cmpxchg16b`` (SLUB), ``int3`` (the int3
self-test, text_poke_bp), ``popcnt``, ``clac``/``stac``, ``fwait``,
``ldmxcsr``/``stmxcsr``, ``fninit`` and, with XSAVE in CPUID, the
XSAVE/XRSTOR family and ``xgetbv``.  On such an exit the engine reads the
instruction bytes at rip and calls ``emulate``; None means "not one of
ours", and the machine stops with the existing emulation-failure error.

Interface::

    class Cpu(Protocol):                 # supplied by the engine
        regs: Regs                       # changed in place by emulate()
        sregs: Sregs                     # read only: segment bases, CR0/CR4, CPL, EFER.LMA/CS.L
        xcr0: Optional[int]              # XCR0; None: unknown (XGETBV/XSAVE* decline)
        xss: Optional[int]               # IA32_XSS; None: unknown (XSAVES/XRSTORS decline)
        def read(self, vaddr: int, n: int) -> bytes          # linear; raises PageFault
        def write(self, vaddr: int, data: bytes) -> None     # linear; raises PageFault
        def fpu(self) -> bytes | bytearray                   # the KVM_GET_XSAVE area, fetched lazily
        def set_fpu(self, area: bytes) -> None               # KVM_SET_XSAVE

    Emulated(mnemonic, exception=None, cr2=None, soft=False)

    decode(code: bytes, long_mode: bool = True) -> Optional[Instruction]
    code_size(sregs: Sregs) -> Optional[int]     # 64, 32, or None (16-bit/real mode)
    emulate(code: bytes, cpu: Cpu) -> Optional[Emulated]
    execute(insn: Instruction, cpu: Cpu) -> Optional[Emulated]

``emulate`` returns one of three things:

* ``None``: not an instruction emulated here, or one whose outcome would
  need state the emulator does not have (a pending unmasked x87 exception
  at FWAIT, XGETBV with ECX=1, an XSAVE component other than x87/SSE/AVX,
  an unknown XCR0).  Nothing was changed: registers, memory and the FPU
  area are as they were.
* ``Emulated(m)`` with ``exception`` None: done, rip is past it.
* ``Emulated(m, exception=(vector, error_code))``: deliver that exception.
  With ``soft`` False it is a fault: rip is AT the instruction and nothing
  at all was changed (registers, memory, FPU area); ``cr2`` is set for a
  #PF (14).  With ``soft`` True (INT3, INT n) it is a software interrupt:
  rip is already past the instruction, the vector goes through the IDT as
  INT n does (no error code, for any vector), and the saved rip is
  ``regs.rip``.

Determinism: the outcome is a pure function of the register file, the
memory read through ``Cpu.read``, the FPU area and XCR0/XSS, so it is the
same during record and replay.  No host state is consulted.  Commit order:
every check and read comes first, then at most one ``Cpu.write`` (the only
step that can still fault after a read), then registers and ``set_fpu``.
``Cpu.write`` should therefore be all-or-nothing over its range.
``set_fpu`` is called only when the FPU state changed, with a new buffer;
the one returned by ``fpu()`` is never modified.

Decoding follows the SDM (and vmm/x86special.py):

* Legacy prefixes (F0 F2 F3 2E 36 3E 26 64 65 66 67) in any order and
  number, then in 64-bit code one REX (40-4F).  A REX counts only right
  before the opcode: a legacy prefix after it cancels it; of several REX
  bytes the last counts.  Of F2/F3 the last counts, and so does the last
  segment override.
* LOCK is legal only on CMPXCHG8B/16B with a memory operand; on any other
  instruction recognised here it gives #UD, as the CPU would.
* Opcode groups that mandatory prefixes turn into other instructions
  (0F 01, 0F AE, 0F C7) decode to None when 66, F2 or F3 is present (for
  example F3 0F AE /0 is RDFSBASE, 66 0F AE /7 CLFLUSHOPT, F3 0F 01 CA
  ERETU, 66 0F C7 /6 VMCLEAR), except CMPXCHG8B/16B (0F C7 /1), where 66
  is ignored (the operand size is fixed) and F2/F3 are the XACQUIRE/
  XRELEASE hints, ignored without HLE.  POPCNT/LZCNT/TZCNT need F3 last; without it 0F BC/BD are
  BSF/BSR, which KVM emulates itself.  x87 instructions ignore 66/F2/F3/REX.
* More than 15 bytes (#GP on the CPU) or a truncated instruction: None.
* ``long_mode`` means a 64-bit code segment (EFER.LMA and CS.L).  Otherwise
  the code segment is 32-bit (``code_size`` returns None for 16-bit code,
  which ``emulate`` declines); 16-bit addressing (67 in 32-bit code) with
  a memory operand decodes to None.

Effective addresses: full ModRM/SIB/disp8/disp32 decoding.  RIP-relative
(64-bit mode, mod=00 rm=101, REX.B ignored) is relative to the next
instruction; with 67 it is EIP-relative and truncated to 32 bits.  A SIB
base of 101 with mod=00 means disp32 and no base, whatever REX.B says;
index 100 without REX.X means no index (with REX.X it is r12).  With 67 the
registers and the sum are 32-bit.  The default segment is SS when the base
is rsp/rbp (not r12/r13), DS otherwise.  In 64-bit mode only FS and GS have
a base (``sregs.fs.base``/``gs.base``); the linear address must be
canonical (48 bits, 57 with CR4.LA57) at both ends of the access, else
#GP(0), or #SS(0) for an SS access.  In 32-bit mode every segment's base
is added and the sum truncated to 32 bits; segment limits and types are
not checked (rrstub's 32-bit segments are flat).  Alignment checking (#AC,
CR0.AM with EFLAGS.AC at CPL3) is not modelled.

Page faults: a PageFault from ``Cpu.read``/``write`` becomes #PF with
``cr2`` = the fault's ``vaddr``.  The error code is the fault's
``error_code`` attribute when the Cpu supplies one; otherwise it is built
as P=0 (not present), W from the access (a read made for a write, as by
CMPXCHG or XSAVE's header update, counts as a write), U = (CPL == 3),
since vmm.paging.PageFault does not say whether the page was present.

Instructions (64-bit mode, and 32-bit where the encoding exists):

* CMPXCHG16B m128 (REX.W 0F C7 /1) and CMPXCHG8B m64 (0F C7 /1), LOCK
  optional: RDX:RAX (EDX:EAX) against memory; equal: RCX:RBX stored, ZF=1;
  else memory is written back unchanged (the SDM's unconditional write
  cycle, so a read-only page faults either way), RDX:RAX loaded, ZF=0 (for
  CMPXCHG8B the loaded EAX/EDX zero-extend, as 32-bit writes do; on success
  RAX/RDX are not written).  Only ZF changes.  #GP(0) if the m128 is not
  16-byte aligned (linear address); #UD for the register form.  The one
  vCPU makes the read and write atomic.
* INT3 (CC) and INT imm8 (CD ib): soft, rip past, (vector, None).  Gate
  DPL checks are the delivering engine's business.
* CLAC/STAC (0F 01 CA/CB): clear/set RFLAGS.AC.  #UD at CPL>0.  The SDM's
  #UD condition is CPUID.(7,0):EBX.SMAP=0, which the emulator cannot see;
  it uses CR4.SMAP=0 instead (Linux sets CR4.SMAP exactly when it believes
  SMAP exists and patches CLAC/STAC in only then), so a kernel that ran
  CLAC without having enabled SMAP gets #UD here where a CPU with SMAP
  would execute it.
* POPCNT/LZCNT/TZCNT r, r/m (F3 [REX] 0F B8/BD/BC, 16/32/64-bit, register
  or memory source).  POPCNT: ZF = (src == 0), CF OF SF AF PF cleared.
  LZCNT/TZCNT: CF = (src == 0), ZF = (result == 0), OF SF AF PF (undefined
  in the SDM) left unchanged.  LZCNT/TZCNT are emulated as on a CPU that
  has them (not as BSR/BSF); the host has them.  32-bit results
  zero-extend, 16-bit ones merge.
* FWAIT (9B): #NM if CR0.MP and CR0.TS; None if an x87 exception is
  pending unmasked (FSW.ES, or a flag in FSW[5:0] whose FCW mask is
  clear), since #MF delivery is not modelled; else a no-op.  9B DB E3
  (FINIT) is two instructions: the 9B alone decodes, length 1.
* FNINIT (DB E3): FCW=037F, FSW=0, FTW all empty (abridged 0), FOP=FIP=FDP=0;
  ST0-7 and MXCSR unchanged.  FNCLEX (DB E2): FSW[7:0] and B cleared.
  FLDCW m16 (D9 /5): FCW = value with reserved bits 6 (reads 1) and 13-15
  (read 0) forced, and FSW.ES/B recomputed from the new masks.  FNSTCW m16
  (D9 /7), FNSTSW m16 (DD /7), FNSTSW AX (DF E0).  All: #NM if CR0.EM or
  CR0.TS.  None of these update FOP/FIP/FDP (control instructions don't).
* LDMXCSR/STMXCSR m32 (0F AE /2, /3): #UD if CR0.EM or not CR4.OSFXSR; #NM
  if CR0.TS; LDMXCSR #GP(0) if a bit outside MXCSR_MASK (area offset 28;
  0xFFBF when it reads 0) is set.  The VEX forms are not decoded.
* FXSAVE/FXRSTOR m512 (0F AE /0, /1; REX.W: FXSAVE64/FXRSTOR64): #NM if
  CR0.EM or CR0.TS; #GP(0) unless 16-byte aligned.  The area keeps the
  64-bit format (Linux saves with FXSAVE64/XSAVE64), which has no FCS/FDS:
  the 32-bit format stores FIP[31:0]/FDP[31:0] with FCS = FDS = 0 (as CPUs
  that deprecate FCS/FDS do) and loads them zero-extended.  FXSAVE writes
  bytes 0-463 (0-287 outside 64-bit mode: XMM0-7 only), never the 464-511
  software bytes, and stores the effective MXCSR_MASK.  FXRSTOR loads FOP
  masked to 11 bits, #GP(0) on reserved MXCSR bits.  XMM and MXCSR are
  saved and restored whatever CR4.OSFXSR says (the SDM leaves that
  implementation-dependent).
* XGETBV (0F 01 D0): #UD if not CR4.OSXSAVE; ECX=0: EDX:EAX = XCR0; ECX=1
  (XINUSE, optional on CPUs): None; other ECX: #GP(0).
* XSAVE/XSAVEOPT/XRSTOR (0F AE /4, /6, /5) and XSAVEC/XSAVES/XRSTORS
  (0F C7 /4, /5, /3), with REX.W the 64-bit x87 format.  RFBM = EDX:EAX &
  XCR0 (| IA32_XSS for XSAVES/XRSTORS); only components 0-2 (x87, SSE,
  AVX at offset 576, the same in standard and compacted form when nothing
  else is requested) are supported, else None.  #UD if not CR4.OSXSAVE,
  #NM if CR0.TS, #GP(0) unless 64-byte aligned, XSAVES/XRSTORS #GP(0) at
  CPL>0, and XRSTOR's header checks (#GP(0) for XSTATE_BV bits outside
  XCR0, non-zero reserved header bytes, a compacted XCOMP_BV naming
  components outside XCR0(|XSS) or an XSTATE_BV bit outside XCOMP_BV,
  XRSTORS of a standard-form area, reserved MXCSR bits).  XSAVEOPT is done
  as XSAVE (always allowed: it only may skip writes).  Standard XSAVE and
  XRSTOR handle MXCSR when RFBM[1] or RFBM[2] is set, whatever
  XSTATE_BV/XINUSE say; the compacted forms treat it as part of component
  1, and an MXCSR other than 1F80 counts as component 1 in use.

The FPU area: offsets are those of the FXSAVE legacy region (FCW 0, FSW 2,
abridged FTW 4, FOP 6, FIP 8, FDP 16, MXCSR 24, MXCSR_MASK 28, ST0-7 32,
XMM0-15 160), the XSAVE header (XSTATE_BV 512) and AVX (YMM_Hi128 576).
KVM_SET_XSAVE ignores the bytes of a component whose XSTATE_BV bit is
clear (the component is set to its initial state), and KVM_GET_XSAVE fills
such a component with initial values.  So the emulator reads a component
whose bit is clear as its initial configuration (x87: FCW 037F, everything
else 0; SSE/AVX registers 0; MXCSR is taken as stored), and when it
changes a component it sets that component's XSTATE_BV bit in the area it
hands to ``set_fpu`` (x87 -> bit 0; MXCSR or XMM -> bit 1; YMM -> bit 2):
setting the bit is always correct, because the area then holds the exact
state.  After FNINIT bit 0 is therefore set even though x87 state may now
equal its initial configuration (ST0-7 keep their values, so it need not).
An XRSTOR that initialises a component clears its bit and writes the
initial values, except that bit 1 stays set while MXCSR is not 1F80 (so
KVM keeps the MXCSR).

Not emulated: RDRAND/RDSEED/RDTSC/CPUID and friends (vmm/x86special.py),
VEX forms (VLDMXCSR/VSTMXCSR), FSAVE/FRSTOR/FSTENV/FLDENV, x87 arithmetic,
INTO/INT1, #MF delivery, XGETBV ECX=1, XSAVE components above AVX, 16-bit
code and addressing, segment limit checks.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Protocol

from vmm.kvm import REG_NAMES, Regs, Sregs
from vmm.paging import PageFault
from vmm.x86special import (GPR_NAMES, LEGACY_PREFIXES, LOCK, MAX_INSTRUCTION_LENGTH, OPSIZE, REP,
                            REPNE, REX_B, REX_W, RFLAGS_AF, RFLAGS_CF, RFLAGS_OF, RFLAGS_PF,
                            RFLAGS_SF, RFLAGS_ZF)

ADDRSIZE = 0x67
REX_R, REX_X = 0x4, 0x2
SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}

RFLAGS_AC = 1 << 18
_POPCNT_CLEARED = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF

CR0_PE, CR0_MP, CR0_EM, CR0_TS = 1 << 0, 1 << 1, 1 << 2, 1 << 3
CR4_LA57, CR4_OSFXSR, CR4_OSXSAVE, CR4_SMAP = 1 << 12, 1 << 9, 1 << 18, 1 << 21
EFER_LMA = 1 << 10

# Exception vectors.
UD, NM, SS_FAULT, GP, PF, BP = 6, 7, 12, 13, 14, 3
PF_PRESENT, PF_WRITE, PF_USER = 1 << 0, 1 << 1, 1 << 2

# The FXSAVE legacy region and the XSAVE header, as offsets into the area.
FCW, FSW, FTW, FOP, FIP, FDP, MXCSR, MXCSR_MASK, ST0, XMM0 = 0, 2, 4, 6, 8, 16, 24, 28, 32, 160
XSTATE_BV, XCOMP_BV, XSAVE_HEADER, AVX_OFFSET = 512, 520, 512, 576
LEGACY_SIZE, AVX_SIZE = 512, 256
FCW_INIT, MXCSR_INIT, MXCSR_MASK_DEFAULT = 0x037F, 0x1F80, 0xFFBF
FSW_ES, FSW_B = 1 << 7, 1 << 15
FCW_RESERVED, FCW_RESERVED_ONES = 0xE0C0, 0x0040
XFEATURE_X87, XFEATURE_SSE, XFEATURE_AVX = 1 << 0, 1 << 1, 1 << 2
XFEATURES_SUPPORTED = XFEATURE_X87 | XFEATURE_SSE | XFEATURE_AVX
XCOMP_COMPACTED = 1 << 63

_M16, _M32, _M64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1


class Op(enum.Enum):
    CMPXCHG8B = "cmpxchg8b"
    CMPXCHG16B = "cmpxchg16b"
    INT3 = "int3"
    INT = "int"
    CLAC = "clac"
    STAC = "stac"
    POPCNT = "popcnt"
    LZCNT = "lzcnt"
    TZCNT = "tzcnt"
    FWAIT = "fwait"
    FNINIT = "fninit"
    FNCLEX = "fnclex"
    FLDCW = "fldcw"
    FNSTCW = "fnstcw"
    FNSTSW = "fnstsw"        # m16
    FNSTSW_AX = "fnstsw ax"
    LDMXCSR = "ldmxcsr"
    STMXCSR = "stmxcsr"
    FXSAVE = "fxsave"
    FXRSTOR = "fxrstor"
    XGETBV = "xgetbv"
    XSAVE = "xsave"
    XSAVEOPT = "xsaveopt"
    XRSTOR = "xrstor"
    XSAVEC = "xsavec"
    XSAVES = "xsaves"
    XRSTORS = "xrstors"


# Instructions whose REX.W form is a separate mnemonic ("fxsave64").
_W_NAMED = frozenset({Op.FXSAVE, Op.FXRSTOR, Op.XSAVE, Op.XSAVEOPT, Op.XRSTOR,
                      Op.XSAVEC, Op.XSAVES, Op.XRSTORS})


@dataclass(frozen=True, slots=True)
class MemRef:
    """A ModRM memory operand, before registers are read.

    ``base``/``index`` are register numbers (GPR_NAMES order) or None; the
    effective address is base + index * scale + disp (or next rip + disp
    when ``rip_relative``), in ``addr_size`` bits, plus ``segment``'s base.
    """
    base: Optional[int]
    index: Optional[int]
    scale: int
    disp: int            # signed
    rip_relative: bool
    addr_size: int       # 64 or 32
    segment: str         # "ds", "ss", "fs", ... after defaults and overrides


@dataclass(frozen=True, slots=True)
class Instruction:
    op: Op
    length: int                      # whole instruction, prefixes included
    long_mode: bool
    opsize: int = 0                  # POPCNT/LZCNT/TZCNT operand size in bits, else 0
    reg: int = -1                    # ModRM.reg + REX.R (destination register), else -1
    rm: int = -1                     # register operand when ModRM.mod = 3, else -1
    mem: Optional[MemRef] = None     # memory operand when ModRM.mod != 3
    rex_w: bool = False
    lock: bool = False
    imm: int = 0                     # INT imm8's vector

    @property
    def mnemonic(self) -> str:
        name = self.op.value.split()[0]     # "fnstsw ax" -> "fnstsw"
        return name + "64" if self.op in _W_NAMED and self.rex_w else name


@dataclass(frozen=True, slots=True)
class Emulated:
    mnemonic: str                                       # e.g. "cmpxchg16b", for counting and reports
    exception: Optional[tuple[int, Optional[int]]] = None  # (vector, error code) to deliver, see module doc
    cr2: Optional[int] = None                           # the faulting linear address, for a #PF
    soft: bool = False                                  # INT3/INT n: software interrupt, rip past it


class Cpu(Protocol):
    regs: Regs
    sregs: Sregs
    xcr0: Optional[int]
    xss: Optional[int]

    def read(self, vaddr: int, n: int) -> bytes: ...

    def write(self, vaddr: int, data: bytes) -> None: ...

    def fpu(self) -> bytes | bytearray: ...

    def set_fpu(self, area: bytes) -> None: ...


# ---------------------------------------------------------------------------
# Decoding


def _modrm(code: bytes, at: int, rex: int, long_mode: bool, addr_override: bool,
           segment: Optional[str]) -> Optional[tuple[int, int, int, Optional[MemRef], int]]:
    """(mod, reg, rm register or -1, memory operand or None, offset after it); None if truncated/16-bit."""
    if at >= len(code):
        return None
    modrm = code[at]
    at += 1
    mod, reg = modrm >> 6, ((modrm >> 3) & 7) | (8 if rex & REX_R else 0)
    rm = modrm & 7
    if mod == 3:
        return mod, reg, rm | (8 if rex & REX_B else 0), None, at
    addr_size = (32 if addr_override else 64) if long_mode else (16 if addr_override else 32)
    if addr_size == 16:
        return None
    base: Optional[int] = None
    index: Optional[int] = None
    scale, rip_relative, disp_len = 1, False, (0, 1, 4)[mod]
    if rm == 4:
        if at >= len(code):
            return None
        sib = code[at]
        at += 1
        idx = ((sib >> 3) & 7) | (8 if rex & REX_X else 0)
        if idx != 4:
            index, scale = idx, 1 << (sib >> 6)
        if sib & 7 == 5 and mod == 0:
            disp_len = 4
        else:
            base = (sib & 7) | (8 if rex & REX_B else 0)
    elif rm == 5 and mod == 0:
        rip_relative = long_mode
        disp_len = 4
    else:
        base = rm | (8 if rex & REX_B else 0)
    if at + disp_len > len(code):
        return None
    disp = int.from_bytes(code[at:at + disp_len], "little", signed=True)
    at += disp_len
    if segment is None:
        segment = "ss" if base in (4, 5) else "ds"
    return mod, reg, -1, MemRef(base, index, scale, disp, rip_relative, addr_size, segment), at


_GROUP_0FAE = {0: Op.FXSAVE, 1: Op.FXRSTOR, 2: Op.LDMXCSR, 3: Op.STMXCSR,
               4: Op.XSAVE, 5: Op.XRSTOR, 6: Op.XSAVEOPT}
_GROUP_0FC7 = {1: Op.CMPXCHG8B, 3: Op.XRSTORS, 4: Op.XSAVEC, 5: Op.XSAVES}
_BIT_COUNTS = {0xB8: Op.POPCNT, 0xBC: Op.TZCNT, 0xBD: Op.LZCNT}
_0F01 = {0xCA: Op.CLAC, 0xCB: Op.STAC, 0xD0: Op.XGETBV}
_X87_REG = {(0xDB, 0xE2): Op.FNCLEX, (0xDB, 0xE3): Op.FNINIT, (0xDF, 0xE0): Op.FNSTSW_AX}
_X87_MEM = {(0xD9, 5): Op.FLDCW, (0xD9, 7): Op.FNSTCW, (0xDD, 7): Op.FNSTSW}


def decode(code: bytes, long_mode: bool = True) -> Optional[Instruction]:
    """The instruction at the start of ``code`` if it is one emulated here, else None."""
    code = bytes(code[:MAX_INSTRUCTION_LENGTH])
    lock = opsize16 = addr_override = False
    rep = rex = 0
    segment: Optional[str] = None
    at = 0
    while at < len(code):
        byte = code[at]
        if byte in LEGACY_PREFIXES:
            lock |= byte == LOCK
            opsize16 |= byte == OPSIZE
            addr_override |= byte == ADDRSIZE
            if byte in (REP, REPNE):
                rep = byte
            segment = SEGMENT_PREFIXES.get(byte, segment)
            rex = 0
        elif long_mode and 0x40 <= byte <= 0x4F:
            rex = byte
        else:
            break
        at += 1
    if at >= len(code):
        return None
    first = code[at]
    at += 1
    rex_w = bool(rex & REX_W)
    common = dict(long_mode=long_mode, rex_w=rex_w, lock=lock)

    if first == 0xCC:
        return Instruction(Op.INT3, at, **common)
    if first == 0xCD:
        if at >= len(code):
            return None
        return Instruction(Op.INT, at + 1, imm=code[at], **common)
    if first == 0x9B:
        return Instruction(Op.FWAIT, at, **common)
    if first in (0xD9, 0xDB, 0xDD, 0xDF):
        if at >= len(code):
            return None
        if (first, code[at]) in _X87_REG:
            return Instruction(_X87_REG[first, code[at]], at + 1, **common)
        parsed = _modrm(code, at, rex, long_mode, addr_override, segment)
        if parsed is None or parsed[3] is None:
            return None
        op = _X87_MEM.get((first, (code[at] >> 3) & 7))
        return Instruction(op, parsed[4], mem=parsed[3], **common) if op else None
    if first != 0x0F or at >= len(code):
        return None
    second = code[at]
    at += 1

    if second in _BIT_COUNTS:
        if rep != REP:
            return None
        parsed = _modrm(code, at, rex, long_mode, addr_override, segment)
        if parsed is None:
            return None
        _, reg, rm, mem, end = parsed
        opsize = 64 if rex_w else 16 if opsize16 else 32
        return Instruction(_BIT_COUNTS[second], end, opsize=opsize, reg=reg, rm=rm, mem=mem, **common)
    if second not in (0x01, 0xAE, 0xC7):
        return None
    if second == 0x01:
        if opsize16 or rep or at >= len(code) or code[at] not in _0F01:
            return None
        return Instruction(_0F01[code[at]], at + 1, **common)
    parsed = _modrm(code, at, rex, long_mode, addr_override, segment)
    if parsed is None:
        return None
    mod, reg, rm, mem, end = parsed
    group = reg & 7
    # 66/F2/F3 make other instructions of these groups (see the module doc),
    # except on 0F C7 /1, whose operand size is fixed and where F2/F3 are the
    # XACQUIRE/XRELEASE hints, ignored by CPUs without HLE.
    if (opsize16 or rep) and not (second == 0xC7 and group == 1):
        return None
    if second == 0xAE:
        op = _GROUP_0FAE.get(group)
        return Instruction(op, end, mem=mem, **common) if op and mem else None
    op = _GROUP_0FC7.get(group)
    if op is None or (mem is None and op is not Op.CMPXCHG8B):
        return None   # the register forms of /6 and /7 are RDRAND, RDSEED, RDPID: vmm/x86special.py
    if op is Op.CMPXCHG8B and rex_w:
        op = Op.CMPXCHG16B
    return Instruction(op, end, rm=rm, mem=mem, **common)


def code_size(sregs: Sregs) -> Optional[int]:
    """64 for a 64-bit code segment, 32 for a 32-bit one, None for 16-bit code and real mode."""
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return 64
    if sregs.cr0 & CR0_PE and sregs.cs.db:
        return 32
    return None


# ---------------------------------------------------------------------------
# Execution


class _Fault(Exception):
    def __init__(self, vector: int, error_code: Optional[int] = None, cr2: Optional[int] = None):
        super().__init__(vector)
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2


class _Decline(Exception):
    """Not emulated after all: return None with nothing changed."""


def _u(buf, offset: int, size: int) -> int:
    return int.from_bytes(buf[offset:offset + size], "little")


def _put(buf: bytearray, offset: int, size: int, value: int) -> None:
    buf[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


class _Exec:
    """One instruction's execution: the Cpu, a lazily fetched FPU copy, and the commit rules."""

    def __init__(self, insn: Instruction, cpu: Cpu):
        self.insn, self.cpu = insn, cpu
        self.regs, self.sregs = cpu.regs, cpu.sregs
        self._area: Optional[bytearray] = None
        self._area_len = 0
        self.fpu_dirty = 0        # XSTATE_BV bits to set in the committed area
        self.fpu_cleared = 0      # XSTATE_BV bits to clear (XRSTOR of an initial component)

    # -- registers -----------------------------------------------------
    def gpr(self, reg: int) -> int:
        return getattr(self.regs, GPR_NAMES[reg])

    def set_gpr(self, reg: int, bits: int, value: int) -> None:
        """A register write as the CPU does it: 32-bit results zero-extend, 16-bit ones merge."""
        name = GPR_NAMES[reg]
        if bits == 16:
            value = (getattr(self.regs, name) & ~_M16 & _M64) | (value & _M16)
        setattr(self.regs, name, value & (_M32 if bits == 32 else _M64))

    # -- memory ----------------------------------------------------------
    def linear(self) -> int:
        mem = self.insn.mem
        assert mem is not None
        mask = _M64 if mem.addr_size == 64 else _M32
        if mem.rip_relative:
            ea = self.regs.rip + self.insn.length + mem.disp
        else:
            ea = mem.disp
            if mem.base is not None:
                ea += self.gpr(mem.base) & mask
            if mem.index is not None:
                ea += (self.gpr(mem.index) & mask) * mem.scale
        ea &= mask
        if self.insn.long_mode:
            base = getattr(self.sregs, mem.segment).base if mem.segment in ("fs", "gs") else 0
            return (base + ea) & _M64
        return (getattr(self.sregs, mem.segment).base + ea) & _M32

    def _check_linear(self, vaddr: int, n: int) -> None:
        if not self.insn.long_mode:
            return
        bits = 57 if self.sregs.cr4 & CR4_LA57 else 48
        last = vaddr + n - 1
        for a in (vaddr, last):
            top = a >> (bits - 1)
            if a > _M64 or top not in (0, (1 << (65 - bits)) - 1):
                ss = self.insn.mem is not None and self.insn.mem.segment == "ss"
                raise _Fault(SS_FAULT if ss else GP, 0)

    def _page_fault(self, fault: PageFault, vaddr: int, write: bool) -> _Fault:
        code = getattr(fault, "error_code", None)
        if not isinstance(code, int):
            code = (PF_WRITE if write else 0) | (PF_USER if self.sregs.cpl == 3 else 0)
        cr2 = getattr(fault, "vaddr", None)
        return _Fault(PF, code, (vaddr if cr2 is None else cr2) & _M64)

    def read(self, vaddr: int, n: int, for_write: bool = False) -> bytes:
        self._check_linear(vaddr, n)
        try:
            data = bytes(self.cpu.read(vaddr, n))
        except PageFault as fault:
            raise self._page_fault(fault, vaddr, for_write) from None
        if len(data) != n:
            raise ValueError(f"Cpu.read({vaddr:#x}, {n}) returned {len(data)} bytes")
        return data

    def write(self, vaddr: int, data: bytes) -> None:
        self._check_linear(vaddr, len(data))
        try:
            self.cpu.write(vaddr, bytes(data))
        except PageFault as fault:
            raise self._page_fault(fault, vaddr, True) from None

    def aligned(self, vaddr: int, alignment: int) -> int:
        if vaddr & (alignment - 1):
            raise _Fault(GP, 0)
        return vaddr

    # -- FPU -------------------------------------------------------------
    @property
    def area(self) -> bytearray:
        """A working copy of the FPU area, components whose XSTATE_BV bit is clear in initial state."""
        if self._area is None:
            raw = bytes(self.cpu.fpu())
            if len(raw) < XSAVE_HEADER + 64:
                raise ValueError(f"the FPU area is {len(raw)} bytes, less than the legacy region and header")
            self._area_len = len(raw)
            area = bytearray(raw.ljust(AVX_OFFSET + AVX_SIZE, b"\0"))
            bv = _u(area, XSTATE_BV, 8)
            if not bv & XFEATURE_X87:
                _x87_init(area)
                area[ST0:XMM0] = bytes(XMM0 - ST0)
            if not bv & XFEATURE_SSE:
                area[XMM0:XMM0 + 256] = bytes(256)
            if not bv & XFEATURE_AVX:
                area[AVX_OFFSET:AVX_OFFSET + AVX_SIZE] = bytes(AVX_SIZE)
            self._area = area
        return self._area

    def xinuse(self) -> int:
        bv = _u(self.area, XSTATE_BV, 8) & XFEATURES_SUPPORTED
        if _u(self.area, MXCSR, 4) != MXCSR_INIT:
            bv |= XFEATURE_SSE
        return bv

    def mxcsr_mask(self) -> int:
        return _u(self.area, MXCSR_MASK, 4) or MXCSR_MASK_DEFAULT

    def check_mxcsr(self, value: int) -> int:
        if value & ~self.mxcsr_mask():
            raise _Fault(GP, 0)
        return value

    def commit_fpu(self) -> None:
        if self._area is None or not (self.fpu_dirty | self.fpu_cleared):
            return
        area = self._area
        bv = (_u(area, XSTATE_BV, 8) & ~self.fpu_cleared) | self.fpu_dirty
        if _u(area, MXCSR, 4) != MXCSR_INIT:
            bv |= XFEATURE_SSE
        _put(area, XSTATE_BV, 8, bv)
        self.cpu.set_fpu(bytes(area[:self._area_len]))

    # -- checks ----------------------------------------------------------
    def x87_available(self) -> None:
        if self.sregs.cr0 & (CR0_EM | CR0_TS):
            raise _Fault(NM)

    def sse_available(self) -> None:
        if self.sregs.cr0 & CR0_EM or not self.sregs.cr4 & CR4_OSFXSR:
            raise _Fault(UD)
        if self.sregs.cr0 & CR0_TS:
            raise _Fault(NM)

    def xsave_available(self) -> int:
        """XCR0, after the checks every XSAVE-family instruction makes."""
        if not self.sregs.cr4 & CR4_OSXSAVE:
            raise _Fault(UD)
        if self.sregs.cr0 & CR0_TS:
            raise _Fault(NM)
        xcr0 = getattr(self.cpu, "xcr0", None)
        if xcr0 is None:
            raise _Decline
        return xcr0


def _x87_init(area: bytearray) -> None:
    """FNINIT's effect on the legacy region: control, status, tag, opcode and pointers."""
    _put(area, FCW, 2, FCW_INIT)
    area[FSW:MXCSR] = bytes(MXCSR - FSW)


def _x87_to_image(area: bytearray, image: bytearray, w64: bool) -> None:
    """Bytes 0-23 and 32-159 of an FXSAVE/XSAVE image from the (64-bit format) area."""
    image[0:FIP] = area[0:FIP]
    image[5] = 0
    _put(image, FOP, 2, _u(area, FOP, 2) & 0x7FF)
    if w64:
        image[FIP:MXCSR] = area[FIP:MXCSR]
    else:   # FIP[31:0], FCS, reserved, FDP[31:0], FDS, reserved
        image[FIP:MXCSR] = (area[FIP:FIP + 4] + bytes(4) + area[FDP:FDP + 4] + bytes(4))
    image[ST0:XMM0] = area[ST0:XMM0]


def _x87_from_image(image: bytes, area: bytearray, w64: bool) -> None:
    area[0:FIP] = image[0:FIP]
    area[5] = 0
    _put(area, FOP, 2, _u(image, FOP, 2) & 0x7FF)
    if w64:
        area[FIP:MXCSR] = image[FIP:MXCSR]
    else:
        _put(area, FIP, 8, _u(image, FIP, 4))
        _put(area, FDP, 8, _u(image, FDP, 4))
    area[ST0:XMM0] = image[ST0:XMM0]


def _xmm_bytes(insn: Instruction) -> int:
    return (16 if insn.long_mode else 8) * 16


# -- the instructions ------------------------------------------------------

def _cmpxchg(x: _Exec) -> None:
    insn, regs = x.insn, x.regs
    if insn.mem is None:
        raise _Fault(UD)
    size = 16 if insn.op is Op.CMPXCHG16B else 8
    half, mask = size // 2, (1 << (size * 4)) - 1
    vaddr = x.linear()
    if size == 16:
        x.aligned(vaddr, 16)
    old = x.read(vaddr, size, for_write=True)
    low, high = _u(old, 0, half), _u(old, half, half)
    if low == regs.rax & mask and high == regs.rdx & mask:
        x.write(vaddr, ((regs.rbx & mask) | (regs.rcx & mask) << (size * 4)).to_bytes(size, "little"))
        regs.rflags |= RFLAGS_ZF
    else:
        x.write(vaddr, old)
        regs.rflags &= ~RFLAGS_ZF & _M64
        regs.rax, regs.rdx = low, high


def _bit_count(x: _Exec) -> None:
    insn, regs = x.insn, x.regs
    bits = insn.opsize
    if insn.mem is None:
        src = x.gpr(insn.rm) & ((1 << bits) - 1)
    else:
        src = _u(x.read(x.linear(), bits // 8), 0, bits // 8)
    flags = regs.rflags
    if insn.op is Op.POPCNT:
        result = bin(src).count("1")
        flags = (flags & ~_POPCNT_CLEARED) | (RFLAGS_ZF if src == 0 else 0)
    else:
        if insn.op is Op.LZCNT:
            result = bits - src.bit_length()
        else:
            result = (src & -src).bit_length() - 1 if src else bits
        flags &= ~(RFLAGS_CF | RFLAGS_ZF)
        flags |= (RFLAGS_CF if src == 0 else 0) | (RFLAGS_ZF if result == 0 else 0)
    x.set_gpr(insn.reg, bits, result)
    regs.rflags = flags & _M64


def _clac_stac(x: _Exec) -> None:
    if x.sregs.cpl > 0 or not x.sregs.cr4 & CR4_SMAP:
        raise _Fault(UD)
    if x.insn.op is Op.STAC:
        x.regs.rflags |= RFLAGS_AC
    else:
        x.regs.rflags &= ~RFLAGS_AC & _M64


def _fwait(x: _Exec) -> None:
    if x.sregs.cr0 & CR0_MP and x.sregs.cr0 & CR0_TS:
        raise _Fault(NM)
    fsw, fcw = _u(x.area, FSW, 2), _u(x.area, FCW, 2)
    if fsw & FSW_ES or fsw & ~fcw & 0x3F:
        raise _Decline   # #MF would be raised; not modelled


def _x87_control(x: _Exec) -> None:
    x.x87_available()
    insn, area = x.insn, x.area
    op = insn.op
    if op is Op.FNINIT:
        _x87_init(area)
    elif op is Op.FNCLEX:
        _put(area, FSW, 2, _u(area, FSW, 2) & 0x7F00)
    elif op is Op.FLDCW:
        fcw = (_u(x.read(x.linear(), 2), 0, 2) & ~FCW_RESERVED) | FCW_RESERVED_ONES
        fsw = _u(area, FSW, 2)
        fsw = fsw | FSW_ES | FSW_B if fsw & ~fcw & 0x3F else fsw & ~(FSW_ES | FSW_B)
        _put(area, FCW, 2, fcw)
        _put(area, FSW, 2, fsw)
    elif op is Op.FNSTSW_AX:
        x.set_gpr(0, 16, _u(area, FSW, 2))
        return
    else:   # FNSTCW, FNSTSW m16
        x.write(x.linear(), bytes(area[FCW:FCW + 2] if op is Op.FNSTCW else area[FSW:FSW + 2]))
        return
    x.fpu_dirty |= XFEATURE_X87


def _mxcsr(x: _Exec) -> None:
    x.sse_available()
    vaddr = x.linear()
    if x.insn.op is Op.STMXCSR:
        x.write(vaddr, bytes(x.area[MXCSR:MXCSR + 4]))
        return
    value = x.check_mxcsr(_u(x.read(vaddr, 4), 0, 4))
    _put(x.area, MXCSR, 4, value)
    x.fpu_dirty |= XFEATURE_SSE


def _fxsave_fxrstor(x: _Exec) -> None:
    x.x87_available()
    insn, area = x.insn, x.area
    vaddr = x.aligned(x.linear(), 16)
    xmm = _xmm_bytes(insn)
    if insn.op is Op.FXSAVE:
        image = bytearray(XMM0 + xmm)
        _x87_to_image(area, image, insn.rex_w)
        _put(image, MXCSR, 4, _u(area, MXCSR, 4))
        _put(image, MXCSR_MASK, 4, x.mxcsr_mask())
        image[XMM0:] = area[XMM0:XMM0 + xmm]
        if insn.long_mode:
            image += area[XMM0 + xmm:464]    # reserved 416-463; 464-511 are software's
        x.write(vaddr, bytes(image))
        return
    image = x.read(vaddr, LEGACY_SIZE)
    mxcsr = x.check_mxcsr(_u(image, MXCSR, 4))
    _x87_from_image(image, area, insn.rex_w)
    _put(area, MXCSR, 4, mxcsr)
    area[XMM0:XMM0 + xmm] = image[XMM0:XMM0 + xmm]
    x.fpu_dirty |= XFEATURE_X87 | XFEATURE_SSE


def _xgetbv(x: _Exec) -> None:
    if not x.sregs.cr4 & CR4_OSXSAVE:
        raise _Fault(UD)
    xcr0 = getattr(x.cpu, "xcr0", None)
    index = x.regs.rcx & _M32
    if xcr0 is None or index == 1:
        raise _Decline
    if index != 0:
        raise _Fault(GP, 0)
    x.regs.rax, x.regs.rdx = xcr0 & _M32, (xcr0 >> 32) & _M32


def _rfbm(x: _Exec, supervisor: bool) -> tuple[int, int]:
    """(RFBM, the enabled components XCR0 (| XSS)), after the family's checks.

    _Decline if XCR0/XSS is unknown or RFBM names a component not supported here.
    """
    enabled = x.xsave_available()
    if supervisor:
        if x.sregs.cpl > 0:
            raise _Fault(GP, 0)
        xss = getattr(x.cpu, "xss", None)
        if xss is None:
            raise _Decline
        enabled |= xss
    rfbm = enabled & ((x.regs.rdx & _M32) << 32 | (x.regs.rax & _M32))
    if rfbm & ~XFEATURES_SUPPORTED:
        raise _Decline
    return rfbm, enabled


def _xsave(x: _Exec) -> None:
    """XSAVE and XSAVEOPT (standard form), XSAVEC and XSAVES (compacted form)."""
    insn = x.insn
    compacted = insn.op in (Op.XSAVEC, Op.XSAVES)
    rfbm, _ = _rfbm(x, insn.op is Op.XSAVES)
    vaddr = x.aligned(x.linear(), 64)
    area, inuse = x.area, x.xinuse()
    # Standard form: every requested component; compacted: only those in use.
    saved = rfbm & inuse if compacted else rfbm
    size = AVX_OFFSET + (AVX_SIZE if saved & XFEATURE_AVX else 0)
    image = bytearray(x.read(vaddr, size, for_write=True))
    xmm = _xmm_bytes(insn)
    if saved & XFEATURE_X87:
        _x87_to_image(area, image, insn.rex_w)
    if (saved & XFEATURE_SSE) if compacted else (rfbm & (XFEATURE_SSE | XFEATURE_AVX)):
        _put(image, MXCSR, 4, _u(area, MXCSR, 4))
        _put(image, MXCSR_MASK, 4, x.mxcsr_mask())
    if saved & XFEATURE_SSE:
        image[XMM0:XMM0 + xmm] = area[XMM0:XMM0 + xmm]
    if saved & XFEATURE_AVX:
        image[AVX_OFFSET:AVX_OFFSET + AVX_SIZE] = area[AVX_OFFSET:AVX_OFFSET + AVX_SIZE]
    if compacted:
        _put(image, XSTATE_BV, 8, inuse & rfbm)
        _put(image, XCOMP_BV, 8, XCOMP_COMPACTED | rfbm)
    else:
        _put(image, XSTATE_BV, 8, (_u(image, XSTATE_BV, 8) & ~rfbm) | (inuse & rfbm))
    x.write(vaddr, bytes(image))


def _xrstor(x: _Exec) -> None:
    """XRSTOR (standard or compacted form, by XCOMP_BV[63]) and XRSTORS (compacted only)."""
    insn = x.insn
    supervisor = insn.op is Op.XRSTORS
    rfbm, enabled = _rfbm(x, supervisor)
    xcr0 = x.cpu.xcr0
    vaddr = x.aligned(x.linear(), 64)
    image = x.read(vaddr, AVX_OFFSET)
    xstate_bv, xcomp_bv = _u(image, XSTATE_BV, 8), _u(image, XCOMP_BV, 8)
    compacted = bool(xcomp_bv & XCOMP_COMPACTED)
    if compacted:
        if (xcomp_bv & ~XCOMP_COMPACTED & ~enabled or xstate_bv & ~xcomp_bv
                or any(image[XSAVE_HEADER + 16:XSAVE_HEADER + 64])):
            raise _Fault(GP, 0)
    elif supervisor or xstate_bv & ~xcr0 or any(image[XSAVE_HEADER + 8:XSAVE_HEADER + 24]):
        raise _Fault(GP, 0)
    load = rfbm & xstate_bv
    if load & XFEATURE_AVX:
        image += x.read(vaddr + AVX_OFFSET, AVX_SIZE)
    area, xmm = x.area, _xmm_bytes(insn)
    if compacted:
        mxcsr = (x.check_mxcsr(_u(image, MXCSR, 4)) if load & XFEATURE_SSE else MXCSR_INIT) \
            if rfbm & XFEATURE_SSE else None
    else:
        mxcsr = x.check_mxcsr(_u(image, MXCSR, 4)) if rfbm & (XFEATURE_SSE | XFEATURE_AVX) else None
    if rfbm & XFEATURE_X87:
        if load & XFEATURE_X87:
            _x87_from_image(image, area, insn.rex_w)
        else:
            _x87_init(area)
            area[ST0:XMM0] = bytes(XMM0 - ST0)
    if mxcsr is not None:
        _put(area, MXCSR, 4, mxcsr)
    if rfbm & XFEATURE_SSE:
        area[XMM0:XMM0 + xmm] = image[XMM0:XMM0 + xmm] if load & XFEATURE_SSE else bytes(xmm)
    if rfbm & XFEATURE_AVX:
        area[AVX_OFFSET:AVX_OFFSET + AVX_SIZE] = (
            image[AVX_OFFSET:AVX_OFFSET + AVX_SIZE] if load & XFEATURE_AVX else bytes(AVX_SIZE))
    x.fpu_dirty |= load
    x.fpu_cleared |= rfbm & ~load
    if mxcsr is not None and mxcsr != MXCSR_INIT:
        x.fpu_dirty |= XFEATURE_SSE


_HANDLERS = {
    Op.CMPXCHG8B: _cmpxchg, Op.CMPXCHG16B: _cmpxchg,
    Op.POPCNT: _bit_count, Op.LZCNT: _bit_count, Op.TZCNT: _bit_count,
    Op.CLAC: _clac_stac, Op.STAC: _clac_stac,
    Op.FWAIT: _fwait,
    Op.FNINIT: _x87_control, Op.FNCLEX: _x87_control, Op.FLDCW: _x87_control,
    Op.FNSTCW: _x87_control, Op.FNSTSW: _x87_control, Op.FNSTSW_AX: _x87_control,
    Op.LDMXCSR: _mxcsr, Op.STMXCSR: _mxcsr,
    Op.FXSAVE: _fxsave_fxrstor, Op.FXRSTOR: _fxsave_fxrstor,
    Op.XGETBV: _xgetbv,
    Op.XSAVE: _xsave, Op.XSAVEOPT: _xsave, Op.XSAVEC: _xsave, Op.XSAVES: _xsave,
    Op.XRSTOR: _xrstor, Op.XRSTORS: _xrstor,
}
_LOCKABLE = frozenset({Op.CMPXCHG8B, Op.CMPXCHG16B})


def execute(insn: Instruction, cpu: Cpu) -> Optional[Emulated]:
    """Perform a decoded instruction on ``cpu``; see the module docstring for the three outcomes."""
    name = insn.mnemonic
    if insn.lock and (insn.op not in _LOCKABLE or insn.mem is None):
        return Emulated(name, exception=(UD, None))
    if insn.op in (Op.INT3, Op.INT):
        cpu.regs.rip = (cpu.regs.rip + insn.length) & (_M64 if insn.long_mode else _M32)
        return Emulated(name, exception=(BP if insn.op is Op.INT3 else insn.imm, None), soft=True)
    x = _Exec(insn, cpu)
    saved = Regs(**{f: getattr(cpu.regs, f) for f in REG_NAMES})
    try:
        _HANDLERS[insn.op](x)
    except _Fault as fault:
        _restore(cpu.regs, saved)
        return Emulated(name, exception=(fault.vector, fault.error_code), cr2=fault.cr2)
    except _Decline:
        _restore(cpu.regs, saved)
        return None
    x.commit_fpu()
    cpu.regs.rip = (cpu.regs.rip + insn.length) & (_M64 if insn.long_mode else _M32)
    return Emulated(name)


def _restore(regs: Regs, saved: Regs) -> None:
    """Handlers write registers only after their last fallible step; this is the belt to those braces."""
    for f in REG_NAMES:
        setattr(regs, f, getattr(saved, f))


def emulate(code: bytes, cpu: Cpu) -> Optional[Emulated]:
    """Decode the instruction at ``cpu.regs.rip`` (its bytes are ``code``) and perform it.

    None: not an instruction emulated here, or one this emulator cannot
    finish; nothing was changed.  Otherwise see ``Emulated``.
    """
    bits = code_size(cpu.sregs)
    if bits is None:
        return None
    insn = decode(code, long_mode=bits == 64)
    if insn is None:
        return None
    return execute(insn, cpu)
