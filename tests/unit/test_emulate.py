"""The CPL0 instruction emulator for kvm_pvm (vmm/emulate.py).

Decoding is checked against a table from the SDM and against capstone (an
independent decoder) for lengths and mnemonics.  Execution is checked on a
fake Cpu whose memory is a dict of 4 KiB pages and whose FPU area is a
4096-byte KVM_GET_XSAVE image: register by register, byte by byte, and for
every fault that nothing at all changed.  Hypothesis checks the bit-count
instructions and CMPXCHG16B against plain Python for random values.
"""
from __future__ import annotations

import copy

import capstone
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm.emulate import (AVX_OFFSET, CR0_EM, CR0_MP, CR0_PE, CR0_TS, CR4_OSFXSR, CR4_OSXSAVE,
                         CR4_SMAP, FCW, FDP, FIP, FOP, FSW, FTW, MXCSR, MXCSR_MASK, PF_PRESENT,
                         PF_WRITE, ST0, XCOMP_BV, XMM0, XSTATE_BV, Emulated, Op, code_size,
                         decode, emulate)
from vmm.kvm import REG_NAMES, Regs, Segment, Sregs
from vmm.paging import PageFault

CF, PF_FLAG, AF, ZF, SF, OF, AC = 1, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 11, 1 << 18
ARITH = CF | PF_FLAG | AF | ZF | SF | OF
M64 = (1 << 64) - 1
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
RIP = 0xFFFF_FFFF_8100_0000
CR4_DEFAULT = CR4_PAE | CR4_OSFXSR | (1 << 10) | CR4_SMAP | CR4_OSXSAVE


def u(buf, offset, size):
    return int.from_bytes(buf[offset:offset + size], "little")


def put(buf, offset, size, value):
    buf[offset:offset + size] = value.to_bytes(size, "little")


def make_sregs(long_mode=True, cpl=0, cr0=CR0_PE | CR0_MP | CR0_PG, cr4=CR4_DEFAULT,
               fs_base=0, gs_base=0, ds_base=0, db=1):
    flat = Segment(base=0, limit=0xFFFFFFFF, present=1, s=1, g=1, type=3, db=1)
    cs = Segment(base=0, limit=0xFFFFFFFF, present=1, s=1, g=1, type=11, dpl=cpl,
                 l=1 if long_mode else 0, db=0 if long_mode else db)
    return Sregs(cs=cs, ds=Segment(**{**vars_of(flat), "base": ds_base}), es=copy.copy(flat), fs=Segment(**{**vars_of(flat), "base": fs_base}),
                 gs=Segment(**{**vars_of(flat), "base": gs_base}), ss=copy.copy(flat),
                 tr=Segment(), ldt=Segment(), gdt_base=0, gdt_limit=0, idt_base=0, idt_limit=0,
                 cr0=cr0, cr2=0, cr3=0x1000, cr4=cr4, cr8=0,
                 efer=(EFER_LME | EFER_LMA) if long_mode else 0, apic_base=0,
                 interrupt_bitmap=(0, 0, 0, 0))


def vars_of(seg: Segment) -> dict:
    return {f: getattr(seg, f) for f in Segment.__slots__}


def default_area() -> bytearray:
    area = bytearray(4096)
    put(area, FCW, 2, 0x037F)
    put(area, MXCSR, 4, 0x1F80)
    put(area, MXCSR_MASK, 4, 0xFFFF)
    put(area, XSTATE_BV, 8, 0b11)
    return area


class FakeCpu:
    """Dict-backed memory in 4 KiB pages; unmapped pages fault, read-only ones fault on write."""

    def __init__(self, regs=None, sregs=None, area=None, xcr0=0b111, xss=0):
        self.regs = regs or Regs(rip=RIP)
        self.sregs = sregs or make_sregs()
        self.pages: dict[int, bytearray] = {}
        self.readonly: set[int] = set()
        self.area = bytearray(area if area is not None else default_area())
        self.xcr0, self.xss = xcr0, xss
        self.writes: list[tuple[int, bytes]] = []
        self.fpu_fetches = self.fpu_sets = 0

    def map(self, vaddr: int, data: bytes = b"", size: int = 4096, writable: bool = True) -> None:
        for page in range(vaddr >> 12, (vaddr + max(size, len(data)) - 1 >> 12) + 1):
            self.pages.setdefault(page, bytearray(4096))
            if not writable:
                self.readonly.add(page)
        for i, b in enumerate(data):
            self.pages[(vaddr + i) >> 12][(vaddr + i) & 0xFFF] = b

    def peek(self, vaddr: int, n: int) -> bytes:
        return bytes(self.pages[(vaddr + i) >> 12][(vaddr + i) & 0xFFF] for i in range(n))

    def read(self, vaddr: int, n: int) -> bytes:
        for i in range(n):
            if (vaddr + i) >> 12 not in self.pages:
                raise PageFault((vaddr + i) & ~0xFFF if i else vaddr + i, 1, "PTE not present")
        return self.peek(vaddr, n)

    def write(self, vaddr: int, data: bytes) -> None:
        for i in range(len(data)):            # all or nothing, as the module asks
            page = (vaddr + i) >> 12
            if page not in self.pages:
                raise PageFault(vaddr + i, 1, "PTE not present")
            if page in self.readonly:
                fault = PageFault(vaddr + i, 1, "read-only")
                fault.error_code = PF_PRESENT | PF_WRITE
                raise fault
        for i, b in enumerate(data):
            self.pages[(vaddr + i) >> 12][(vaddr + i) & 0xFFF] = b
        self.writes.append((vaddr, bytes(data)))

    def fpu(self) -> bytearray:
        self.fpu_fetches += 1
        return bytearray(self.area)

    def set_fpu(self, area: bytes) -> None:
        assert len(area) == 4096
        self.fpu_sets += 1
        self.area = bytearray(area)

    def snapshot(self):
        return ({n: getattr(self.regs, n) for n in REG_NAMES},
                {p: bytes(b) for p, b in self.pages.items()}, bytes(self.area))


def run(hexcode: str, cpu: FakeCpu) -> Emulated | None:
    return emulate(bytes.fromhex(hexcode), cpu)


def assert_fault(hexcode: str, cpu: FakeCpu, mnemonic: str, exception, cr2=None):
    """A fault: the given exception, rip at the instruction, nothing changed."""
    before = cpu.snapshot()
    sets = cpu.fpu_sets
    result = run(hexcode, cpu)
    assert result == Emulated(mnemonic, exception=exception, cr2=cr2)
    assert cpu.snapshot() == before
    assert cpu.fpu_sets == sets


def assert_declined(hexcode: str, cpu: FakeCpu):
    before = cpu.snapshot()
    assert run(hexcode, cpu) is None
    assert cpu.snapshot() == before
    assert cpu.fpu_sets == 0 and cpu.writes == []


# ---------------------------------------------------------------------------
# Decoding

# (hex, long_mode, (op, length) or None)
DECODE_CASES = [
    ("f0480fc70d10000000", True, (Op.CMPXCHG16B, 9)),   # lock cmpxchg16b [rip+0x10]
    ("480fc70e", True, (Op.CMPXCHG16B, 4)),
    ("0fc70e", True, (Op.CMPXCHG8B, 3)),
    ("660fc70e", True, (Op.CMPXCHG8B, 4)),              # 66 ignored
    ("f2f00fc70e", True, (Op.CMPXCHG8B, 5)),            # xacquire lock
    ("480fc7c8", True, (Op.CMPXCHG16B, 4)),             # register form: decodes, #UD when run
    ("0fc7f0", True, None),                             # rdrand: vmm/x86special.py
    ("0fc7f8", True, None),                             # rdseed
    ("660fc736", True, None),                           # vmclear
    ("cc", True, (Op.INT3, 1)),
    ("66cc", True, (Op.INT3, 2)),
    ("cd80", True, (Op.INT, 2)),
    ("cd", True, None),                                 # truncated
    ("0f01ca", True, (Op.CLAC, 3)),
    ("0f01cb", True, (Op.STAC, 3)),
    ("f30f01ca", True, None),                           # ERETU
    ("f20f01ca", True, None),                           # ERETS
    ("660f01ca", True, None),
    ("0f01d0", True, (Op.XGETBV, 3)),
    ("0f01d1", True, None),                             # xsetbv: not ours
    ("0f01f9", True, None),                             # rdtscp: vmm/x86special.py
    ("f30fb8c1", True, (Op.POPCNT, 4)),
    ("66f30fb8c1", True, (Op.POPCNT, 5)),
    ("f3480fbdc1", True, (Op.LZCNT, 5)),
    ("f30fbc01", True, (Op.TZCNT, 4)),
    ("0fbcc1", True, None),                             # bsf
    ("0fbdc1", True, None),                             # bsr
    ("0fb8c1", True, None),                             # jmpe / #UD
    ("f2f30fb8c1", True, (Op.POPCNT, 5)),               # of F2/F3 the last counts
    ("f3f20fb8c1", True, None),
    ("9b", True, (Op.FWAIT, 1)),
    ("9bdbe3", True, (Op.FWAIT, 1)),                    # finit = fwait; fninit
    ("dbe3", True, (Op.FNINIT, 2)),
    ("dbe2", True, (Op.FNCLEX, 2)),
    ("d92e", True, (Op.FLDCW, 2)),
    ("66d92e", True, (Op.FLDCW, 3)),
    ("48d92e", True, (Op.FLDCW, 3)),
    ("d93e", True, (Op.FNSTCW, 2)),
    ("dd3e", True, (Op.FNSTSW, 2)),
    ("dfe0", True, (Op.FNSTSW_AX, 2)),
    ("d9c0", True, None),                               # fld st0
    ("d906", True, None),                               # fld m32
    ("dd06", True, None),                               # fld m64
    ("0fae16", True, (Op.LDMXCSR, 3)),
    ("0fae1e", True, (Op.STMXCSR, 3)),
    ("0fae06", True, (Op.FXSAVE, 3)),
    ("480fae06", True, (Op.FXSAVE, 4)),
    ("0fae0e", True, (Op.FXRSTOR, 3)),
    ("480fae0e", True, (Op.FXRSTOR, 4)),
    ("0fae26", True, (Op.XSAVE, 3)),
    ("480fae26", True, (Op.XSAVE, 4)),
    ("0fae2e", True, (Op.XRSTOR, 3)),
    ("0fae36", True, (Op.XSAVEOPT, 3)),
    ("0fc726", True, (Op.XSAVEC, 3)),
    ("0fc72e", True, (Op.XSAVES, 3)),
    ("0fc71e", True, (Op.XRSTORS, 3)),
    ("0faef0", True, None),                             # mfence
    ("0faee8", True, None),                             # lfence
    ("0fae3e", True, None),                             # clflush
    ("f30fae06", True, None),                           # F3 0F AE group: other instructions
    ("660fae3e", True, None),                           # clflushopt
    ("f30faec0", True, None),                           # rdfsbase
    ("c5f8ae16", True, None),                           # vldmxcsr: VEX not decoded
    ("90", True, None),
    ("", True, None),
    ("66", True, None),
    ("0f", True, None),
    ("0fc7", True, None),
    ("0fc74c", True, None),                             # SIB missing
    ("0fc74c24", True, None),                           # disp8 missing
    ("0fc70d112233", True, None),                       # disp32 cut short
    ("66" * 12 + "f30fb8c1", True, None),               # 16 bytes: #GP on the CPU
    ("66" * 11 + "f30fb8c1", True, (Op.POPCNT, 15)),
    # 32-bit code: 40-4F are inc/dec, 67 means 16-bit addressing.
    ("0fc70e", False, (Op.CMPXCHG8B, 3)),
    ("480fc70e", False, None),
    ("670fc70e", False, None),
    ("67cc", False, (Op.INT3, 2)),
    ("f30fb8c1", False, (Op.POPCNT, 4)),
    ("0fc70d44332211", False, (Op.CMPXCHG8B, 7)),       # disp32, absolute in 32-bit code
]


@pytest.mark.parametrize("hexcode,long_mode,expected", DECODE_CASES)
def test_decode_table(hexcode, long_mode, expected):
    insn = decode(bytes.fromhex(hexcode), long_mode)
    got = None if insn is None else (insn.op, insn.length)
    assert got == expected


CAPSTONE_NAMES = {"wait": "fwait"}


@pytest.mark.parametrize("hexcode", [c[0] for c in DECODE_CASES if c[2] is not None and c[1]
                                     and not c[0].startswith(("480fc7c8", "f2f30f"))])
def test_decode_agrees_with_capstone(hexcode):
    """Length and mnemonic (lock/xacquire and REX.W suffixes included) match an independent decoder."""
    code = bytes.fromhex(hexcode)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    ref = next(md.disasm(code, RIP, 1))
    insn = decode(code)
    assert insn.length == ref.size
    name = ref.mnemonic.split()[-1]
    assert insn.mnemonic == CAPSTONE_NAMES.get(name, name)


def test_decode_memory_operands():
    m = decode(bytes.fromhex("f04a0fc74cb610")).mem     # [rsi + r14*4 + 0x10]
    assert (m.base, m.index, m.scale, m.disp, m.rip_relative, m.segment) == (6, 14, 4, 0x10, False, "ds")
    m = decode(bytes.fromhex("480fc70c24")).mem         # [rsp]: SS, no index
    assert (m.base, m.index, m.segment) == (4, None, "ss")
    m = decode(bytes.fromhex("490fc70c24")).mem         # [r12]: DS
    assert (m.base, m.index, m.segment) == (12, None, "ds")
    m = decode(bytes.fromhex("4b0fc70c24")).mem         # [r12 + r12]: REX.X makes index 100 real
    assert (m.base, m.index, m.scale) == (12, 12, 1)
    m = decode(bytes.fromhex("490fc70c2578563412")).mem  # SIB base 101, mod 00: disp32, no base even with REX.B
    assert (m.base, m.index, m.disp) == (None, None, 0x12345678)
    m = decode(bytes.fromhex("490fc70df0ffffff")).mem   # rip-relative ignores REX.B
    assert (m.base, m.rip_relative, m.disp) == (None, True, -16)
    m = decode(bytes.fromhex("480fc74d80")).mem         # [rbp - 0x80]: SS
    assert (m.base, m.disp, m.segment) == (5, -0x80, "ss")
    m = decode(bytes.fromhex("4d0fc74d80")).mem         # [r13 - 0x80]: DS
    assert (m.base, m.segment) == (13, "ds")
    m = decode(bytes.fromhex("65360fc70c24")).mem       # the last segment override counts
    assert m.segment == "ss"
    m = decode(bytes.fromhex("360fc70c24")).mem
    assert m.segment == "ss"
    assert decode(bytes.fromhex("670fc70e")).mem.addr_size == 32
    assert decode(bytes.fromhex("0fc70d44332211"), long_mode=False).mem.rip_relative is False


def test_prefix_placement():
    # 66 before REX: REX.W still counts.
    assert decode(bytes.fromhex("66480fc70e")).op is Op.CMPXCHG16B
    # A legacy prefix after REX cancels it.
    assert decode(bytes.fromhex("48660fc70e")).op is Op.CMPXCHG8B
    assert decode(bytes.fromhex("48f00fc70e")).op is Op.CMPXCHG8B
    # Of two REX the last counts.
    assert decode(bytes.fromhex("48400fc70e")).op is Op.CMPXCHG8B
    assert decode(bytes.fromhex("40480fc70e")).op is Op.CMPXCHG16B
    # Operand sizes: 66 -> 16, REX.W -> 64 and wins, REX cancelled by 66 after it.
    assert decode(bytes.fromhex("66f30fb8c1")).opsize == 16
    assert decode(bytes.fromhex("66f3480fb8c1")).opsize == 64
    assert decode(bytes.fromhex("f348660fb8c1")).opsize == 16
    assert decode(bytes.fromhex("4866f30fb8c1")).opsize == 16
    # REX.R / REX.B pick r8-r15.
    insn = decode(bytes.fromhex("f34d0fb8c8"))
    assert (insn.reg, insn.rm, insn.opsize) == (9, 8, 64)
    # 67 on an instruction without memory operands changes nothing.
    assert decode(bytes.fromhex("67f30fb8c1")).length == 5


def test_cancelled_rex_executes_as_cmpxchg8b():
    """48 66 0F C7 0E: the 66 after REX.W cancels it, so this compares 8 bytes, not 16."""
    mem = (0x2222_2222_1111_1111).to_bytes(8, "little") + bytes([0xAB]) * 8
    cpu = FakeCpu(regs=Regs(rax=0x1111_1111, rdx=0x2222_2222, rbx=0x3333_3333, rcx=0x4444_4444,
                            rsi=0x2008, rip=RIP))
    cpu.map(0x2008, mem)                   # 8-byte operand at a non-16-aligned address: no #GP
    assert run("48660fc70e", cpu) == Emulated("cmpxchg8b")
    assert cpu.peek(0x2008, 16) == (0x4444_4444_3333_3333).to_bytes(8, "little") + bytes([0xAB]) * 8
    assert cpu.regs.rflags & ZF and cpu.regs.rip == RIP + 5
    # 66 before REX.W: REX.W counts, 16 bytes, so the same address is misaligned.
    cpu.regs.rip = RIP
    assert_fault("66480fc70e", cpu, "cmpxchg16b", (13, 0))


def test_code_size():
    assert code_size(make_sregs()) == 64
    assert code_size(make_sregs(long_mode=False)) == 32
    assert code_size(make_sregs(long_mode=False, db=0)) is None
    assert code_size(make_sregs(long_mode=False, cr0=0)) is None
    cpu = FakeCpu(sregs=make_sregs(long_mode=False, db=0))
    assert_declined("cc", cpu)


def test_unknown_bytes_change_nothing():
    for hexcode in ("90", "0f0b", "0fa2", "0f31", "f4", "c3", "0fae3e", "", "0fc7"):
        cpu = FakeCpu(regs=Regs(rax=1, rcx=2, rip=RIP, rflags=0x246))
        cpu.map(0x1000)
        assert_declined(hexcode, cpu)
        assert cpu.fpu_fetches == 0


# ---------------------------------------------------------------------------
# CMPXCHG16B / CMPXCHG8B

OLD_LO, OLD_HI = 0x1111_2222_3333_4444, 0x5555_6666_7777_8888
NEW_LO, NEW_HI = 0x9999_AAAA_BBBB_CCCC, 0xDDDD_EEEE_FFFF_0001
MEM16 = OLD_LO.to_bytes(8, "little") + OLD_HI.to_bytes(8, "little")


def cx16_cpu(addr=0x2000, data=MEM16, rax=OLD_LO, rdx=OLD_HI, **regs):
    cpu = FakeCpu(regs=Regs(rax=rax, rdx=rdx, rbx=NEW_LO, rcx=NEW_HI, rip=RIP, rflags=0x2 | CF, **regs))
    cpu.map(addr, data)
    return cpu


def test_cmpxchg16b_success():
    cpu = cx16_cpu(rsi=0x2000)
    assert run("f0480fc70e", cpu) == Emulated("cmpxchg16b")
    assert cpu.peek(0x2000, 16) == NEW_LO.to_bytes(8, "little") + NEW_HI.to_bytes(8, "little")
    assert cpu.regs.rflags == 0x2 | CF | ZF            # only ZF changes
    assert (cpu.regs.rax, cpu.regs.rdx) == (OLD_LO, OLD_HI)
    assert cpu.regs.rip == RIP + 5
    assert cpu.fpu_fetches == 0


def test_cmpxchg16b_failure_loads_rdx_rax_and_leaves_memory():
    cpu = cx16_cpu(rsi=0x2000, rax=OLD_LO, rdx=OLD_HI + 1)
    cpu.regs.rflags |= ZF
    assert run("f0480fc70e", cpu) == Emulated("cmpxchg16b")
    assert cpu.peek(0x2000, 16) == MEM16
    assert cpu.writes == [(0x2000, MEM16)]               # the SDM's unconditional write cycle
    assert (cpu.regs.rax, cpu.regs.rdx) == (OLD_LO, OLD_HI)
    assert (cpu.regs.rbx, cpu.regs.rcx) == (NEW_LO, NEW_HI)
    assert cpu.regs.rflags == 0x2 | CF
    assert cpu.regs.rip == RIP + 5


def test_cmpxchg16b_misaligned_is_gp():
    cpu = cx16_cpu(addr=0x2008, rsi=0x2008)
    assert_fault("f0480fc70e", cpu, "cmpxchg16b", (13, 0))


def test_cmpxchg16b_register_form_is_ud():
    assert_fault("480fc7c8", cx16_cpu(), "cmpxchg16b", (6, None))
    assert_fault("f0480fc7c8", cx16_cpu(), "cmpxchg16b", (6, None))


def test_cmpxchg16b_rip_relative():
    # lock cmpxchg16b [rip + 0xFF7]: relative to the next instruction, rip + 9.
    target = RIP + 9 + 0x0FF7                  # = RIP + 0x1000, 16-byte aligned
    cpu = cx16_cpu(addr=target)
    assert run("f0480fc70df70f0000", cpu) == Emulated("cmpxchg16b")
    assert cpu.peek(target, 16) == NEW_LO.to_bytes(8, "little") + NEW_HI.to_bytes(8, "little")
    assert cpu.regs.rip == RIP + 9


def test_cmpxchg16b_rip_relative_negative_and_addr32():
    cpu = cx16_cpu(addr=0x3000)
    cpu.regs.rip = 0x3100 - 10
    # 67 f0 48 0f c7 0d disp32: EIP-relative, next = 0x3100; disp -0x100 -> 0x3000.
    assert run("67f0480fc70d00ffffff", cpu) == Emulated("cmpxchg16b")
    assert cpu.regs.rflags & ZF
    assert cpu.regs.rip == 0x3100


def test_cmpxchg16b_sib_disp():
    # lock cmpxchg16b [rsi + r14*4 + 0x10]
    cpu = cx16_cpu(addr=0x4000, rsi=0x3F00, r14=0x3C)    # 0x3F00 + 0xF0 + 0x10 = 0x4000
    assert run("f04a0fc74cb610", cpu) == Emulated("cmpxchg16b")
    assert cpu.regs.rflags & ZF
    assert cpu.peek(0x4000, 8) == NEW_LO.to_bytes(8, "little")
    assert cpu.regs.rip == RIP + 7


def test_cmpxchg16b_fs_and_gs_override():
    for prefix, seg in (("64", "fs"), ("65", "gs")):
        cpu = cx16_cpu(addr=0x7FFF_0000_5000, rdi=0x5000)
        setattr(cpu.sregs, seg, Segment(base=0x7FFF_0000_0000))
        assert run(prefix + "f0480fc70f", cpu) == Emulated("cmpxchg16b")
        assert cpu.regs.rflags & ZF
        assert cpu.peek(0x7FFF_0000_5000, 8) == NEW_LO.to_bytes(8, "little")
    # ES/DS/CS/SS bases are ignored in 64-bit mode.
    cpu = cx16_cpu(addr=0x5000, rdi=0x5000)
    cpu.sregs.es.base = cpu.sregs.ds.base = 0x10000
    assert run("26f0480fc70f", cpu) == Emulated("cmpxchg16b")
    assert cpu.regs.rflags & ZF


def test_cmpxchg16b_addr32_truncates_registers():
    cpu = cx16_cpu(addr=0x6000, rsi=0xFFFF_FFFF_0000_6000)
    assert run("67480fc70e", cpu) == Emulated("cmpxchg16b")
    assert cpu.regs.rflags & ZF


def test_cmpxchg16b_page_fault_leaves_everything():
    cpu = cx16_cpu(rsi=0x9000)                  # 0x9000 not mapped
    # A read for a write: W set; not present; supervisor.
    assert_fault("f0480fc70e", cpu, "cmpxchg16b", (14, PF_WRITE), cr2=0x9000)
    cpu = cx16_cpu(rsi=0x9000)
    cpu.sregs.cs.dpl = 3
    assert_fault("f0480fc70e", cpu, "cmpxchg16b", (14, PF_WRITE | 4), cr2=0x9000)


def test_cmpxchg16b_read_only_page_faults_even_on_failure():
    cpu = FakeCpu(regs=Regs(rax=0, rdx=0, rsi=0x2000, rip=RIP))
    cpu.map(0x2000, MEM16, writable=False)
    # The Cpu's own error code (present | write) is used.
    assert_fault("f0480fc70e", cpu, "cmpxchg16b", (14, PF_PRESENT | PF_WRITE), cr2=0x2000)


def test_cmpxchg16b_non_canonical():
    cpu = cx16_cpu(rsi=0x0000_8000_0000_0000)
    assert_fault("f0480fc70e", cpu, "cmpxchg16b", (13, 0))
    cpu = cx16_cpu(rsp=0x0000_8000_0000_0000)
    assert_fault("f0480fc70c24", cpu, "cmpxchg16b", (12, 0))   # [rsp]: #SS


def test_cmpxchg8b():
    mem = (0xAABBCCDD_11223344).to_bytes(8, "little")
    cpu = FakeCpu(regs=Regs(rax=0xFFFF_FFFF_1122_3344, rdx=0xFFFF_FFFF_AABB_CCDD, rbx=0x5566_7788,
                            rcx=0x99AA_BBCC, rsi=0x2000, rip=RIP))
    cpu.map(0x2000, mem)
    assert run("f00fc70e", cpu) == Emulated("cmpxchg8b")
    assert cpu.peek(0x2000, 8) == (0x99AABBCC_55667788).to_bytes(8, "little")
    assert cpu.regs.rflags & ZF
    assert cpu.regs.rax == 0xFFFF_FFFF_1122_3344        # not written on success
    # Failure: EDX:EAX loaded, zero-extended.
    cpu.regs.rip = RIP
    assert run("f00fc70e", cpu) == Emulated("cmpxchg8b")
    assert (cpu.regs.rax, cpu.regs.rdx) == (0x5566_7788, 0x99AA_BBCC)
    assert not cpu.regs.rflags & ZF
    # No alignment requirement for m64.
    cpu = FakeCpu(regs=Regs(rsi=0x2003, rip=RIP))
    cpu.map(0x2000, bytes(16))
    assert run("0fc70e", cpu) == Emulated("cmpxchg8b")
    assert cpu.regs.rflags & ZF


def test_cmpxchg8b_32bit_mode_uses_segment_base():
    cpu = FakeCpu(regs=Regs(rsi=0x1000, rip=0x10_0000), sregs=make_sregs(long_mode=False, ds_base=0x4000))
    cpu.map(0x5000, bytes(8))
    cpu.regs.rbx, cpu.regs.rcx = 1, 2
    assert run("0fc70e", cpu) == Emulated("cmpxchg8b")
    assert cpu.peek(0x5000, 8) == (2 << 32 | 1).to_bytes(8, "little")
    assert cpu.regs.rip == 0x10_0003


def test_lock_on_other_instructions_is_ud():
    cpu = FakeCpu()
    cpu.map(0x1000)
    for hexcode, name in (("f0cc", "int3"), ("f0f30fb8c1", "popcnt"), ("f09b", "fwait"),
                          ("f00f01ca", "clac"), ("f00fae16", "ldmxcsr"), ("f0dbe3", "fninit")):
        assert_fault(hexcode, cpu, name, (6, None))


# ---------------------------------------------------------------------------
# POPCNT / LZCNT / TZCNT

@pytest.mark.parametrize("prefix,bits", [("66f3", 16), ("f3", 32), ("f348", 64)])
def test_bit_counts_register(prefix, bits):
    junk = 0xDEAD_BEEF_CAFE_F00D
    for src, pop, lz, tz in ((0, 0, bits, bits), (1, 1, bits - 1, 0),
                             (1 << (bits - 1), 1, 0, bits - 1), (0x0F0, 4, bits - 8, 4)):
        for opcode, expected in (("b8", pop), ("bd", lz), ("bc", tz)):
            # dst = rax (junk in it), src = rcx with junk above the operand size.
            cpu = FakeCpu(regs=Regs(rax=junk, rcx=src | (junk << bits & M64), rip=RIP,
                                    rflags=0x2 | ARITH))
            result = run(prefix + "0f" + opcode + "c1", cpu)
            assert result.mnemonic == {"b8": "popcnt", "bd": "lzcnt", "bc": "tzcnt"}[opcode]
            if bits == 16:
                assert cpu.regs.rax == (junk & ~0xFFFF) | expected
            else:
                assert cpu.regs.rax == expected            # 32-bit writes zero-extend
            flags = cpu.regs.rflags
            if opcode == "b8":
                assert flags == 0x2 | (ZF if src == 0 else 0)
            else:
                assert flags & CF == (CF if src == 0 else 0)
                assert flags & ZF == (ZF if expected == 0 else 0)
                assert flags & (OF | SF | AF | PF_FLAG) == OF | SF | AF | PF_FLAG   # left alone
            assert cpu.regs.rip == RIP + len(prefix) // 2 + 3


def test_bit_counts_memory_and_high_registers():
    cpu = FakeCpu(regs=Regs(rsi=0x2000, r9=0x1234, rip=RIP))
    cpu.map(0x2000, (0x8000_0000_0000_00F0).to_bytes(8, "little"))
    assert run("f34c0fb80e", cpu) == Emulated("popcnt")     # popcnt r9, [rsi]
    assert cpu.regs.r9 == 5
    assert run("f34c0fbd0e", cpu) == Emulated("lzcnt")
    assert cpu.regs.r9 == 0 and cpu.regs.rflags & ZF and not cpu.regs.rflags & CF
    assert run("f34c0fbc0e", cpu) == Emulated("tzcnt")
    assert cpu.regs.r9 == 4
    cpu.regs.rcx = M64
    assert run("f30fb80e", cpu) == Emulated("popcnt")       # popcnt ecx, [rsi]: low dword only
    assert cpu.regs.rcx == 4
    cpu.regs.rcx = M64
    assert run("66f30fb80e", cpu) == Emulated("popcnt")     # popcnt cx, [rsi]: merges
    assert cpu.regs.rcx == M64 & ~0xFFFF | 4
    assert cpu.regs.rip == RIP + 5 + 5 + 5 + 4 + 5


def test_bit_count_page_fault_crossing_pages():
    cpu = FakeCpu(regs=Regs(rsi=0x2FFC, rax=7, rip=RIP, rflags=0x2))
    cpu.map(0x2000)
    # An 8-byte read at 0x2FFC: the fault is at 0x3000, a read, not present.
    assert_fault("f3480fb806", cpu, "popcnt", (14, 0), cr2=0x3000)


# ---------------------------------------------------------------------------
# CLAC / STAC, INT3 / INT n

def test_clac_stac():
    cpu = FakeCpu(regs=Regs(rip=RIP, rflags=0x2 | AC | CF))
    assert run("0f01ca", cpu) == Emulated("clac")
    assert cpu.regs.rflags == 0x2 | CF and cpu.regs.rip == RIP + 3
    assert run("0f01cb", cpu) == Emulated("stac")
    assert cpu.regs.rflags == 0x2 | CF | AC and cpu.regs.rip == RIP + 6


def test_clac_stac_ud_without_smap_or_at_cpl3():
    cpu = FakeCpu(sregs=make_sregs(cr4=CR4_DEFAULT & ~CR4_SMAP))
    assert_fault("0f01ca", cpu, "clac", (6, None))
    assert_fault("0f01cb", cpu, "stac", (6, None))
    cpu = FakeCpu(sregs=make_sregs(cpl=3))
    assert_fault("0f01cb", cpu, "stac", (6, None))


def test_int3_and_int_n():
    cpu = FakeCpu(regs=Regs(rip=RIP, rax=5))
    assert run("cc", cpu) == Emulated("int3", exception=(3, None), soft=True)
    assert cpu.regs.rip == RIP + 1 and cpu.regs.rax == 5
    assert run("cd80", cpu) == Emulated("int", exception=(0x80, None), soft=True)
    assert cpu.regs.rip == RIP + 3
    assert run("cd0e", cpu) == Emulated("int", exception=(14, None), soft=True)   # no error code
    cpu = FakeCpu(regs=Regs(rip=0xFFFF_FFFF), sregs=make_sregs(long_mode=False))
    assert run("cc", cpu).exception == (3, None)
    assert cpu.regs.rip == 0                              # eip wraps in 32-bit code
    assert cpu.fpu_fetches == 0


# ---------------------------------------------------------------------------
# x87 control

def fpu_cpu(**kw) -> FakeCpu:
    cpu = FakeCpu(**kw)
    cpu.map(0x2000)
    cpu.regs.rsi = 0x2000
    return cpu


def test_fwait():
    cpu = fpu_cpu()
    assert run("9b", cpu) == Emulated("fwait")
    assert cpu.regs.rip == RIP + 1 and cpu.fpu_sets == 0
    assert run("9bdbe3", cpu) == Emulated("fwait")        # only the 9B
    assert cpu.regs.rip == RIP + 2


def test_fwait_with_pending_exception_declines():
    cpu = fpu_cpu()
    put(cpu.area, FSW, 2, 0x0081)                         # IE, ES
    assert_declined("9b", cpu)
    cpu = fpu_cpu()
    put(cpu.area, FCW, 2, 0x037E)                         # IE unmasked
    put(cpu.area, FSW, 2, 0x0001)
    assert_declined("9b", cpu)
    cpu = fpu_cpu()
    put(cpu.area, FSW, 2, 0x0001)                         # masked: no #MF
    assert run("9b", cpu) == Emulated("fwait")


def test_fwait_nm_needs_mp_and_ts():
    assert_fault("9b", fpu_cpu(sregs=make_sregs(cr0=CR0_PE | CR0_MP | CR0_TS)), "fwait", (7, None))
    assert run("9b", fpu_cpu(sregs=make_sregs(cr0=CR0_PE | CR0_TS))) == Emulated("fwait")


def busy_x87(cpu: FakeCpu) -> None:
    area = cpu.area
    put(area, FCW, 2, 0x0272)
    put(area, FSW, 2, 0xB8A5)
    area[FTW] = 0xC3
    put(area, FOP, 2, 0x5D9)
    put(area, FIP, 8, 0xFFFF_FFFF_8123_4567)
    put(area, FDP, 8, 0xFFFF_8880_0000_1000)
    for i in range(8):
        area[ST0 + 16 * i:ST0 + 16 * i + 10] = bytes([0x10 + i] * 10)
    put(area, MXCSR, 4, 0x9FC0)
    for i in range(16):
        area[XMM0 + 16 * i:XMM0 + 16 * i + 16] = bytes([0x80 + i] * 16)
    put(area, XSTATE_BV, 8, 0b11)


def test_fninit():
    cpu = fpu_cpu()
    busy_x87(cpu)
    before = bytes(cpu.area)
    assert run("dbe3", cpu) == Emulated("fninit")
    a = cpu.area
    assert (u(a, FCW, 2), u(a, FSW, 2), a[FTW], u(a, FOP, 2), u(a, FIP, 8), u(a, FDP, 8)) == \
        (0x037F, 0, 0, 0, 0, 0)
    assert a[ST0:ST0 + 128] == before[ST0:ST0 + 128]      # registers kept
    assert u(a, MXCSR, 4) == 0x9FC0                       # MXCSR untouched
    assert u(a, XSTATE_BV, 8) & 1
    assert cpu.fpu_sets == 1 and cpu.regs.rip == RIP + 2


def test_fninit_sets_xstate_bv_bit0():
    cpu = fpu_cpu()
    put(cpu.area, XSTATE_BV, 8, 0)
    assert run("dbe3", cpu) == Emulated("fninit")
    assert u(cpu.area, XSTATE_BV, 8) == 0b01


def test_x87_control_nm():
    for cr0 in (CR0_PE | CR0_EM, CR0_PE | CR0_TS):
        for hexcode, name in (("dbe3", "fninit"), ("dbe2", "fnclex"), ("d92e", "fldcw"),
                              ("d93e", "fnstcw"), ("dd3e", "fnstsw"), ("dfe0", "fnstsw")):
            assert_fault(hexcode, fpu_cpu(sregs=make_sregs(cr0=cr0)), name, (7, None))


def test_fnstcw_fldcw():
    cpu = fpu_cpu()
    busy_x87(cpu)
    assert run("d93e", cpu) == Emulated("fnstcw")          # fnstcw [rsi]
    assert cpu.peek(0x2000, 2) == (0x0272).to_bytes(2, "little")
    assert cpu.fpu_sets == 0
    cpu.map(0x2010, (0xFFFF).to_bytes(2, "little"))
    cpu.regs.rsi = 0x2010
    assert run("d92e", cpu) == Emulated("fldcw")
    # Bits 13-15 read 0, bit 6 reads 1; everything masked, so ES and B clear.
    assert u(cpu.area, FCW, 2) == 0x1F7F
    assert u(cpu.area, FSW, 2) == 0xB8A5 & ~0x8080
    assert cpu.fpu_sets == 1


def test_fldcw_unmasking_a_pending_exception_sets_es():
    cpu = fpu_cpu()
    put(cpu.area, FSW, 2, 0x0004)                         # ZE flagged, masked
    cpu.map(0x2000, (0x037B).to_bytes(2, "little"))       # unmask ZE
    assert run("d92e", cpu) == Emulated("fldcw")
    assert u(cpu.area, FSW, 2) == 0x8084
    assert u(cpu.area, FCW, 2) == 0x037B


def test_fnstsw_and_fnclex():
    cpu = fpu_cpu(regs=Regs(rax=0x1234_5678_9ABC_DEF0, rip=RIP))
    cpu.regs.rsi = 0x2000
    busy_x87(cpu)
    assert run("dfe0", cpu) == Emulated("fnstsw")
    assert cpu.regs.rax == 0x1234_5678_9ABC_B8A5
    assert run("dd3e", cpu) == Emulated("fnstsw")
    assert cpu.peek(0x2000, 2) == (0xB8A5).to_bytes(2, "little")
    assert run("dbe2", cpu) == Emulated("fnclex")
    assert u(cpu.area, FSW, 2) == 0x3800                  # TOP and C3 kept
    assert cpu.regs.rip == RIP + 2 + 2 + 2


def test_fnstcw_page_fault():
    cpu = fpu_cpu()
    cpu.regs.rsi = 0x5000
    assert_fault("d93e", cpu, "fnstcw", (14, PF_WRITE), cr2=0x5000)


# ---------------------------------------------------------------------------
# LDMXCSR / STMXCSR

def test_ldmxcsr_stmxcsr():
    cpu = fpu_cpu()
    put(cpu.area, XSTATE_BV, 8, 0b01)
    cpu.map(0x2000, (0x9FC0).to_bytes(4, "little"))
    assert run("0fae16", cpu) == Emulated("ldmxcsr")
    assert u(cpu.area, MXCSR, 4) == 0x9FC0
    assert u(cpu.area, XSTATE_BV, 8) == 0b11              # SSE marked in use
    cpu.regs.rsi = 0x2100
    assert run("0fae1e", cpu) == Emulated("stmxcsr")
    assert cpu.peek(0x2100, 4) == (0x9FC0).to_bytes(4, "little")
    assert cpu.regs.rip == RIP + 6


def test_ldmxcsr_reserved_bits_gp():
    cpu = fpu_cpu()
    cpu.map(0x2000, (0x1_1F80).to_bytes(4, "little"))
    assert_fault("0fae16", cpu, "ldmxcsr", (13, 0))
    # Without DAZ (MXCSR_MASK 0 -> default 0xFFBF), bit 6 is reserved.
    cpu = fpu_cpu()
    put(cpu.area, MXCSR_MASK, 4, 0)
    cpu.map(0x2000, (0x1FC0).to_bytes(4, "little"))
    assert_fault("0fae16", cpu, "ldmxcsr", (13, 0))
    cpu = fpu_cpu()                                       # mask 0xFFFF: DAZ allowed
    cpu.map(0x2000, (0x1FC0).to_bytes(4, "little"))
    assert run("0fae16", cpu) == Emulated("ldmxcsr")


def test_mxcsr_ud_and_nm():
    assert_fault("0fae16", fpu_cpu(sregs=make_sregs(cr4=CR4_DEFAULT & ~CR4_OSFXSR)), "ldmxcsr", (6, None))
    assert_fault("0fae1e", fpu_cpu(sregs=make_sregs(cr0=CR0_PE | CR0_EM)), "stmxcsr", (6, None))
    assert_fault("0fae1e", fpu_cpu(sregs=make_sregs(cr0=CR0_PE | CR0_EM | CR0_TS)), "stmxcsr", (6, None))
    assert_fault("0fae16", fpu_cpu(sregs=make_sregs(cr0=CR0_PE | CR0_TS)), "ldmxcsr", (7, None))


# ---------------------------------------------------------------------------
# FXSAVE / FXRSTOR

def test_fxsave64():
    cpu = fpu_cpu()
    busy_x87(cpu)
    cpu.map(0x2000, bytes([0xEE]) * 512)
    assert run("480fae06", cpu) == Emulated("fxsave64")
    img = cpu.peek(0x2000, 512)
    assert u(img, FCW, 2) == 0x0272 and u(img, FSW, 2) == 0xB8A5 and img[FTW] == 0xC3 and img[5] == 0
    assert u(img, FOP, 2) == 0x5D9
    assert u(img, FIP, 8) == 0xFFFF_FFFF_8123_4567 and u(img, FDP, 8) == 0xFFFF_8880_0000_1000
    assert u(img, MXCSR, 4) == 0x9FC0 and u(img, MXCSR_MASK, 4) == 0xFFFF
    assert img[ST0:XMM0] == bytes(cpu.area[ST0:XMM0])
    assert img[XMM0:XMM0 + 256] == bytes(cpu.area[XMM0:XMM0 + 256])
    assert img[464:] == bytes([0xEE]) * 48              # software bytes untouched
    assert cpu.fpu_sets == 0 and cpu.regs.rip == RIP + 4


def test_fxsave_32bit_format():
    cpu = fpu_cpu()
    busy_x87(cpu)
    assert run("0fae06", cpu) == Emulated("fxsave")
    img = cpu.peek(0x2000, 24)
    assert u(img, FIP, 4) == 0x8123_4567 and u(img, 12, 4) == 0      # FCS = 0
    assert u(img, FDP, 4) == 0x0000_1000 and u(img, 20, 4) == 0      # FDS = 0


def test_fxsave_of_init_x87_state_reads_initial_values():
    cpu = fpu_cpu()
    busy_x87(cpu)
    put(cpu.area, XSTATE_BV, 8, 0)          # the bytes under clear bits mean nothing
    assert run("480fae06", cpu) == Emulated("fxsave64")
    img = cpu.peek(0x2000, 512)
    assert u(img, FCW, 2) == 0x037F and u(img, FSW, 2) == 0 and img[ST0:ST0 + 128] == bytes(128)
    assert img[XMM0:XMM0 + 256] == bytes(256)


def test_fxrstor64_and_round_trip():
    src = fpu_cpu()
    busy_x87(src)
    assert run("480fae06", src) == Emulated("fxsave64")
    image = src.peek(0x2000, 512)
    cpu = fpu_cpu()
    put(cpu.area, XSTATE_BV, 8, 0)
    cpu.map(0x2000, image)
    assert run("480fae0e", cpu) == Emulated("fxrstor64")
    assert cpu.area[:416] == src.area[:416]
    assert u(cpu.area, XSTATE_BV, 8) == 0b11
    assert cpu.regs.rip == RIP + 4


def test_fxrstor_32bit_format_zero_extends_pointers():
    cpu = fpu_cpu()
    img = bytearray(512)
    put(img, FCW, 2, 0x037F)
    put(img, FOP, 2, 0xFFFF)
    put(img, FIP, 8, 0xAAAA_BBBB_1234_5678)
    put(img, FDP, 8, 0xCCCC_DDDD_8765_4321)
    put(img, MXCSR, 4, 0x1F80)
    cpu.map(0x2000, bytes(img))
    assert run("0fae0e", cpu) == Emulated("fxrstor")
    assert u(cpu.area, FIP, 8) == 0x1234_5678 and u(cpu.area, FDP, 8) == 0x8765_4321
    assert u(cpu.area, FOP, 2) == 0x7FF


def test_fxsave_fxrstor_faults():
    cpu = fpu_cpu()
    cpu.regs.rsi = 0x2008
    assert_fault("480fae06", cpu, "fxsave64", (13, 0))
    assert_fault("0fae0e", cpu, "fxrstor", (13, 0))
    assert_fault("0fae06", fpu_cpu(sregs=make_sregs(cr0=CR0_PE | CR0_TS)), "fxsave", (7, None))
    assert_fault("0fae06", fpu_cpu(sregs=make_sregs(cr0=CR0_PE | CR0_EM)), "fxsave", (7, None))
    cpu = fpu_cpu()
    img = bytearray(512)
    put(img, MXCSR, 4, 0xFFFF_1F80)
    cpu.map(0x2000, bytes(img))
    assert_fault("480fae0e", cpu, "fxrstor64", (13, 0))
    cpu = fpu_cpu()
    cpu.regs.rsi = 0x2F00                                # 512 bytes reach the unmapped 0x3000
    assert_fault("480fae06", cpu, "fxsave64", (14, PF_WRITE), cr2=0x3000)


# ---------------------------------------------------------------------------
# XGETBV and the XSAVE family

def test_xgetbv():
    cpu = FakeCpu(regs=Regs(rax=M64, rdx=M64, rcx=0, rip=RIP), xcr0=0x2E7)
    assert run("0f01d0", cpu) == Emulated("xgetbv")
    assert (cpu.regs.rax, cpu.regs.rdx, cpu.regs.rip) == (0x2E7, 0, RIP + 3)
    cpu = FakeCpu(regs=Regs(rcx=1, rip=RIP))
    assert_declined("0f01d0", cpu)
    cpu = FakeCpu(regs=Regs(rcx=2, rip=RIP))
    assert_fault("0f01d0", cpu, "xgetbv", (13, 0))
    cpu = FakeCpu(regs=Regs(rcx=0, rip=RIP), xcr0=None)
    assert_declined("0f01d0", cpu)
    cpu = FakeCpu(sregs=make_sregs(cr4=CR4_DEFAULT & ~CR4_OSXSAVE))
    assert_fault("0f01d0", cpu, "xgetbv", (6, None))


def xsave_cpu(xcr0=0b111, **regs) -> FakeCpu:
    regs = {"rax": M64 >> 32, "rdx": M64 >> 32, "rdi": 0x4000, "rip": RIP, **regs}
    cpu = FakeCpu(regs=Regs(**regs), xcr0=xcr0)
    cpu.map(0x4000, bytes([0xEE]) * 1024)
    cpu.map(0x4200, bytes(64))             # a zeroed header, as the OS prepares it
    busy_x87(cpu)
    cpu.area[AVX_OFFSET:AVX_OFFSET + 256] = bytes(range(256))
    put(cpu.area, XSTATE_BV, 8, 0b111)
    return cpu


def test_xsave_standard():
    cpu = xsave_cpu()
    put(cpu.area, XSTATE_BV, 8, 0b011)    # AVX in its initial state
    assert run("480fae27", cpu) == Emulated("xsave64")      # xsave64 [rdi]
    img = cpu.peek(0x4000, 1024)
    assert u(img, FCW, 2) == 0x0272 and u(img, FIP, 8) == 0xFFFF_FFFF_8123_4567
    assert u(img, MXCSR, 4) == 0x9FC0
    assert img[XMM0:XMM0 + 256] == bytes(cpu.area[XMM0:XMM0 + 256])
    assert img[464:512] == bytes([0xEE]) * 48
    assert u(img, XSTATE_BV, 8) == 0b011
    assert u(img, XCOMP_BV, 8) == 0
    assert img[AVX_OFFSET:AVX_OFFSET + 256] == bytes(256)         # initial values
    assert img[832:] == bytes([0xEE]) * 192
    assert cpu.fpu_sets == 0 and cpu.regs.rip == RIP + 4


def test_xsave_partial_rfbm_keeps_other_xstate_bv_bits():
    cpu = xsave_cpu(rax=0b001, rdx=0)      # x87 only
    cpu.map(0x4200, (0b110).to_bytes(8, "little"))
    assert run("0fae27", cpu) == Emulated("xsave")
    img = cpu.peek(0x4000, 1024)
    assert u(img, XSTATE_BV, 8) == 0b111
    assert u(img, MXCSR, 4) == 0xEEEE_EEEE           # MXCSR needs RFBM[1] or RFBM[2]
    assert img[XMM0:XMM0 + 16] == bytes([0xEE]) * 16
    assert u(img, FIP, 4) == 0x8123_4567 and u(img, 12, 4) == 0   # 32-bit format


def test_xsaveopt_is_xsave():
    a, b = xsave_cpu(), xsave_cpu()
    assert run("0fae37", a) == Emulated("xsaveopt")
    assert run("0fae27", b) == Emulated("xsave")
    assert a.peek(0x4000, 1024) == b.peek(0x4000, 1024)


def test_xrstor_round_trip_and_init():
    src = xsave_cpu()
    assert run("480fae27", src) == Emulated("xsave64")
    image = bytearray(src.peek(0x4000, 1024))
    dst = xsave_cpu()
    dst.area = default_area()
    dst.map(0x4000, bytes(image))
    assert run("480fae2f", dst) == Emulated("xrstor64")
    assert dst.area[:832] == src.area[:832]
    assert dst.fpu_sets == 1
    # XSTATE_BV bit clear: the component is initialised, its bit cleared.
    put(image, XSTATE_BV, 8, 0b010)
    dst.map(0x4000, bytes(image))
    dst.regs.rip = RIP
    assert run("480fae2f", dst) == Emulated("xrstor64")
    a = dst.area
    assert u(a, FCW, 2) == 0x037F and u(a, FSW, 2) == 0 and a[ST0:ST0 + 128] == bytes(128)
    assert a[AVX_OFFSET:AVX_OFFSET + 256] == bytes(256)
    assert a[XMM0:XMM0 + 256] == bytes(src.area[XMM0:XMM0 + 256])
    assert u(a, MXCSR, 4) == 0x9FC0
    assert u(a, XSTATE_BV, 8) == 0b010


def test_xrstor_loads_mxcsr_even_when_sse_is_init():
    cpu = xsave_cpu()
    image = bytearray(1024)
    put(image, MXCSR, 4, 0x1FC0)
    put(image, XSTATE_BV, 8, 0)
    cpu.map(0x4000, bytes(image))
    assert run("0fae2f", cpu) == Emulated("xrstor")
    assert u(cpu.area, MXCSR, 4) == 0x1FC0
    assert cpu.area[XMM0:XMM0 + 256] == bytes(256)
    assert u(cpu.area, XSTATE_BV, 8) == 0b010          # kept so KVM keeps the MXCSR


def test_xrstor_faults():
    def with_header(**fields):
        cpu = xsave_cpu(xcr0=0b011)
        image = bytearray(1024)
        put(image, MXCSR, 4, fields.get("mxcsr", 0x1F80))
        put(image, XSTATE_BV, 8, fields.get("bv", 0b11))
        put(image, XCOMP_BV, 8, fields.get("comp", 0))
        put(image, 528, 8, fields.get("reserved", 0))
        cpu.map(0x4000, bytes(image))
        return cpu
    assert_fault("0fae2f", with_header(bv=0b111), "xrstor", (13, 0))      # AVX not in XCR0
    assert_fault("0fae2f", with_header(reserved=1), "xrstor", (13, 0))
    assert_fault("0fae2f", with_header(mxcsr=0x10000), "xrstor", (13, 0))
    assert_fault("0fae2f", with_header(comp=(1 << 63) | 0b1, bv=0b11), "xrstor", (13, 0))
    cpu = with_header()
    cpu.regs.rdi = 0x4020
    assert_fault("0fae2f", cpu, "xrstor", (13, 0))                       # 64-byte alignment
    assert_fault("0fae2f", FakeCpu(sregs=make_sregs(cr4=CR4_DEFAULT & ~CR4_OSXSAVE)), "xrstor", (6, None))
    assert_fault("0fae27", FakeCpu(sregs=make_sregs(cr0=CR0_PE | CR0_TS)), "xsave", (7, None))


def test_xsave_declines_unsupported_components_and_unknown_xcr0():
    assert_declined("0fae27", xsave_cpu(xcr0=0b1000_0111))   # MPX: layout unknown here
    cpu = xsave_cpu(xcr0=0b1000_0111, rax=0b111, rdx=0)      # ... unless not requested
    assert run("0fae27", cpu) == Emulated("xsave")
    assert_declined("0fae27", xsave_cpu(xcr0=None))


def test_xsaves_xrstors_compacted():
    src = xsave_cpu()
    put(src.area, XSTATE_BV, 8, 0b101)     # SSE registers in their initial state ...
    src.area[XMM0:XMM0 + 256] = bytes(256)
    assert run("480fc72f", src) == Emulated("xsaves64")
    img = src.peek(0x4000, 1024)
    # ... but MXCSR is not 1F80, so SSE counts as in use.
    assert u(img, XSTATE_BV, 8) == 0b111
    assert u(img, XCOMP_BV, 8) == (1 << 63) | 0b111
    assert img[AVX_OFFSET:AVX_OFFSET + 256] == bytes(range(256))
    dst = xsave_cpu()
    dst.area = default_area()
    dst.map(0x4000, img)
    assert run("480fc71f", dst) == Emulated("xrstors64")
    assert dst.area[:512] == src.area[:512] and dst.area[576:832] == src.area[576:832]
    assert u(dst.area, XSTATE_BV, 8) == 0b111
    # Compacted save skips components in their initial state.
    src = xsave_cpu()
    put(src.area, XSTATE_BV, 8, 0b010)
    put(src.area, MXCSR, 4, 0x1F80)
    src.map(0x4210, bytes([0x5A]) * 48)     # reserved header bytes: XSAVEC leaves them
    assert run("0fc727", src) == Emulated("xsavec")
    img = src.peek(0x4000, 1024)
    assert u(img, XSTATE_BV, 8) == 0b010 and u(img, FCW, 2) == 0xEEEE
    assert u(img, XCOMP_BV, 8) == (1 << 63) | 0b111 and img[0x210:0x240] == bytes([0x5A]) * 48
    assert img[AVX_OFFSET:AVX_OFFSET + 256] == bytes([0xEE]) * 256


def test_xsaves_xrstors_privilege_and_format():
    cpu = xsave_cpu()
    cpu.sregs.cs.dpl = 3
    assert_fault("0fc72f", cpu, "xsaves", (13, 0))
    cpu = xsave_cpu()
    image = bytearray(1024)
    put(image, MXCSR, 4, 0x1F80)
    cpu.map(0x4000, bytes(image))                       # standard-form header
    assert_fault("0fc71f", cpu, "xrstors", (13, 0))
    cpu.xss = None
    assert_declined("0fc71f", cpu)


# ---------------------------------------------------------------------------
# Properties

SIZES = st.sampled_from([(16, "66f3"), (32, "f3"), (64, "f348")])


@settings(max_examples=150, deadline=None)
@given(size=SIZES, value=st.integers(0, M64), junk=st.integers(0, M64), flags=st.integers(0, 0xFFF))
def test_bit_counts_match_python(size, value, junk, flags):
    bits, prefix = size
    src = value & ((1 << bits) - 1)
    expected = {"b8": bin(src).count("1"), "bd": bits - src.bit_length(),
                "bc": bits if src == 0 else (src & -src).bit_length() - 1}
    for opcode, result in expected.items():
        cpu = FakeCpu(regs=Regs(rax=junk, rdx=value, rip=RIP, rflags=(flags & ARITH) | 0x2))
        assert run(prefix + "0f" + opcode + "c2", cpu) is not None
        mask = (1 << bits) - 1
        assert cpu.regs.rax & mask == result
        assert cpu.regs.rax >> bits == (junk >> bits if bits == 16 else 0)
        if opcode == "b8":
            assert cpu.regs.rflags & ARITH == (ZF if src == 0 else 0)
        else:
            assert bool(cpu.regs.rflags & CF) == (src == 0)
            assert bool(cpu.regs.rflags & ZF) == (result == 0)


@settings(max_examples=150, deadline=None)
@given(mem=st.binary(min_size=16, max_size=16), rax=st.integers(0, M64), rdx=st.integers(0, M64),
       rbx=st.integers(0, M64), rcx=st.integers(0, M64), equal=st.booleans())
def test_cmpxchg16b_matches_model(mem, rax, rdx, rbx, rcx, equal):
    lo, hi = int.from_bytes(mem[:8], "little"), int.from_bytes(mem[8:], "little")
    if equal:
        rax, rdx = lo, hi
    cpu = FakeCpu(regs=Regs(rax=rax, rdx=rdx, rbx=rbx, rcx=rcx, rsi=0x2000, rip=RIP))
    cpu.map(0x2000, mem)
    assert run("f0480fc70e", cpu) == Emulated("cmpxchg16b")
    if (rax, rdx) == (lo, hi):
        assert cpu.peek(0x2000, 16) == rbx.to_bytes(8, "little") + rcx.to_bytes(8, "little")
        assert cpu.regs.rflags & ZF and (cpu.regs.rax, cpu.regs.rdx) == (rax, rdx)
    else:
        assert cpu.peek(0x2000, 16) == mem
        assert not cpu.regs.rflags & ZF and (cpu.regs.rax, cpu.regs.rdx) == (lo, hi)
    assert (cpu.regs.rbx, cpu.regs.rcx, cpu.regs.rip) == (rbx, rcx, RIP + 5)
